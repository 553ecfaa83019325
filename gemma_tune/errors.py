"""User-facing errors.

A `UserError` is a mistake in something the user gave us (a recipe, a data row, a checkpoint path):
the CLI prints its message alone, without a traceback, and exits with code 2. Its message names
where the mistake is (`where`: a file, optionally with a key path or row number) and what was expected.
"""

from __future__ import annotations

import errno

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


ENVIRONMENT_HINTS = {
    errno.ENOSPC: "free some space (old runs, checkpoints, caches) or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EROFS: "choose a location on a writable file system",
    errno.EACCES: "choose a location you can write to",
    errno.EPERM: "choose an ordinary directory you can write to",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
    errno.EEXIST: "the path exists and is not a directory: choose another path",
    errno.EISDIR: "a directory is in the way of a file: choose another path",
}


def environment_error(e: OSError, setting: str | None = None) -> UserError | None:
    """A UserError for an OSError the user can fix in their environment (a full or read-only disk, a
    path that is a file, no permission), naming the path; None for any other OSError."""
    hint = ENVIRONMENT_HINTS.get(e.errno)
    if hint is None:
        return None
    path = e.filename or "?"
    also = f" (set by {setting})" if setting else ""
    return UserError(f"{e.strerror or type(e).__name__}: {hint}{also}", where=str(path))
