"""Where relative paths in recipes point, and where the files gemma_tune ships live.

`BUNDLED` is the package's own data directory (`gemma_tune/bundled/`, found with `importlib.resources`,
so it is the same in a checkout, an editable install and a wheel): model presets (`configs/models/`),
data parts (`configs/data/`), the runnable recipes (`recipes/`) and the tiny tokenizer, model and data
the quickstarts use (`data/`). A checkout also shows them at its top level (`configs`, `recipes` and
`data` are links into `gemma_tune/bundled/`).

A relative path is looked up, in order, in the current working directory, the directory of the file
that names it, and `BUNDLED`. The first that exists wins and is written into the resolved recipe as an
absolute path.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

BUNDLED = Path(str(resources.files("gemma_tune") / "bundled"))
REMOTE_SCHEMES = ("hf://", "kaggle://")


def is_remote(source: str) -> bool:
    return source.startswith(REMOTE_SCHEMES)


def resolve_existing(entry: str, relative_to: Path | None = None) -> Path | None:
    """The existing path that `entry` names, or None."""
    path = Path(os.path.expanduser(entry))
    if path.is_absolute():
        return path if path.exists() else None
    roots = [Path.cwd()] + ([relative_to] if relative_to else []) + [BUNDLED]
    for root in roots:
        candidate = root / path
        if candidate.exists():
            return candidate.resolve()
    return None
