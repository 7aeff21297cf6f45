"""The package's import layers, so that the next import cycle fails CI instead of waiting for a reader.

Each module may import only from its own layer or the layers below (imports inside functions count too), and
no group of modules may import each other in a circle:

    errors, files, cache, config, keys            the schema and plain utilities
    models/, data, tokenstore, chartok, tasks      models, their records and checkpoints; corpora and tokens
    importance/, pruning/, distill/, metrics,      the method: scores, surgery, the refit, losses, evaluation,
    export, reporting, provenance                  export and reports
    arch_search, inputs, ownership                 what a stage reads and claims; the search
    stages, api                                    one function per stage; prune_to
    pipeline                                       compactlm run
    cli, __main__                                  the command line
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "compactlm"
LAYERS = [
    ("errors", "files", "cache", "config", "keys"),
    ("models", "data", "tokenstore", "chartok", "tasks"),
    ("importance", "pruning", "distill", "metrics", "export", "reporting", "provenance"),
    ("arch_search", "inputs", "ownership"),
    ("stages", "api"),
    ("pipeline",),
    ("cli", "__main__"),
]


def module_name(path: Path) -> str:
    return ".".join(("compactlm", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path) -> set[str]:
    """The compactlm modules `path` imports, anywhere in it (a `from pkg import submodule` names the submodule)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("compactlm"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in MODULES else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("compactlm")}
    return out - {module_name(path)}


def layer(module: str) -> int | None:
    """The layer of a module (by its first name under compactlm); None for the package's lazy front door."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    return next(i for i, names in enumerate(LAYERS) if parts[1] in names)


def test_every_module_has_a_layer():
    assert all(layer(m) is not None for m in MODULES if m != "compactlm")


def test_imports_go_down_the_layers():
    upward = [f"{m} ({layer(m)}) imports {d} ({layer(d)})" for m, path in MODULES.items() if layer(m) is not None
              for d in imports(path) if layer(d) is not None and layer(d) > layer(m)]
    assert upward == []


def test_no_import_cycles():
    graph = {m: {d for d in imports(p) if d in MODULES and d != "compactlm"} for m, p in MODULES.items()}
    # a package's __init__ re-exports its submodules: an edge from a submodule to its own package is not a cycle
    graph = {m: {d for d in ds if not m.startswith(d + ".")} for m, ds in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []
