"""Property test of the config schema: any value of any key's type, or of a wrong type, is either refused by
validation in one line, or accepted by `run --dry-run` (which loads nothing); never a traceback. What is accepted
is finite and survives the round trip through a run's compactlm.yaml (or a resume could not read it back)."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from compactlm.cli import main  # noqa: E402
from compactlm.config import Config, load_config, save_config, to_dict  # noqa: E402


def _fields(cls: type, prefix: str = "") -> dict[str, tuple]:
    """{dotted key: (annotation, choices)} of every leaf key of the schema."""
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= _fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out[prefix + f.name] = (hints[f.name], f.metadata.get("choices"))
    return out


FIELDS = _fields(Config)
KEYS = sorted(FIELDS)
EDGES = {float: st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e-30, 1e308, 0.5]),
         int: st.sampled_from([-1, 0, 1, 2**31, 2**32, 2**63, 2**64, -(2**63) - 1]), bool: st.booleans(),
         str: st.sampled_from(["", "x", "~", "/nonexistent/x", "cuda:9", "gpu"])}


def _typed(key: str):
    """Values of the key's own type, edge cases first (NaN, infinity, huge and negative integers, bad choices)."""
    tp, choices = FIELDS[key]
    if choices:
        return st.sampled_from([*choices, "bogus"])
    kinds = [a for a in (typing.get_args(tp) or (tp,)) if a in EDGES] or [str]
    edge = st.one_of(*(EDGES[k] for k in kinds))
    return st.one_of(edge, st.lists(edge, max_size=3)) if "tuple" in str(tp) else edge
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["auto", "cpu", "cuda:0", "float32", "l2_mean", "all", "0.5", "1e-3", "~/x", "70M", ""]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=4), SCALARS, max_size=2))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_value_of_any_key_is_refused_in_one_line_or_accepted(data, tmp_path, capsys):
    key = data.draw(st.sampled_from(KEYS), label="key")
    value = data.draw(st.one_of(_typed(key), VALUES), label="value")
    override = f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
    args = [f"out_dir={tmp_path / 'run'}", "target.hidden_size=0.5", override]
    code = main(["run", "--dry-run", *args])
    err = capsys.readouterr().err.strip()
    assert code in (0, 2), (override, err)
    if code == 2:
        assert len(err.splitlines()) == 1 and err.startswith("compactlm run: error: "), (override, err)
        return
    cfg = load_config(None, args)
    assert all(_finite(v) for v in _leaves(to_dict(cfg))), override
    save_config(cfg, tmp_path / "compactlm.yaml")
    assert load_config(tmp_path / "compactlm.yaml") == cfg, override


def _leaves(tree):
    for value in tree.values() if isinstance(tree, dict) else tree:
        if isinstance(value, (dict, list)):
            yield from _leaves(value)
        else:
            yield value


def _finite(value) -> bool:
    if isinstance(value, float):
        return value == value and abs(value) != float("inf")
    return not isinstance(value, int) or -(2**63) < value < 2**63
