"""lm-evaluation-harness bridge: a tiny local multiple-choice task on the tiny Llama, offline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from compactlm.errors import CompactLMError
from compactlm.tasks import MISSING, run_tasks

TINY_TASK = Path(__file__).parent / "data" / "tiny_task"


def _task_dir(tmp_path: Path, data_file: Path = TINY_TASK / "tiny_task.jsonl") -> Path:
    """tiny_task.yaml copied into tmp_path with absolute data and cache paths (datasets resolves a relative
    data_files path against the working directory, not the YAML)."""
    config = yaml.safe_load((TINY_TASK / "tiny_task.yaml").read_text())
    config["dataset_kwargs"]["data_files"]["test"] = str(data_file)
    config["dataset_kwargs"]["cache_dir"] = str(tmp_path / "hf-cache")
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "tiny_task.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.fixture
def offline(monkeypatch):
    """No hub access: env vars for fresh imports, datasets' constant for an already imported datasets."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def test_tiny_task_yaml_file_and_directory(tiny_checkpoint, tmp_path, offline):
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).train()
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    folder = _task_dir(tmp_path)
    torch.manual_seed(3)
    by_file = run_tasks(model, tokenizer, [str(folder / "tiny_task.yaml")], batch_size=4)
    after = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(4)), "run_tasks must not touch the caller's torch RNG"
    assert model.training, "run_tasks must restore the model's training flag"
    assert set(by_file) == {"compactlm_tiny_mc"}
    assert 0.0 <= by_file["compactlm_tiny_mc"]["acc"] <= 1.0
    assert all(isinstance(v, float) for v in by_file["compactlm_tiny_mc"].values())
    by_dir = run_tasks(model, tokenizer, [str(folder)], limit=3, batch_size=4)
    assert 0.0 <= by_dir["compactlm_tiny_mc"]["acc"] <= 1.0


def test_missing_lm_eval_is_one_line_error(monkeypatch):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")] + ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes `import` raise ImportError
    with pytest.raises(CompactLMError, match="pip install lm-eval") as err:
        run_tasks(torch.nn.Linear(2, 2), None, ["hellaswag"])
    assert str(err.value) == MISSING and "\n" not in str(err.value)


def test_unloadable_dataset_names_the_task(tmp_path, offline):
    pytest.importorskip("lm_eval")
    folder = _task_dir(tmp_path, data_file=tmp_path / "absent.jsonl")
    with pytest.raises(CompactLMError, match="compactlm_tiny_mc|tiny_task.yaml") as err:
        run_tasks(torch.nn.Linear(2, 2), None, [str(folder / "tiny_task.yaml")])
    assert "\n" not in str(err.value)


def test_missing_task_file_is_one_line_error(tmp_path):
    pytest.importorskip("lm_eval")
    with pytest.raises(CompactLMError, match="absent.yaml"):
        run_tasks(torch.nn.Linear(2, 2), None, [str(tmp_path / "absent.yaml")])


def test_no_tasks_is_empty():
    assert run_tasks(torch.nn.Linear(2, 2), None, []) == {}


def test_eval_command_runs_tasks(tiny_checkpoint, text_file, tmp_path, offline, capsys):
    """`compactlm eval eval.tasks=[...]` reports the task metrics beside perplexity."""
    pytest.importorskip("lm_eval")
    import json

    from compactlm.cli import main

    task = _task_dir(tmp_path) / "tiny_task.yaml"
    code = main(["eval", f"model={tiny_checkpoint}", f"data={text_file}", "eval.seq_len=32", "eval.sequences=4",
                 "eval.speed=false", f"eval.tasks=[{task}]"])
    out, err = capsys.readouterr()
    assert code == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])
    (task_metrics,) = metrics["tasks"].values()
    assert 0.0 <= task_metrics["acc"] <= 1.0 and metrics["perplexity"] > 1


def test_eval_fails_on_an_unloadable_task_before_any_model_loads(tiny_checkpoint, text_file, tmp_path, offline,
                                                                    monkeypatch):
    """Regression: `compactlm eval` built its tasks after the perplexity pass, so a task that could not load
    failed only at the end. Now the task's one-line error comes before any model is read."""
    pytest.importorskip("lm_eval")
    from compactlm import inputs
    from compactlm.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the tasks")

    monkeypatch.setattr(inputs, "load_within", no_model)
    task = _task_dir(tmp_path, data_file=tmp_path / "absent.jsonl") / "tiny_task.yaml"
    code = main(["eval", f"model={tiny_checkpoint}", f"data={text_file}", "eval.speed=false", f"eval.tasks=[{task}]"])
    assert code == 2


def test_tasks_loaded_once_run_on_two_models(tiny_checkpoint, tmp_path, offline):
    """The run's evaluation stage (`stages.compare`) builds its tasks once and runs them on the teacher, pruned
    and distilled models: a second run of the same built tasks gives what a fresh build gives."""
    pytest.importorskip("lm_eval")
    from compactlm.models.loading import load_model, load_tokenizer
    from compactlm.tasks import load_tasks

    model, tokenizer = load_model(str(tiny_checkpoint)), load_tokenizer(str(tiny_checkpoint))
    task = str(_task_dir(tmp_path) / "tiny_task.yaml")
    tasks = load_tasks([task])
    first, second = (run_tasks(model, tokenizer, tasks, limit=4, batch_size=4) for _ in range(2))
    assert first == second == run_tasks(model, tokenizer, [task], limit=4, batch_size=4)
