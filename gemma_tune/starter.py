"""`gemma-tune init DIR`: a new user's starting point, a recipe and the data it trains on, in DIR.

`init_project(directory, recipe)` composes a bundled recipe (its `base:` files merged in, so every key it
uses is in the one file), copies the bundled data directories its local paths name (`data/tiny/`, with
the tokenizer, the data files and anything beside them, such as a dataset's images) into
`DIR/data/`, and writes `DIR/recipe.yaml`, whose paths (`data/tiny/chat.jsonl`) then name those copies:
a relative path is looked up in the current directory first, then beside the recipe
(`gemma_tune.config.paths`). `output_dir` becomes `runs/<name>`. Nothing in DIR is overwritten: a
`recipe.yaml` or data directory already there is an error.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from gemma_tune.config.compose import PATH_KEYS, compose_file, get_key, set_key
from gemma_tune.config.paths import BUNDLED, is_remote, resolve_existing
from gemma_tune.config.presets import recipe_file
from gemma_tune.errors import UserError

RECIPE_NAME = "recipe.yaml"


def _bundled_data(entry: str, origin: Path) -> tuple[Path, Path] | None:
    """(the bundled `data/<set>` directory holding the path `entry` names, that path), or None (remote, or not
    bundled)."""
    if is_remote(entry):
        return None
    found = resolve_existing(entry, relative_to=origin)
    data_root = (BUNDLED / "data").resolve()
    if found is None or data_root not in found.parents:
        return None
    return data_root / found.relative_to(data_root).parts[0], found


def _header(source: Path) -> str:
    comments = []
    for line in source.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        comments.append(line)
    return "\n".join([
        f"# Starter recipe from gemma_tune's bundled {source.stem}.yaml, its base files merged in.",
        f"#   gemma-tune run {RECIPE_NAME}                 (from this directory; add --backend tensorflow|torch)",
        f"#   gemma-tune validate {RECIPE_NAME}            (check it after editing; builds nothing)",
        "# data/ holds copies of the bundled data it names: edit them or point the paths at your own files.",
        "# Every key, its default and meaning: gemma-tune keys",
        "#",
        *comments, ""])


def init_project(directory: str | Path, recipe: str = "quickstart") -> Path:
    """Write the starter for bundled recipe `recipe` into `directory` (see the module docstring); returns
    the recipe written."""
    source = recipe_file(recipe)
    provenance: dict = {}
    raw = compose_file(source, provenance)
    if provenance.get(("description",)) != str(source.resolve()):
        raw.pop("description", None)  # a base file's description is the part's, not the recipe's
    target = Path(directory).expanduser()
    written = target / RECIPE_NAME
    if written.exists():
        raise UserError(f"{written} already exists; choose another directory", where="gemma-tune init")
    copies = set()
    for key in PATH_KEYS:
        entry = get_key(raw, key)
        bundled = _bundled_data(entry, source.parent) if isinstance(entry, str) else None
        if bundled is not None:
            data_dir, found = bundled
            copies.add(data_dir)
            set_key(raw, key, found.relative_to(BUNDLED.resolve()).as_posix())
    for data_dir in sorted(copies):
        if (target / "data" / data_dir.name).exists():
            raise UserError(f"{target / 'data' / data_dir.name} already exists; choose another directory",
                            where="gemma-tune init")
    target.mkdir(parents=True, exist_ok=True)
    for data_dir in sorted(copies):
        shutil.copytree(data_dir, target / "data" / data_dir.name)
    raw["output_dir"] = f"runs/{raw.get('name', source.stem)}"
    written.write_text(_header(source) + yaml.safe_dump(raw, sort_keys=False),
                       encoding="utf-8")
    return written
