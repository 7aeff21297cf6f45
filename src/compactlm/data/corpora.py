"""The built-in corpora: the python-docs snapshot shipped with the package, and data sets downloaded once into
the cache (checked against their sha256)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import lzma
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from compactlm.cache import cache_dir
from compactlm.errors import CompactLMError
from compactlm.files import as_if_created

log = logging.getLogger(__name__)

PYTHON_DOCS = "python-docs"
# The python-docs corpus: a fixed snapshot shipped with the package (scripts/build_python_docs.py says how it was
# built), the same on every machine and Python; the sha256 of its JSON text, recorded in every run's outputs.
PYTHON_DOCS_FILE = Path(__file__).parents[1] / "corpora" / "python-docs.json.xz"
PYTHON_DOCS_SHA256 = "125f3db8f1b48c3c8663050360dae13c2c1f50630636814bee71130378130ed8"


@dataclass(frozen=True)
class Download:
    """A built-in data set fetched once into the cache: a UTF-8 .txt file at `url`."""

    url: str
    sha256: str
    size: int  # bytes: the progress bar's total when the server sends no Content-Length


DOWNLOADS = {
    "tinyshakespeare": Download(
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", 1_115_394),
}
BUILTIN_DATA = (PYTHON_DOCS, *DOWNLOADS)  # data names that are neither paths nor hub datasets
DOWNLOAD_TIMEOUT_S = 60


def one_line(error: Exception, limit: int = 200) -> str:
    """First line of an exception's message, shortened."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- downloaded data sets

def cached_download(name: str) -> Path:
    """The cached file of built-in data set `name`, downloaded on first use."""
    record = DOWNLOADS[name]
    dest = cache_dir() / "data" / f"{name}.txt"
    if not dest.is_file():
        log.info("downloading data set %s from %s to %s", name, record.url, dest)
        download(record.url, dest, record.sha256, size=record.size)
    return dest


def download(url: str, dest: Path, sha256: str, *, size: int | None = None,
             opener: Callable = urllib.request.urlopen, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Fetch `url` into a temp file beside `dest`, renamed to `dest` only when its sha256 matches."""
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp, digest = as_if_created(name), hashlib.sha256()
    try:
        with open(fd, "wb") as out:
            try:
                with opener(url, timeout=timeout) as response:
                    length = getattr(response, "headers", {}).get("Content-Length")
                    with tqdm(total=int(length) if length else size, unit="B", unit_scale=True,
                              desc=dest.name) as bar:
                        while chunk := response.read(1 << 16):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
            except (OSError, ValueError) as e:  # URLError, timeouts and refused connections are OSErrors
                raise CompactLMError(f"cannot download {url} ({one_line(e, 120)}): offline? "
                                     "pass data=FILE with a local copy of it") from None
        if digest.hexdigest() != sha256:
            raise CompactLMError(f"download of {url} is corrupt: sha256 {digest.hexdigest()} is not the expected "
                                 f"{sha256}; retry, or pass data=FILE with a local copy of it")
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# ---------------------------------------------------------------- python-docs

def python_docs() -> list[str]:
    """A copy of the cached python-docs corpus (so callers may mutate it)."""
    return list(_python_docs_cached())


@functools.lru_cache(maxsize=1)
def _python_docs_cached() -> tuple[str, ...]:
    """The shipped python-docs snapshot (scripts/build_python_docs.py), its checksum verified."""
    try:
        raw = lzma.decompress(PYTHON_DOCS_FILE.read_bytes())
    except (OSError, lzma.LZMAError) as e:
        raise CompactLMError(f"python-docs: cannot read the shipped corpus {PYTHON_DOCS_FILE}: {e}") from None
    if hashlib.sha256(raw).hexdigest() != PYTHON_DOCS_SHA256:
        raise CompactLMError(f"python-docs: {PYTHON_DOCS_FILE} is not the shipped snapshot (sha256 differs): reinstall")
    return tuple(json.loads(raw))

