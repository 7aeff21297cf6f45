"""The CLI end to end on a tiny model (its one-line errors for bad input: test_bad_input.py)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from compactlm.cli import main


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def common(tiny_checkpoint, text_file, out_dir) -> list[str]:
    return [f"model={tiny_checkpoint}", f"data={text_file}", f"out_dir={out_dir}", "calib.sequences=8",
            "calib.seq_len=32", "calib.batch_size=4", "eval.seq_len=32", "eval.sequences=8", "eval.speed=false"]


def test_score_prune_eval_end_to_end(capsys, tiny_checkpoint, text_file, tmp_path):
    code, out, err = run(capsys, "score", *common(tiny_checkpoint, text_file, tmp_path / "scores"))
    assert code == 0, err
    scores = tmp_path / "scores" / "scores.safetensors"
    assert scores.is_file() and (tmp_path / "scores" / "compactlm.yaml").is_file()

    config = tmp_path / "prune.yaml"
    config.write_text(yaml.safe_dump({"target": {"hidden_size": 16, "intermediate_size": 0.5, "num_attention_heads": 2}}))
    pruned = tmp_path / "pruned"
    code, out, err = run(
        capsys, "prune", "--config", str(config), *common(tiny_checkpoint, text_file, pruned),
        f"importance.scores={scores}", "target.num_hidden_layers=2",
    )
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["target_shape"]["hidden"] == 16
    model = AutoModelForCausalLM.from_pretrained(pruned)
    assert (model.config.hidden_size, model.config.intermediate_size, model.config.num_attention_heads,
            model.config.num_key_value_heads, model.config.num_hidden_layers, model.config.head_dim) == (16, 24, 2, 2, 2, 8)
    plan = json.loads((pruned / "plan.json").read_text())
    assert len(plan["dropped_layers"]) == 1 and len(plan["hidden"]) == 16
    resolved = yaml.safe_load((pruned / "compactlm.yaml").read_text())
    assert resolved["target"]["hidden_size"] == 16 and resolved["target"]["num_hidden_layers"] == 2

    code, out, err = run(capsys, "eval", *common(pruned, text_file, tmp_path / "eval"), f"teacher={tiny_checkpoint}")
    assert code == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["params"] == sum(p.numel() for p in model.parameters())
    assert metrics["perplexity"] > 1 and metrics["kl"] > 0 and 0 <= metrics["top1_agreement"] <= 1


def test_prune_with_contiguous_block_metric(capsys, tiny_checkpoint, text_file, tmp_path):
    code, out, err = run(
        capsys, "prune", *common(tiny_checkpoint, text_file, tmp_path / "p"), "target.num_hidden_layers=1",
        "target.layer_metric=contiguous",
    )
    assert code == 0, err
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["dropped_layers"] == [0, 1]  # the final layer is kept by default


def test_prune_with_saved_scores_streams_and_equals_the_in_memory_prune(capsys, tiny_checkpoint, text_file, tmp_path,
                                                                         monkeypatch):
    """With saved scores, a local checkpoint and no refit (prune.reconstruct=none: a refit needs the models),
    `compactlm prune` never builds the model: it streams the surgery tensor by tensor, and the result equals
    the in-memory prune's."""
    from compactlm import inputs

    args = common(tiny_checkpoint, text_file, tmp_path / "scores")
    assert run(capsys, "score", *args)[0] == 0
    prune_args = [f"importance.scores={tmp_path / 'scores' / 'scores.safetensors'}", "target.hidden_size=24",
                  "target.intermediate_size=0.5", "importance.layer_metrics=[block_importance]",
                  "prune.reconstruct=none"]
    built = []
    monkeypatch.setattr(inputs, "load_model", lambda *a, **k: built.append(a) or pytest.fail("model built"))
    code, _, err = run(capsys, "prune", *common(tiny_checkpoint, text_file, tmp_path / "streamed"), *prune_args)
    assert code == 0, err
    monkeypatch.undo()
    monkeypatch.setattr(inputs, "local_safetensors", lambda spec: False)
    code, _, err = run(capsys, "prune", *common(tiny_checkpoint, text_file, tmp_path / "in_memory"), *prune_args)
    assert code == 0, err
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").state_dict()
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "in_memory").state_dict()
    assert streamed.keys() == in_memory.keys() and all(torch.equal(streamed[k], in_memory[k]) for k in streamed)
    plans = [json.loads((tmp_path / d / "plan.json").read_text()) for d in ("streamed", "in_memory")]
    assert plans[0] == plans[1]  # the same keep indices and the same parameter counts
    assert (tmp_path / "streamed" / "tokenizer.json").is_file() and not built
    assert (tmp_path / "streamed" / "model.safetensors.index.json").is_file()  # shards: it streamed
    assert (tmp_path / "in_memory" / "model.safetensors").is_file()
