"""Every config key with its type, default and meaning, read from the schema itself (`config/schema.py`).

A key's meaning is the comment written with its field: the comment at the end of the field's line and the
comment lines just above it. `compactlm <command> --help` lists the keys a command reads from here, and
`scripts/render_results.py` writes docs/CONFIG.md from here, so neither can drift from the schema.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import tokenize
import typing
from dataclasses import dataclass
from typing import Any

from compactlm.config import loading, schema

# the sections each command reads (top-level keys are shared); `run` reads them all
TOP_LEVEL = ("model", "tokenizer", "data", "out_dir", "seed", "device", "dtype", "memory_gb", "resume",
             "trust_remote_code")
COMMAND_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "score": (TOP_LEVEL, ("dataset", "calib", "importance")),
    "prune": (TOP_LEVEL, ("dataset", "calib", "importance", "target", "prune")),
    "search": (TOP_LEVEL, ("dataset", "calib", "importance", "target", "prune", "search", "distill")),
    "distill": (TOP_LEVEL + ("teacher", "student"), ("dataset", "distill", "eval")),
    "train": (TOP_LEVEL + ("init",), ("dataset", "train")),
    "evaluate": (TOP_LEVEL + ("teacher",), ("dataset", "eval")),
    "export": (("model", "tokenizer", "out", "trust_remote_code"), ("export",)),
    "report": (("out_dir",), ()),
}


@dataclass(frozen=True)
class Key:
    name: str  # dotted, e.g. "distill.lr"
    type: str
    default: Any
    help: str
    choices: tuple = ()


def _comments(cls: type) -> dict[str, str]:
    """{field: its comment} from the class's source: the trailing comment of the field's statement and the
    comment-only lines directly above it."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    comments: dict[int, str] = {}  # line number (1-based) -> comment text
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    out = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, n = [], node.lineno - 1
        while n >= 1 and n in comments and n not in code_lines and lines[n - 1].strip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        trailing = [comments[i] for i in range(node.lineno, node.end_lineno + 1) if i in comments and i in code_lines]
        out[node.target.id] = " ".join(above + trailing)
    return out


def _type_name(tp: Any) -> str:
    text = loading._type_name(tp)
    return text.replace("NoneType", "None").replace(" | None", " or unset")


@functools.lru_cache(maxsize=None)
def all_keys() -> tuple[Key, ...]:
    """Every key of the schema, in the order the dataclasses define them (sections after the top level)."""
    def walk(cls: type, default_obj: Any, prefix: str) -> list[Key]:
        hints = typing.get_type_hints(cls, vars(schema))
        docs = {}
        for klass in reversed(cls.__mro__):  # a subclass's comments override its base's
            if dataclasses.is_dataclass(klass):
                docs |= _comments(klass)
        keys, sections = [], []
        for f in dataclasses.fields(cls):
            value = getattr(default_obj, f.name)
            if dataclasses.is_dataclass(value):
                sections.append((hints[f.name], value, f"{prefix}{f.name}."))
                continue
            keys.append(Key(f"{prefix}{f.name}", _type_name(hints[f.name]), value, docs.get(f.name, ""),
                            tuple(f.metadata.get("choices", ()))))
        for sub_cls, sub_default, sub_prefix in sections:
            keys += walk(sub_cls, sub_default, sub_prefix)
        return keys

    return tuple(walk(schema.Config, schema.Config(), ""))


def keys_for(command: str) -> list[Key]:
    """The keys `command` reads (every key for `run`)."""
    if command == "run":
        return list(all_keys())
    top, sections = COMMAND_KEYS[command]
    return [k for k in all_keys() if k.name in top or k.name.split(".")[0] in sections]


def show_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(show_default(v) for v in value) + "]"
    return str(value)


def describe(key: Key) -> str:
    """One key's meaning, with its choices when it has a fixed set."""
    text = key.help
    if key.choices:
        text += ("; " if text else "") + "one of " + ", ".join(show_default(c) for c in dict.fromkeys(key.choices))
    return text


def help_epilog(command: str) -> str:
    """The keys of `command` for its --help: name, default and meaning, one key per line."""
    rows = keys_for(command)
    width = max(len(k.name) for k in rows)
    lines = ["keys (key=value on the command line, or in --config YAML; full reference: docs/CONFIG.md):"]
    for k in rows:
        lines.append(f"  {k.name:<{width}}  [{show_default(k.default)}]  {describe(k)}".rstrip())
    return "\n".join(lines)


def markdown() -> str:
    """The key reference of docs/CONFIG.md: one table per section."""
    out, section = [], None
    for k in all_keys():
        here = k.name.split(".")[0] if "." in k.name else ""
        if here != section:
            section = here
            title = f"`{here}.*`" if here else "Top level"
            out += ["", f"### {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        meaning = describe(k).replace("|", "\\|")
        out.append(f"| `{k.name}` | {_type_name_md(k.type)} | `{show_default(k.default)}` | {meaning} |")
    return "\n".join(out[1:]) + "\n"


def _type_name_md(text: str) -> str:
    return text.replace("|", "\\|")
