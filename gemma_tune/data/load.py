"""Reading data sources into Hugging Face `datasets.Dataset`s.

A source is a local file (jsonl/json/parquet/csv), a directory of such files (all of one kind), or a
hub dataset (`hf://ORG/NAME` or `ORG/NAME`, with `split` and `subset`). `columns: {expected: in_data}`
renames the data's columns to the names the format expects. `carve_eval` splits an eval share off
train, deterministically from the seed.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from gemma_tune.config.paths import resolve_existing
from gemma_tune.errors import DataError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _local_files(path: Path) -> tuple[str, list[str]]:
    """(builder name, files) for a local file or a directory of one kind of data file."""
    files = sorted(p for p in path.rglob("*") if p.suffix in BUILDERS) if path.is_dir() else [path]
    if not files:
        raise DataError(f"no data files in this directory (expected {', '.join(BUILDERS)})", where=str(path))
    kinds = {BUILDERS.get(p.suffix) for p in files}
    if None in kinds:
        raise DataError(f"unknown data file type {path.suffix!r}; expected one of {', '.join(BUILDERS)}",
                        where=str(path))
    if len(kinds) > 1:
        raise DataError(f"mixed data file types in one directory: {sorted(kinds)}", where=str(path))
    return kinds.pop(), [str(p) for p in files]


def load_source(source, cache_dir: str | None = None) -> datasets.Dataset:
    """The rows of a `DataSource` (recipe `data.train` / `data.eval`) with its columns remapped."""
    entry = source.path
    local = resolve_existing(entry) if not entry.startswith("hf://") else None
    try:
        if local is not None:
            builder, files = _local_files(local)
            ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
        else:
            name = entry[len("hf://"):] if entry.startswith("hf://") else entry
            if not entry.startswith("hf://") and (name.count("/") != 1 or Path(name).suffix in BUILDERS):
                raise DataError("no such data file or directory (and not a hub name ORG/NAME)", where=entry)
            ds = datasets.load_dataset(name, source.subset, split=source.split or "train", cache_dir=cache_dir)
    except DataError:
        raise
    except Exception as e:  # unreadable JSON/CSV, missing hub dataset or split, offline
        raise DataError(f"cannot load data ({type(e).__name__}: {e})", where=entry) from e
    return remap_columns(ds, source.columns, where=entry)


def remap_columns(ds: datasets.Dataset, columns: dict[str, str], where: str) -> datasets.Dataset:
    """Rename `{expected: in_data}` columns; a missing `in_data` column is a DataError."""
    missing = [src for src in columns.values() if src not in ds.column_names]
    if missing:
        raise DataError(f"columns {missing} named in `columns:` are not in the data "
                        f"(it has {ds.column_names})", where=where)
    renames = {src: dst for dst, src in columns.items() if src != dst}
    clashes = [dst for dst in renames.values() if dst in ds.column_names and dst not in renames]
    if clashes:
        ds = ds.remove_columns(clashes)
    return ds.rename_columns(renames) if renames else ds


def carve_eval(ds: datasets.Dataset, fraction: float, seed: int, where: str):
    """(train, eval) with `fraction` of the rows (at least one) in eval, chosen by `seed`."""
    if len(ds) < 2:
        raise DataError(f"eval_fraction needs at least 2 rows, the data has {len(ds)}", where=where)
    n_eval = max(1, round(len(ds) * fraction))
    split = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return split["train"], split["test"]
