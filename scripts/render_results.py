"""Render the results tables and quoted values of README.md and docs/*.md from benchmarks/results/*.json.

    python scripts/render_results.py            # rewrite the blocks in place
    python scripts/render_results.py --check    # exit 1, naming each block, when a document disagrees

A table block is written as

    <!-- results: NAME/TABLE -->
    (rendered: the table of benchmarks/results/NAME.json, then a line naming its source)
    <!-- /results -->

and a value quoted in prose as `<!-- value: NAME/KEY -->15.0<!-- /value -->`. Only the text between the
markers is generated; everything else in the documents is left as written.
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
DOCUMENTS = ("README.md", "docs/RESULTS.md", "docs/SIZES.md", "docs/FAMILIES.md")
TABLE = re.compile(r"(<!-- results: ([\w.-]+)/([\w.-]+) -->\n)(.*?)(<!-- /results -->)", re.S)
VALUE = re.compile(r"(<!-- value: ([\w.-]+)/([\w.-]+) -->)(.*?)(<!-- /value -->)", re.S)


class Missing(Exception):
    pass


def load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise Missing(f"benchmarks/results/{name}.json does not exist")
    return json.loads(path.read_text())


def source_line(result: dict, name: str, document: Path) -> str:
    link = os.path.relpath(RESULTS / f"{name}.json", document.parent)
    where = f"commit {result['commit']}, {result['machine']}"
    if result.get("provenance", "measured") != "measured":  # the whole story is in the file
        where = result["provenance"].split(":")[0]
    return f"<sub>Source: [{name}.json]({link}) · `{result['command']}` · {where}</sub>\n"


def render_table(name: str, table_id: str, document: Path) -> str:
    result = load(name)
    if table_id not in result.get("tables", {}):
        raise Missing(f"benchmarks/results/{name}.json has no table '{table_id}'")
    table = result["tables"][table_id]
    lines = ["| " + " | ".join(table["columns"]) + " |", "|" + "---|" * len(table["columns"]),
             *("| " + " | ".join(row) + " |" for row in table["rows"])]
    return "\n".join(lines) + "\n\n" + source_line(result, name, document)


def render_value(name: str, key: str) -> str:
    result = load(name)
    if key not in result.get("values", {}):
        raise Missing(f"benchmarks/results/{name}.json has no value '{key}'")
    return result["values"][key]


def render(text: str, document: Path) -> str:
    text = TABLE.sub(lambda m: m[1] + render_table(m[2], m[3], document) + m[5], text)
    return VALUE.sub(lambda m: m[1] + render_value(m[2], m[3]) + m[5], text)


def disagreements(root: Path = ROOT) -> list[str]:
    """Each block of each document whose text differs from what its result renders, as 'FILE: NAME/ID'."""
    out = []
    for rel in DOCUMENTS:
        path = root / rel
        if not path.is_file():
            continue
        text = path.read_text()
        for pattern, render_one in ((TABLE, lambda m: render_table(m[2], m[3], path)),
                                    (VALUE, lambda m: render_value(m[2], m[3]))):
            for m in pattern.finditer(text):
                try:
                    if m[4] != render_one(m):
                        out.append(f"{rel}: {m[2]}/{m[3]} differs from its result")
                except Missing as e:
                    out.append(f"{rel}: {m[2]}/{m[3]}: {e}")
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
                new = render(path.read_text(), path)
            except Missing as e:
                print(f"{rel}: {e}", file=sys.stderr)
                return 1
            if new != path.read_text():
                path.write_text(new)
                print(f"rendered {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
