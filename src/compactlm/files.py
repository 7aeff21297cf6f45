"""Temp files and folders that are renamed into place get the permissions an ordinary open() or mkdir() gives.

`tempfile.mkstemp` and `mkdtemp` create 0600 files and 0700 folders whatever the umask, and a rename keeps them:
GGUF files, token stores and checkpoints would be private to their creator on a shared machine.
"""

from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    """This process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_if_created(path: str | Path) -> Path:
    """chmod `path` to what the umask gives a new file (0666 & ~umask) or folder (0777 & ~umask); returns it."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask())
    return path
