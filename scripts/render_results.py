"""Render the generated parts of README.md and docs/*.md: results tables and quoted values from
benchmarks/results/*.json, and docs/CONFIG.md's key reference from the config schema.

    python scripts/render_results.py            # rewrite the blocks in place
    python scripts/render_results.py --check    # exit 1, naming each block, when a document disagrees

A table block is written as

    <!-- results: NAME/TABLE -->
    (rendered: the table of benchmarks/results/NAME.json, then a line naming its source)
    <!-- /results -->

a value quoted in prose as `<!-- value: NAME/KEY -->15.0<!-- /value -->` (KEY: one of the result's `values`, or
a dotted path into its `figures` with a format spec, `stages_s.distill:.0f`), and the key reference as
`<!-- keys -->...<!-- /keys -->` (compactlm.keys.markdown()). Only the text between the markers is generated;
everything else in the documents is left as written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCUMENTS = ("README.md", "docs/RESULTS.md", "docs/SIZES.md", "docs/FAMILIES.md", "docs/CONFIG.md")
TABLE = re.compile(r"(<!-- results: ([\w.-]+)/([\w.-]+) -->\n)(.*?)(<!-- /results -->)", re.S)
VALUE = re.compile(r"(<!-- value: ([\w.-]+)/([\w.,:%-]+) -->)(.*?)(<!-- /value -->)", re.S)
KEYS = re.compile(r"(<!-- keys -->\n)(.*?)(<!-- /keys -->)", re.S)


class Missing(Exception):
    pass


def load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise Missing(f"benchmarks/results/{name}.json does not exist")
    return json.loads(path.read_text())


def source_line(result: dict, name: str, document: str) -> str:
    """The line under a table naming its results file (linked from `document`, a path relative to the root)."""
    link = os.path.relpath(f"benchmarks/results/{name}.json", os.path.dirname(document) or ".")
    where = f"commit {result['commit']}, {result['machine']}"
    if result.get("provenance", "measured") != "measured":  # the whole story is in the file
        where = result["provenance"].split(":")[0]
    return f"<sub>Source: [{name}.json]({link}) · `{result['command']}` · {where}</sub>\n"


def render_table(name: str, table_id: str, document: str) -> str:
    result = load(name)
    if table_id not in result.get("tables", {}):
        raise Missing(f"benchmarks/results/{name}.json has no table '{table_id}'")
    table = result["tables"][table_id]
    lines = ["| " + " | ".join(table["columns"]) + " |", "|" + "---|" * len(table["columns"]),
             *("| " + " | ".join(row) + " |" for row in table["rows"])]
    return "\n".join(lines) + "\n\n" + source_line(result, name, document)


def render_value(name: str, key: str) -> str:
    """A value of the result's `values`, or a number inside its `figures` by dotted path with a format spec
    (`stages_s.distill:.0f`; a list's items by index, `rows.2.perplexity`)."""
    result = load(name)
    path, _, spec = key.partition(":")
    if path in result.get("values", {}) and not spec:
        return result["values"][path]
    value = result.get("figures", {})
    for part in path.split("."):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):  # a row of a list
            value = value[int(part)]
            continue
        if not isinstance(value, dict) or part not in value:
            raise Missing(f"benchmarks/results/{name}.json has no value '{path}'")
        value = value[part]
    return format(value, spec) if spec else str(value)


def render_keys() -> str:
    from compactlm import keys

    return keys.markdown()


def render(text: str, document: str) -> str:
    text = TABLE.sub(lambda m: m[1] + render_table(m[2], m[3], document) + m[5], text)
    text = KEYS.sub(lambda m: m[1] + render_keys() + m[3], text)
    return VALUE.sub(lambda m: m[1] + render_value(m[2], m[3]) + m[5], text)


def disagreements(root: Path = ROOT) -> list[str]:
    """Each block of each document whose text differs from what its result renders, as 'FILE: NAME/ID'."""
    out = []
    for rel in DOCUMENTS:
        path = root / rel
        if not path.is_file():
            continue
        text = path.read_text()
        for pattern, render_one in ((TABLE, lambda m: render_table(m[2], m[3], rel)),
                                    (VALUE, lambda m: render_value(m[2], m[3]))):
            for m in pattern.finditer(text):
                try:
                    if m[4] != render_one(m):
                        out.append(f"{rel}: {m[2]}/{m[3]} differs from its result")
                except Missing as e:
                    out.append(f"{rel}: {m[2]}/{m[3]}: {e}")
        out += [f"{rel}: the key reference differs from the schema" for m in KEYS.finditer(text) if m[2] != render_keys()]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a document disagrees")
    args = parser.parse_args()
    if args.check:
        problems = disagreements()
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    for rel in DOCUMENTS:
        path = ROOT / rel
        if path.is_file():
            try:
                new = render(path.read_text(), rel)
            except Missing as e:
                print(f"{rel}: {e}", file=sys.stderr)
                return 1
            if new != path.read_text():
                path.write_text(new)
                print(f"rendered {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
