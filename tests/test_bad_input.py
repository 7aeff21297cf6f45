"""Bad input, kind by kind: a one-line error that names the key or file, exit code 2, no output written.

Each row is one kind of mistake a user makes, run through the real CLI on a tiny model. `{name}` in an
argument is a file or folder that the `files` fixture made for it.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config, tiny_tokenizer

from compactlm.cli import main
from compactlm.importance.scores import Scores

BASE = ["calib.sequences=4", "calib.seq_len=32", "calib.batch_size=4", "eval.seq_len=32", "eval.sequences=4",
        "eval.speed=false", "distill.steps=2", "distill.batch_size=2", "distill.seq_len=32", "distill.eval_sequences=2"]

CASES = [  # id, command, arguments, what the one line must say
    ("unknown-key", "prune", ["target.hiden_size=3"], "unknown config key 'target.hiden_size'"),
    ("wrong-type", "prune", ["calib.seq_len=abc"], "calib.seq_len: expected int"),
    ("not-a-choice", "prune", ["importance.method=gradient"], "importance.method: 'gradient' is not one of"),
    ("out-of-range", "search", ["search.target_params=1.5"], "search.target_params=1.5: a fraction must lie in (0, 1]"),
    ("min-lr-above-lr", "distill", ["distill.lr=0.001", "distill.min_lr=0.01"], "distill.min_lr=0.01"),
    ("not-key-value", "prune", ["hidden_size"], "override 'hidden_size' is not of the form key=value"),
    ("config-missing", "prune", ["--config", "{missing}.yaml"], "missing.yaml does not exist"),
    ("config-not-yaml", "prune", ["--config", "{bad_yaml}"], "bad.yaml is not valid YAML"),
    ("config-not-mapping", "prune", ["--config", "{list_yaml}"], "list.yaml must hold a mapping"),
    ("no-out-dir", "prune", ["out_dir=null"], "prune needs out_dir=DIR"),
    ("out-dir-is-a-file", "prune", ["out_dir={a_file}"], "is a file, not a folder"),
    ("out-dir-read-only", "prune", ["out_dir=/sys/compactlm-test"], "cannot write in /sys"),
    ("model-missing", "prune", ["model=./no/such/model"], "model path ./no/such/model does not exist"),
    ("model-no-config", "prune", ["model={empty_dir}"], "has no config.json"),
    ("model-config-corrupt", "eval", ["model={broken_config}"], "broken/config.json' is not a valid JSON file"),
    ("model-unsupported", "prune", ["model={neox}"], "unsupported model family 'gpt_neox': compactlm supports llama"),
    ("model-truncated-shard", "eval", ["model={truncated}"], "cannot load model from"),
    ("target-too-large", "prune", ["target.hidden_size=4096"], "target.hidden_size=4096 is larger than the source"),
    ("cascade-outside-run", "prune", ["target.hidden_size=[24,16]"], "only `compactlm run` makes a cascade"),
    ("cascade-growing", "prune", ["target.intermediate_size=[16,24]"], "a cascade's sizes must not grow"),
    ("heads-not-multiple-of-kv", "prune", ["target.num_attention_heads=3"], "not a multiple of"),
    ("drop-layers-out-of-range", "prune", ["target.drop_layers=[0,7]"], "target.drop_layers: [7] out of range"),
    ("drops-every-layer", "prune", ["target.drop_layers=[0,1,2]"], "target.drop_layers drops 3 of 3 layers"),
    ("seq-len-above-positions", "prune", ["calib.seq_len=4096"], "calib.seq_len=4096 exceeds the model's maximum"),
    ("scores-missing", "prune", ["importance.scores={missing}.safetensors", "target.hidden_size=16"],
     "importance.scores: file"),
    ("scores-corrupt", "prune", ["importance.scores={corrupt_scores}", "target.hidden_size=16"], "is corrupt"),
    ("scores-other-shape", "prune", ["importance.scores={other_scores}", "target.hidden_size=16"],
     "was computed for a different model shape (heads"),
    ("data-missing", "prune", ["data=./no/such.txt"], "data file not found: ./no/such.txt"),
    ("data-empty", "score", ["data={empty_txt}"], "no non-empty text in data source"),
    ("data-not-utf8", "score", ["data={latin1_txt}"], "is not UTF-8 text"),
    ("data-jsonl-bad-line", "score", ["data={bad_jsonl}"], "bad.jsonl:2: corrupt JSON line"),
    ("data-jsonl-no-field", "score", ["data={nofield_jsonl}"], "nofield.jsonl:1: no field 'text'"),
    ("data-unsupported-file", "score", ["data={csv}"], "unsupported data file extension '.csv'"),
    ("data-offline-builtin", "score", ["data=tinyshakespeare"], "pass data=FILE"),
    ("kd-vocab-size-differs", "distill", ["teacher={vocab64}"], "has a vocabulary of 64"),
    ("kd-tokenizers-differ", "distill", ["teacher={other_tokenizer}"], "have different tokenizers"),
    ("kd-needs-both-models", "distill", ["teacher=null"], "distill needs teacher=MODEL"),
    ("batch-not-multiple", "distill", ["distill.micro_batch_size=3"], "distill.batch_size=2 must be a multiple"),
    ("checkpoint-without-resume", "distill", ["out_dir={trained}"], "pass resume=true"),
    ("resume-with-changed-config", "distill", ["out_dir={trained}", "resume=true", "distill.lr=0.5"],
     "resume: distill.lr (0.0001 -> 0.5) changed"),
    ("char-tokenizer-not-built-here", "prune", ["tokenizer=char"], "tokenizer=char is built by run, train and distill"),
    ("task-file-missing", "eval", ["eval.tasks=[./no/such/task.yaml]"], "eval.tasks"),
    ("memory-gb-not-positive", "prune", ["memory_gb=0"], "memory_gb=0.0: must be > 0"),
    ("reconstruct-not-a-choice", "prune", ["prune.reconstruct=everything"], "prune.reconstruct: 'everything' is not one of"),
    ("ridge-negative", "prune", ["prune.ridge=-1"], "prune.ridge=-1.0: must be >= 0"),
    ("strength-out-of-range", "prune", ["prune.per_layer_strength=[0.5,2]"],
     "prune.per_layer_strength=[0.5, 2.0]: needs distinct values in [0, 1]"),
    ("taylor-layer-by-layer", "score", ["memory_gb=0.00001", "importance.method=taylor"],
     "importance.method=taylor needs gradients through the whole model"),
    ("memory-gb-needs-safetensors", "score", ["memory_gb=0.00001", "model={config_only}"],
     "layer-by-layer reads a local safetensors checkpoint"),
    ("memory-gb-lm-loss-metric", "prune", ["memory_gb=0.00001", "target.num_hidden_layers=2"],
     "layer metric 'lm_loss' needs the whole model in memory"),
    ("speed-mode-unknown", "eval", ["eval.speed_modes=[dynamic,paged]"], "eval.speed_modes=('dynamic', 'paged')"),
    ("export-no-out", "export", [], "export needs out=FILE.gguf"),
    ("export-out-not-gguf", "export", ["out={out_dir}/model.bin"], "model.bin: expected a file name ending in .gguf"),
    ("export-type-not-a-choice", "export", ["out={out_dir}/m.gguf", "export.type=q4_0"],
     "export.type: 'q4_0' is not one of"),
    ("export-model-missing", "export", ["out={out_dir}/m.gguf", "model=./no/such/model"],
     "model path ./no/such/model does not exist"),
    ("export-model-unsupported", "export", ["out={out_dir}/m.gguf", "model={neox}"], "unsupported model family"),
    ("export-tokenizer-not-bpe", "export", ["out={out_dir}/m.gguf", "tokenizer={word_tokenizer}"],
     "the tokenizer is neither byte-level BPE"),
]


@pytest.fixture(scope="module")
def files(tiny_checkpoint, text_file, bpe_tokenizer, word_tokenizer, tmp_path_factory):
    """Every broken or mismatched input the cases name, built once."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    root = tmp_path_factory.mktemp("bad")
    f = {"missing": root / "missing", "a_file": root / "a_file", "empty_dir": root / "empty_dir"}
    f["a_file"].write_text("not a folder\n")
    f["empty_dir"].mkdir()
    (root / "bad.yaml").write_text("target:\n  hidden_size: [1, 2\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    f["bad_yaml"], f["list_yaml"] = root / "bad.yaml", root / "list.yaml"
    f["broken_config"] = root / "broken"
    f["broken_config"].mkdir()
    (f["broken_config"] / "config.json").write_text("{not json")
    f["neox"] = root / "neox"
    GPTNeoXConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=48,
                  vocab_size=64).save_pretrained(f["neox"])
    f["truncated"] = root / "truncated"
    f["truncated"].mkdir()
    for file in tiny_checkpoint.iterdir():
        (f["truncated"] / file.name).write_bytes(file.read_bytes())
    shard = f["truncated"] / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    f["config_only"] = root / "config_only"  # weights elsewhere (a hub download in progress, a .bin file)
    f["config_only"].mkdir()
    for file in tiny_checkpoint.iterdir():
        if file.suffix != ".safetensors":
            (f["config_only"] / file.name).write_bytes(file.read_bytes())
    f["corrupt_scores"] = root / "corrupt.safetensors"
    f["corrupt_scores"].write_bytes(b"\x00" * 64)
    config = tiny_config("llama", 4, 2)
    f["other_scores"] = root / "other.safetensors"
    Scores(torch.rand(config.hidden_size), torch.rand(config.num_hidden_layers, 2),
           torch.rand(config.num_hidden_layers, config.intermediate_size)).save(f["other_scores"])
    f["empty_txt"] = root / "empty.txt"
    f["empty_txt"].write_text("\n\n  \n")
    f["latin1_txt"] = root / "latin1.txt"
    f["latin1_txt"].write_bytes("caf\u00e9 ".encode("latin-1") * 100)
    f["bad_jsonl"] = root / "bad.jsonl"
    f["bad_jsonl"].write_text(json.dumps({"text": "fine"}) + "\n{broken\n")
    f["nofield_jsonl"] = root / "nofield.jsonl"
    f["nofield_jsonl"].write_text(json.dumps({"body": "x"}) + "\n")
    f["csv"] = root / "table.csv"
    f["csv"].write_text("a,b\n1,2\n")
    f["vocab64"] = root / "vocab64"
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(f["vocab64"])
    f["other_tokenizer"] = root / "other_tokenizer"  # same vocabulary size, other tokens
    other = tiny_tokenizer(vocab_size=200)
    config = tiny_config("llama", 4, 2, tied=True)
    config.vocab_size = len(bpe_tokenizer)
    AutoModelForCausalLM.from_config(config).save_pretrained(f["other_tokenizer"])
    other.save_pretrained(f["other_tokenizer"])
    f["word_tokenizer"] = root / "word_tokenizer"  # not byte-level BPE: export refuses it
    word_tokenizer.save_pretrained(f["word_tokenizer"])
    f["trained"] = root / "trained"
    args = [f"teacher={tiny_checkpoint}", f"student={tiny_checkpoint}", f"data={text_file}",
            f"out_dir={f['trained']}", *BASE]
    assert main(["distill", *args]) == 0
    return f


def _files_now(root) -> set:
    return {p for p in root.rglob("*")} if root.exists() else set()


@pytest.mark.parametrize("command,args,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(command, args, message, files, tiny_checkpoint, text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COMPACTLM_CACHE", str(tmp_path / "cache"))  # no cached data set: the download runs
    monkeypatch.setattr("compactlm.data.corpora.urllib.request.urlopen", _offline)
    out_dir = tmp_path / "out"  # `{out_dir}` in an argument: a path inside it (export's out=)
    args = [a.format(**{k: str(v) for k, v in files.items()}, out_dir=out_dir) for a in args]
    base = {"model": tiny_checkpoint, "student": tiny_checkpoint, "teacher": tiny_checkpoint, "data": text_file,
            "out_dir": out_dir}
    if command != "distill":
        base.pop("student"), base.pop("teacher")
    given = {a.split("=", 1)[0] for a in args if "=" in a}
    argv = [f"{k}={v}" for k, v in base.items() if k not in given] + BASE + args
    if args and args[0] == "--config":
        argv = args + [a for a in argv if not a.startswith("--config")]
    trained_before = _files_now(files["trained"])
    code = main([command, *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out_dir.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert _files_now(files["trained"]) == trained_before  # a refused resume writes nothing either


def _offline(*args, **kwargs):
    import urllib.error

    raise urllib.error.URLError("no network in tests")


def test_there_are_at_least_25_kinds():
    assert len({c[0] for c in CASES}) == len(CASES) >= 25
