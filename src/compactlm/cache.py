"""Where compactlm keeps what it makes once and reuses: converted built-in models, downloaded corpora and token
stores, under COMPACTLM_CACHE (default ~/.cache/compactlm); token stores alone can move with COMPACTLM_TOKENS."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root (COMPACTLM_CACHE, default ~/.cache/compactlm)."""
    return Path(os.environ.get("COMPACTLM_CACHE", Path.home() / ".cache" / "compactlm"))


def tokens_dir() -> Path:
    """Token stores (COMPACTLM_TOKENS, default <cache>/tokens)."""
    return Path(os.environ.get("COMPACTLM_TOKENS") or cache_dir() / "tokens")
