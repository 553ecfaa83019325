"""Atomic directory writes: build the whole directory beside its destination, then rename it into place.

`atomic_dir(out_dir, force)` yields an empty temporary directory `.{name}.tmp-XXXX` in out_dir's parent
(same filesystem, so the final `os.replace` is atomic). On success the temporary directory becomes
`out_dir`; on any exception it is deleted and `out_dir` is left as it was, so a half-written export can
never look complete. An existing non-empty `out_dir` is refused (UserError) unless `force`, in which case
it is moved aside and deleted only after the new one is in place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from gemma_tune.errors import UserError


def check_writable(out_dir: Path, force: bool) -> None:
    """UserError when `out_dir` exists and is a file, or is a non-empty directory and `force` is off."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError("the output path exists and is not a directory", where=str(out_dir))
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UserError("the output directory is not empty; choose another or pass --force (force=True) "
                        "to replace it", where=str(out_dir))


@contextmanager
def atomic_dir(out_dir: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces `out_dir` when the block completes without error."""
    out_dir = Path(out_dir).absolute()
    check_writable(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; an export is meant to be shared
    try:
        yield tmp
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
