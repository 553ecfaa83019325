"""One process at a time in a run directory: an exclusive `flock` on `RUN_DIR/.lock`.

The lock file holds who took it (pid, host, start time, command), so a second run on the same
directory can say who holds it. The operating system releases the lock when its holder exits in any
way (SIGKILL included), so a lock is never stale; the file itself may stay. POSIX only (fcntl).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from gemma_tune.errors import UserError

LOCK_FILE = ".lock"


class RunDirBusy(UserError):
    """Another live process holds the run directory."""


class RunLock:
    """The exclusive lock of one run directory, held from `acquire()` to `release()`."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise RunDirBusy naming its holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirBusy(f"another run is using this run directory ({self.holder()}); wait for it to end, "
                             "stop it, or choose another output_dir=…", where=str(self.path.parent)) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "command": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd

    def holder(self) -> str:
        """Who holds (or last held) the lock, in words."""
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            return (f"pid {info['pid']} on {info['host']}, since {info['started']}: "
                    f"{' '.join(map(str, info['command']))}")
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not said who it is yet"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
