"""The same config and seed give the same rows and the same model, whatever earlier runs left in the caches."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from conftest import corpus_text, run_killed_at_checkpoint
from test_distill import _args, _weights, models, one_thread  # noqa: F401 - fixtures

from compactlm import inputs
from compactlm.config import load_config
from compactlm.stages import distill as run_distill


@pytest.fixture(autouse=True)
def own_stores(tmp_path, monkeypatch):
    """A token store root of this test's own (the subprocesses inherit it)."""
    monkeypatch.setenv("COMPACTLM_TOKENS", str(tmp_path / "stores"))


@pytest.fixture(scope="module")
def many_docs(tmp_path_factory):
    """A .jsonl corpus of 1,500 short documents (~100 tokens each): small budgets end inside it."""
    text = corpus_text(300_000)
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": text[i: i + 200]}) + "\n" for i in range(0, len(text), 200)))
    return path


def _splits(text_file, tokenizer, max_tokens: int, **kw):
    cfg = load_config(None, [f"data={text_file}", f"dataset.max_tokens={max_tokens}", "calib.sequences=8"])
    return inputs.load_splits(cfg, tokenizer, 16, **kw)


def test_rows_do_not_depend_on_how_far_the_store_was_extended(many_docs, bpe_tokenizer, monkeypatch):
    """Regression: a stage used the whole token store, however far earlier runs had extended it, so a longer run
    in between changed the next short run's calibration rows (drawn over the store's length), training rows and
    validation rows. Now a stage reads the documents that its own budget reaches."""
    monkeypatch.setattr(inputs.data.splits, "TOKENIZE_DOCS", 8)  # the store ends a few documents past each budget
    before = _splits(many_docs, bpe_tokenizer, 3000, val_rows=4)
    _splits(many_docs, bpe_tokenizer, 12_000, calib=False, train_tokens=10_000, val_rows=40)  # a longer run
    after = _splits(many_docs, bpe_tokenizer, 3000, val_rows=4)
    for name in ("calib", "train", "val"):
        assert torch.equal(getattr(after, name)[:], getattr(before, name)[:]), name
    assert len(before.train) * 16 < 4000 and len(before.val) >= 4  # the stage's own prefix, not the store


def test_a_resumed_run_sees_the_rows_of_an_uninterrupted_one(models, many_docs, tmp_path):  # noqa: F811
    """Regression: a distillation killed, then resumed after another run had extended the token store, followed
    a new shuffle over the longer store. Now it ends with the weights of the same run never interrupted."""
    keys = {"distill.steps": 8, "distill.eval_every": 4, "dataset.max_tokens": 6000}
    killed = tmp_path / "killed"
    code = run_killed_at_checkpoint(["distill", *_args(models, many_docs, killed, **keys)], 4, tmp_path / "killed.log")
    assert code == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    # the killed run tokenised one batch of 512 documents (~70K tokens); a longer run extends the store past it
    longer = load_config(None, _args(models, many_docs, tmp_path / "longer", **(keys | {"dataset.max_tokens": 150_000})))
    n_train = len(inputs.load_splits(longer, inputs.load_tokenizer(str(models["student"])), 32, calib=False,
                                     train_tokens=150_000).train)
    assert n_train * 32 > 100_000
    run_distill(load_config(None, _args(models, many_docs, killed, resume=True, **keys)))
    run_distill(load_config(None, _args(models, many_docs, tmp_path / "reference", **keys)))
    # exact: resume restores weights, optimizer state and RNG and reads the same rows, so the same operations run
    torch.testing.assert_close(_weights(killed / "final"), _weights(tmp_path / "reference" / "final"), rtol=0, atol=0)


def test_outputs_say_what_the_built_in_teacher_and_corpus_are():
    """The built-in SmolLM2 is a Q4_1 GGUF, dequantized; python-docs the shipped snapshot: both said, with the
    corpus's checksum, in every compactlm.yaml, report and model card (`provenance.lines`)."""
    from compactlm import data, provenance

    lines = provenance.lines(load_config(None, ["teacher=smollm2-135m", "student=somewhere", "data=python-docs"]))
    assert any(line.startswith("teacher smollm2-135m:") and "Q4_1 GGUF file, dequantized" in line for line in lines)
    assert any(data.PYTHON_DOCS_SHA256 in line for line in lines) and not any("student" in line for line in lines)
