"""User-facing errors.

A `UserError` is a mistake in something the user gave us (a recipe, a data row, a checkpoint path):
the CLI prints its message alone, without a traceback, and exits with code 2. Its message names
where the mistake is (`where`: a file, optionally with a key path or row number) and what was expected.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error in user input, reported as `where: message` with exit code 2."""

    def __init__(self, message: str, where: str | None = None):
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class ConfigError(UserError):
    """A recipe or config file that does not validate."""


class DataError(UserError):
    """A data file or row that does not fit its declared format."""


class CheckpointError(UserError):
    """A checkpoint or weights source that is missing, unreadable or does not match the architecture."""
