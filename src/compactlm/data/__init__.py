"""Text in, token rows out: `corpora` (the built-in python-docs snapshot, downloaded data sets), `readers`
(documents from built-ins, local files and Hugging Face datasets) and `splits` (hash split, tokenise, pack,
batch). The names below are the package's interface; tests that change a module constant (such as
`splits.TOKENIZE_DOCS`) patch the module that reads it."""

from compactlm.data.corpora import (
    BUILTIN_DATA,
    DOWNLOAD_TIMEOUT_S,
    DOWNLOADS,
    PYTHON_DOCS,
    PYTHON_DOCS_FILE,
    PYTHON_DOCS_SHA256,
    Download,
    cached_download,
    download,
)
from compactlm.data.readers import FILE_SUFFIXES, TXT_DOC_CHARS, iter_texts, load_texts
from compactlm.data.splits import HASH_BUCKETS, Splits, assign_val, batched, batches, doc_hash, make_splits

__all__ = ["BUILTIN_DATA", "DOWNLOADS", "DOWNLOAD_TIMEOUT_S", "Download", "FILE_SUFFIXES", "HASH_BUCKETS",
           "PYTHON_DOCS", "PYTHON_DOCS_FILE", "PYTHON_DOCS_SHA256", "Splits", "TXT_DOC_CHARS", "assign_val",
           "batched", "batches", "cached_download", "doc_hash", "download", "iter_texts", "load_texts", "make_splits"]
