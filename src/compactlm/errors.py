"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class CompactLMError(Exception):
    """A user-facing error: bad config key, bad file, impossible target. The message is one line."""
