"""Reading recipe files: YAML parsing, `base:` composition and dotted CLI overrides.

Composition: the files listed in `base:` (each may have its own `base:`) are deep-merged in order,
then the recipe itself, then the overrides; a later value wins, mappings merge key by key, anything
else (lists included) is replaced. Each leaf remembers where it came from (`Provenance`), so an
error names the file that set the bad value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import yaml

from gemma_tune.config.paths import resolve_existing
from gemma_tune.errors import ConfigError

Provenance = dict[tuple[str, ...], str]

# The recipe keys that name local files or directories (relative ones resolved as gemma_tune.config.paths says).
PATH_KEYS = ("data.train.path", "data.eval.path", "model.tokenizer", "model.weights", "preference.reference")


def get_key(tree: dict, key: str) -> Any:
    """The value at dotted `key` ("data.train.path") of a raw recipe mapping, None where a part is missing."""
    value: Any = tree
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def set_key(tree: dict, key: str, value: Any) -> None:
    """Set dotted `key` of a raw recipe mapping whose sections above it exist."""
    *sections, name = key.split(".")
    for part in sections:
        tree = tree[part]
    tree[name] = value


def read_yaml(path: Path) -> dict:
    """Parse one YAML mapping with `yaml.safe_load`; syntax errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read recipe file: {e.strerror}", where=str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"invalid YAML: {problem}", where=where) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of recipe keys at the top level, got {type(data).__name__}",
                          where=str(path))
    return data


def deep_merge(base: dict, top: dict, provenance: Provenance, source: str, prefix: tuple[str, ...] = ()) -> dict:
    """`base` updated by `top` (recursively for mappings); records `source` for every leaf of `top`."""
    merged = dict(base)
    for key, value in top.items():
        path = prefix + (str(key),)
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value, provenance, source, path)
        else:
            merged[key] = value
            for stale in [p for p in provenance if p[: len(path)] == path]:
                del provenance[stale]
            _record(value, path, provenance, source)
    return merged


def _record(value: Any, path: tuple[str, ...], provenance: Provenance, source: str) -> None:
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            _record(sub, path + (str(key),), provenance, source)
    else:
        provenance[path] = source


def compose_file(path: Path, provenance: Provenance, _chain: tuple[Path, ...] = ()) -> dict:
    """The recipe at `path` with its `base:` files merged underneath it (`base` removed)."""
    path = path.resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in _chain + (path,))
        raise ConfigError(f"`base:` files include each other in a cycle: {cycle}", where=str(path))
    data = read_yaml(path)
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError("expected `base` to be a file path or a list of file paths", where=f"{path}: base")
    merged: dict = {}
    for entry in bases:
        base_path = resolve_existing(entry, relative_to=path.parent)
        if base_path is None:
            raise ConfigError(f"base file '{entry}' not found (looked next to the recipe, in the current "
                              "directory and in the gemma_tune project)", where=f"{path}: base")
        merged = deep_merge(merged, compose_file(base_path, provenance, _chain + (path,)), provenance,
                           str(base_path))
    return deep_merge(merged, data, provenance, str(path))


def parse_overrides(overrides: Iterable[str]) -> dict:
    """`["train.learning_rate=1e-4", "lora.rank=8"]` -> nested dict; values are parsed as YAML scalars
    (typed later by the schema)."""
    nested: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise ConfigError(f"expected KEY.PATH=VALUE, got '{item}'", where="command-line override")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"'{key}' sets a key below a value that is not a mapping",
                                  where="command-line override")
        node[parts[-1]] = value
    return nested
