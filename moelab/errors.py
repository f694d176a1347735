"""Exceptions that the CLI turns into one clear line (no traceback unless --debug)."""


class MoelabError(Exception):
    """A user-facing error: the message names the bad input and the fix."""


class ConfigError(MoelabError, ValueError):
    """A config field holds a bad value. Subclasses ValueError so callers can catch either."""

    def __init__(self, field: str, value: object, fix: str):
        self.field, self.value, self.fix = field, value, fix
        super().__init__(f"{field}={value!r}: {fix}")


class CheckpointError(MoelabError, ValueError):
    """A checkpoint or weight file is missing, truncated or does not match its config."""


class DataError(MoelabError, ValueError):
    """A corpus path, data file or record is missing, empty, malformed or not UTF-8."""
