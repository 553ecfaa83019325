"""Temporary files and directories of atomic writes, and the removal of those a dead process left.

Every temporary name is `.{name}.{kind}-{pid}-{token}` beside its destination (same filesystem, so the
final `os.replace` is atomic): `kind` says what it is (`tmp` being written, `old` a replaced version
waiting to be deleted), `pid` the process that owns it. A process killed with SIGKILL, or one that hit a
full disk, leaves such entries behind; `remove_stale(directory)` deletes those whose owner is no longer
alive, and never one of a live process (which may still be writing it).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


def temp_path(destination: Path, kind: str = "tmp") -> Path:
    """A fresh temporary path beside `destination`, owned by this process."""
    destination = Path(destination)
    return destination.with_name(f".{destination.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


@contextmanager
def atomic_file(destination: Path) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces `destination` when the block completes, and is
    removed if it fails: `destination` is never half-written."""
    tmp = temp_path(destination)
    try:
        yield tmp
        os.replace(tmp, destination)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (on this machine)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def remove_stale(directory: Path) -> list[Path]:
    """Delete the temporary entries in `directory` (not below it) whose owning process is dead; returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        match = TEMP_NAME.match(entry.name)
        if match is None or pid_alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
