"""Where relative paths in recipes point.

A relative path is looked up, in order, in the current working directory, the directory of the file
that names it, and the gemma_tune project root (for the bundled configs/, recipes/ and data/). The
first that exists wins and is written into the resolved recipe as an absolute path.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
REMOTE_SCHEMES = ("hf://", "kaggle://")


def is_remote(source: str) -> bool:
    return source.startswith(REMOTE_SCHEMES)


def resolve_existing(entry: str, relative_to: Path | None = None) -> Path | None:
    """The existing path that `entry` names, or None."""
    path = Path(os.path.expanduser(entry))
    if path.is_absolute():
        return path if path.exists() else None
    roots = [Path.cwd()] + ([relative_to] if relative_to else []) + [PROJECT_ROOT]
    for root in roots:
        candidate = root / path
        if candidate.exists():
            return candidate.resolve()
    return None
