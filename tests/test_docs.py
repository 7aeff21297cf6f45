"""The docs agree with what produced them: result tables with benchmarks/results/*.json, the key reference and
every command's --help with the config schema; the README stays short."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import render_results  # noqa: E402

from compactlm import keys  # noqa: E402
from compactlm.cli import COMMANDS, main  # noqa: E402
from compactlm.config import Config, load_config  # noqa: E402

FIELDS = ("name", "command", "commit", "date", "machine", "provenance", "inputs", "tables", "values", "figures")


def test_the_docs_agree_with_the_results_and_the_schema():
    """`python scripts/render_results.py --check`: every rendered block equals what its source renders."""
    assert render_results.disagreements() == []


def test_a_number_changed_by_hand_is_caught(tmp_path):
    for rel in render_results.DOCUMENTS:
        if (ROOT / rel).is_file():
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / rel, tmp_path / rel)
    results = tmp_path / "docs" / "RESULTS.md"
    text = results.read_text()
    block = re.search(r"<!-- results: prune_quality/importance -->\n(.*?)<!-- /results -->", text, re.S)
    data_row = block[1].splitlines()[2]  # header, separator, then the first row: edit one of its cells by hand
    changed = block[1].replace(data_row, data_row[:-2] + "9 |", 1)
    assert changed != block[1]
    results.write_text(text.replace(block[1], changed))
    assert render_results.disagreements(tmp_path) == ["docs/RESULTS.md: prune_quality/importance differs from its result"]


def test_every_results_table_of_the_docs_has_a_source():
    """No hand-typed result tables: each table of docs/RESULTS.md and the README's Results sits in a block."""
    for rel in ("docs/RESULTS.md", "README.md"):
        text = (ROOT / rel).read_text()
        if rel == "README.md":
            text = text[text.index("## Results"):text.index("## Families")]
        outside = render_results.TABLE.sub("", text)
        assert not [line for line in outside.splitlines() if line.startswith("|")], rel


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks" / "results").glob("*.json")), ids=lambda p: p.stem)
def test_results_files_say_where_they_come_from(path):
    result = json.loads(path.read_text())
    assert all(field in result for field in FIELDS), [f for f in FIELDS if f not in result]
    assert result["name"] == path.stem and result["command"].split()[0] in ("python", "compactlm")
    assert result["provenance"] == "measured" or result["provenance"].startswith(("measured", "transcribed"))
    for table in result["tables"].values():
        assert all(len(row) == len(table["columns"]) for row in table["rows"])


def test_the_readme_reads_in_five_minutes():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_key_is_documented():
    undocumented = [k.name for k in keys.all_keys() if not k.help]
    assert undocumented == []
    names = {k.name for k in keys.all_keys()}
    assert {"model", "distill.lr", "target.hidden_size", "export.type", "correction.enabled"} <= names
    assert next(k for k in keys.all_keys() if k.name == "train.lr").default == Config().train.lr  # instance defaults


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_lists_the_command_keys(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in keys.keys_for(command):
        assert re.search(rf"^  {re.escape(key.name)} +\[", out, re.M), key.name
    if command == "prune":
        assert "target.hidden_size" in out and "distill.lr" not in out


def test_print_config_prints_what_loads_back(tmp_path, capsys):
    assert main(["prune", "--print-config", "target.hidden_size=384", "distill.lr=0.002", "out_dir=~/x"]) == 0
    printed = capsys.readouterr().out
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    assert yaml.safe_load(printed)["target"]["hidden_size"] == 384
    assert load_config(path) == load_config(None, ["target.hidden_size=384", "distill.lr=0.002", "out_dir=~/x"])
    assert not (tmp_path / "x").exists()  # nothing run, nothing written


def test_eval_is_the_same_command_as_evaluate(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "teacher" in capsys.readouterr().out


@pytest.mark.parametrize("script", sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py")))
def test_benchmark_scripts_import(script):
    """Every benchmark at least imports (names resolve at import; an optional tool it needs may be missing)."""
    try:
        importlib.import_module(script)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("torch_pruning", "modelopt", "llama_cpp"):
            pytest.skip(f"needs {e.name}")
        raise
    except SystemExit as e:  # a script that names the extra it needs when it is missing
        if "not installed" in str(e.code):
            pytest.skip(str(e.code))
        raise
