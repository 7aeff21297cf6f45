"""Build the python-docs snapshot that compactlm ships (src/compactlm/corpora/python-docs.json.xz): pydoc topics
then standard-library docstrings (modules, public classes, their methods, functions) of the running CPython,
deduplicated, those shorter than 200 characters dropped.

    python scripts/build_python_docs.py          # writes the snapshot; prints its sha256 for data/corpora.py

The corpus used to be built at run time from the running interpreter, so every perplexity changed with the
Python version; the snapshot fixes it. It was built once from CPython 3.11.7 in a process that had imported
transformers, as every compactlm command does first: transformers adds `info_once` and `warning_once` to `logging.Logger`,
whose two docstrings are part of the corpus that every result in the README was measured on. Rebuilding it changes every
result measured on `data=python-docs`: update data.PYTHON_DOCS_SHA256 and rerun the benchmarks.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import lzma
import pkgutil
import sys
import types
import warnings
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "compactlm" / "corpora" / "python-docs.json.xz"
MIN_DOC_CHARS = 200  # shorter topics/docstrings are dropped
# Never imported for python-docs: GUI, side effects on import or on the terminal, tests, slow shims.
_SKIP_MODULES = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "test", "tests",
    "idle_test", "distutils", "readline", "rlcompleter", "pydoc_data", "ensurepip", "venv", "site",
    "sitecustomize", "usercustomize",
})


def python_docs() -> tuple[str, ...]:
    """pydoc topics then stdlib docstrings (modules, public classes, their methods, functions), deduplicated."""
    from pydoc_data.topics import topics

    docs = [topics[key] for key in sorted(topics)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seen: set[int] = set()
        for module in _stdlib_modules():
            docs.extend(_module_docstrings(module, seen))
    unique = dict.fromkeys(doc.strip() for doc in docs)
    return tuple(doc for doc in unique if len(doc) >= MIN_DOC_CHARS)


def _stdlib_modules() -> list[types.ModuleType]:
    """Public stdlib modules and submodules that import cleanly, in sorted depth-first name order."""
    modules = []

    def visit(name: str) -> None:
        if any(part.startswith("_") or part in _SKIP_MODULES for part in name.split(".")):
            return
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                module = importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - platform-specific modules fail here (winreg, ...); skip
            return
        modules.append(module)
        for sub in sorted(info.name for info in pkgutil.iter_modules(getattr(module, "__path__", []) or [])):
            visit(f"{name}.{sub}")

    for name in sorted(sys.stdlib_module_names):
        visit(name)
    return modules


def _module_docstrings(module: types.ModuleType, seen: set[int]) -> list[str]:
    """Docstrings of a module, its public classes (and their methods) and functions not seen before."""
    docs = []

    def add(obj: object) -> None:
        if id(obj) not in seen:
            seen.add(id(obj))
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                docs.append(inspect.cleandoc(doc))

    add(module)
    namespace = vars(module)
    for name in sorted(namespace):
        obj = namespace[name]
        if name.startswith("_"):
            continue
        if inspect.isclass(obj):
            add(obj)
            members = vars(obj)
            for member in sorted(members):
                attr = members[member]
                if isinstance(attr, (staticmethod, classmethod)):
                    attr = attr.__func__
                if inspect.isroutine(attr) or isinstance(attr, property):
                    add(attr)
        elif inspect.isroutine(obj):
            add(obj)
    return docs


def main() -> None:
    import transformers  # noqa: F401 - imported first by every compactlm command (see the module docstring)

    raw = json.dumps(list(python_docs()), ensure_ascii=False).encode()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(lzma.compress(raw, preset=9))
    print(f"{OUT}: {len(raw):,} bytes of JSON, sha256 {hashlib.sha256(raw).hexdigest()} (Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
