"""Atomic directory writes: build the whole directory beside its destination, then rename it into place.

`atomic_dir(out_dir, force)` first deletes the temporaries that dead processes left beside `out_dir`
(`gemma_tune.tempfiles.remove_stale`: an export killed mid-way), then yields an empty temporary
directory `tempfiles.temp_path(out_dir)` = `.{name}.tmp-{pid}-{token}` in out_dir's parent (same
filesystem, so the final `os.replace` is atomic). On success every entry in it gets the permissions of
an ordinary saved file under the process umask (0o666 & ~umask for files, 0o777 & ~umask for
directories: some writers, such as safetensors, create files 0600) and the temporary directory becomes
`out_dir`; on any exception it is deleted and `out_dir` is left as it was, so a half-written export can
never look complete. An existing non-empty `out_dir` is refused (UserError) unless `force`, in which case
it is moved aside (`.{name}.old-{pid}-{token}`) and deleted only after the new one is in place.

`check_destination(out_dir, source_dir)` refuses an output that would replace or nest with what the model
is read from (see its docstring); call it before loading the model.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from gemma_tune.errors import UserError
from gemma_tune.tempfiles import remove_stale, temp_path

RUN_EXPORTS_DIR = "exports"


def check_writable(out_dir: Path, force: bool) -> None:
    """UserError when `out_dir` exists and is a file, or is a non-empty directory and `force` is off."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError("the output path exists and is not a directory", where=str(out_dir))
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UserError("the output directory is not empty; choose another or pass --force (force=True) "
                        "to replace it", where=str(out_dir))


def check_destination(out_dir: str | Path, source_dir: str | Path) -> None:
    """UserError when exporting into `out_dir` would replace or nest with the model's source.

    `source_dir` is the local directory the model is read from (`checkpoints.sources.resolve_source`).
    Refused: an `out_dir` that is, contains or lies inside `source_dir`; and, when `source_dir` is a
    gemma_tune run directory or lies inside one, an `out_dir` that is, contains or lies inside that run
    directory — except a directory below `RUN/exports/` (e.g. `RUN/exports/peft`), the run's own place
    for exports, that is not inside the source. Paths are compared resolved (symlinks and `..` followed).
    """
    from gemma_tune.loading import enclosing_run_dir

    out, source = Path(out_dir).expanduser().resolve(), Path(source_dir).expanduser().resolve()
    if out == source or source.is_relative_to(out):
        what = "is" if out == source else "contains"
        raise UserError(f"the output directory {what} the directory the model is loaded from ({source}); exporting "
                        "there would replace the source: choose a directory outside it", where=str(out_dir))
    run = enclosing_run_dir(source)
    if run is not None:
        exports = run / RUN_EXPORTS_DIR
        if out != exports and out.is_relative_to(exports) and (source == run or not out.is_relative_to(source)):
            return
    if out.is_relative_to(source):
        raise UserError(f"the output directory lies inside the directory the model is loaded from ({source}); "
                        "choose a directory outside it", where=str(out_dir))
    if run is not None and (out.is_relative_to(run) or run.is_relative_to(out)):
        raise UserError(f"the output directory would replace or mix with the run directory {run} (its checkpoints, "
                        f"recipe and logs); export below {exports}/ (e.g. {exports / 'peft'}) or outside the run",
                        where=str(out_dir))


def process_umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_permissions(root: Path) -> None:
    """Give `root` and everything below it the permissions of ordinary saved files and directories
    (symbolic links, and what they point to, are left alone)."""
    mask = process_umask()
    root.chmod(0o777 & ~mask)
    for directory, dirs, files in os.walk(root):
        for name, mode in [(d, 0o777) for d in dirs] + [(f, 0o666) for f in files]:
            path = Path(directory, name)
            if not path.is_symlink():
                path.chmod(mode & ~mask)


@contextmanager
def atomic_dir(out_dir: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces `out_dir` when the block completes without error."""
    out_dir = Path(out_dir).absolute()
    check_writable(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out_dir.parent)
    tmp = temp_path(out_dir)
    tmp.mkdir()
    try:
        yield tmp
        share_permissions(tmp)
        old = None
        if out_dir.exists():
            old = temp_path(out_dir, "old")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
