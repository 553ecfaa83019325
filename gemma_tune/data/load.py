"""Reading data sources into Hugging Face `datasets.Dataset`s.

A source is a local file (jsonl/json/parquet/csv), a directory of such files (all of one kind), or a
hub dataset (`hf://ORG/NAME` or `ORG/NAME`, with `split` and `subset`). `columns: {expected: in_data}`
renames the data's columns to the names the format expects. `carve_eval` splits an eval share off
train, deterministically from the seed.

Image columns (the `datasets` Image feature, also inside lists and structs) are read undecoded, as
`{"bytes", "path"}` dicts: pixels are decoded per batch (image_batches.py), never for the whole dataset.
Image paths in the data are relative to `image_base_dir(source)`: the data file's directory (a data
directory itself), None for hub datasets.

Local data is checked before `datasets` reads it: an empty file (no bytes, or only whitespace) is a
DataError naming it; in a directory, files are found through symbolic links too (each real file and
directory once), and nothing found may lead outside the directory: a data file or sub-directory whose
resolved path is outside is a DataError naming the link. When the JSON builder fails, the files are
scanned for the first syntax error, reported as `file:line`.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import datasets

from gemma_tune.config.paths import resolve_existing
from gemma_tune.errors import DataError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _directory_files(top: Path) -> list[Path]:
    """The data files under `top` by their real paths, in name order, each once however many links lead to it.

    Symbolic links are followed, and none may lead outside `top`: a link to a data file or to a directory
    whose real path is outside is a DataError naming the link and its target.
    """
    root = top.resolve()

    def inside(path: Path) -> Path:
        real = path.resolve()
        if not real.is_relative_to(root):
            raise DataError(f"this symbolic link leads to {real}, outside the dataset directory {root}; data "
                            "paths never leave their directory: copy the data in, or name it in the recipe's "
                            "data path", where=str(path))
        return real

    files, seen = set(), {root}
    for folder, dirs, names in os.walk(top, followlinks=True):
        kept = []
        for name in sorted(dirs):
            real = inside(Path(folder) / name)
            if real not in seen:  # each directory once: no duplicates, no loops
                seen.add(real)
                kept.append(name)
        dirs[:] = kept
        files.update(inside(Path(folder) / name) for name in names if Path(name).suffix in BUILDERS)
    return sorted(files)


def _is_empty(path: Path) -> bool:
    """Whether `path` holds no bytes, or only whitespace."""
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                if chunk.strip():
                    return False
    except OSError as e:
        raise DataError(f"cannot read this data file ({e.strerror or e})", where=str(path)) from e
    return True


def _local_files(path: Path) -> tuple[str, list[str]]:
    """(builder name, files) for a local file or a directory of one kind of data file."""
    files = _directory_files(path) if path.is_dir() else [path]
    if not files:
        raise DataError(f"no data files in this directory (expected {', '.join(BUILDERS)})", where=str(path))
    kinds = {BUILDERS.get(p.suffix) for p in files}
    if None in kinds:
        raise DataError(f"unknown data file type {path.suffix!r}; expected one of {', '.join(BUILDERS)}",
                        where=str(path))
    if len(kinds) > 1:
        raise DataError(f"mixed data file types in one directory: {sorted(kinds)}", where=str(path))
    for p in files:
        if p.is_file() and _is_empty(p):
            fix = f"add rows, or remove it from {path}" if path.is_dir() else "add rows, or name another file"
            raise DataError(f"the data file is empty; {fix}", where=str(p))
    return kinds.pop(), [str(p) for p in files]


def _parses(text: bytes) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _json_error(file: str) -> DataError | None:
    """The first JSON syntax error in `file`, as a DataError at `file:line`; None when it parses.

    A file whose first non-blank line is a JSON value by itself is read as JSON Lines (each non-blank
    line one value, as the `datasets` json builder reads it); any other as one JSON document.
    """
    try:
        with open(file, "rb") as f:
            lines = ((n, line) for n, line in enumerate(f, 1) if line.strip())
            first = next(lines, None)
            if first is None:
                return None
            if _parses(first[1]):
                for n, line in itertools.chain([first], lines):
                    try:
                        json.loads(line.rstrip(b"\r\n"))
                    except ValueError as e:
                        detail = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
                        return DataError(f"this line is not valid JSON ({detail}); each line of a JSON Lines "
                                         "file must be one JSON object", where=f"{file}:{n}")
                return None
        json.loads(Path(file).read_bytes())
    except json.JSONDecodeError as e:
        return DataError(f"not valid JSON: {e.msg} at line {e.lineno}, column {e.colno} (character {e.pos})",
                         where=f"{file}:{e.lineno}")
    except ValueError as e:  # not text in a JSON encoding
        return DataError(f"not valid JSON: {e}", where=file)
    except OSError:
        return None
    return None


def _first_json_error(files: list[str]) -> DataError | None:
    return next((error for error in map(_json_error, files) if error is not None), None)


def load_source(source, cache_dir: str | None = None) -> datasets.Dataset:
    """The rows of a `DataSource` (recipe `data.train` / `data.eval`) with its columns remapped."""
    entry = source.path
    local = resolve_existing(entry) if not entry.startswith("hf://") else None
    if local is not None:
        builder, files = _local_files(local)
    try:
        if local is not None:
            ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
        else:
            name = entry[len("hf://"):] if entry.startswith("hf://") else entry
            if not entry.startswith("hf://") and (name.count("/") != 1 or Path(name).suffix in BUILDERS):
                raise DataError("no such data file or directory (and not a hub name ORG/NAME)", where=entry)
            ds = datasets.load_dataset(name, source.subset, split=source.split or "train", cache_dir=cache_dir)
    except DataError:
        raise
    except Exception as e:  # unreadable JSON/CSV, missing hub dataset or split, offline
        syntax = _first_json_error(files) if local is not None and builder == "json" else None
        raise (syntax or DataError(f"cannot load data ({type(e).__name__}: {e})", where=entry)) from e
    return _images_undecoded(remap_columns(ds, source.columns, where=entry))


def image_base_dir(source) -> str | None:
    """The directory that image paths of a `DataSource`'s rows are relative to (None: a hub dataset)."""
    local = resolve_existing(source.path) if not source.path.startswith("hf://") else None
    if local is None:
        return None
    return str(local if local.is_dir() else local.parent)


def _undecoded(feature):
    """`feature` with every Image feature in it set not to decode."""
    if isinstance(feature, datasets.Image):
        return datasets.Image(mode=feature.mode, decode=False)
    if isinstance(feature, dict):
        return {name: _undecoded(f) for name, f in feature.items()}
    if isinstance(feature, datasets.List):
        return datasets.List(_undecoded(feature.feature), length=feature.length)
    if isinstance(feature, datasets.LargeList):
        return datasets.LargeList(_undecoded(feature.feature))
    return feature


def _images_undecoded(ds: datasets.Dataset) -> datasets.Dataset:
    """`ds` whose Image columns read as {"bytes", "path"} dicts (a top-level Image column is recast in place;
    one nested in lists or structs rewrites the dataset once, cached by `datasets`)."""
    for name, feature in ds.features.items():
        undecoded = _undecoded(feature)
        if undecoded != feature:
            ds = ds.cast_column(name, undecoded)
    return ds


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
