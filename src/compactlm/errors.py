"""The one exception type the CLI turns into a one-line error and a non-zero exit, and the JSON reader that
names the file it could not read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class CompactLMError(Exception):
    """A user-facing error: bad config key, bad file, impossible target. The message is one line."""


def read_json(path: str | Path) -> Any:
    """A JSON file's content; one line naming the file when it is missing, not UTF-8 or not JSON (a torn write,
    a hand edit) instead of a decoder's traceback."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CompactLMError(f"{path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompactLMError(f"{path} is not valid JSON ({e}): it may be torn or edited; remove it and "
                             "rerun the stage that writes it") from None
