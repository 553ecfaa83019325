"""Model presets: `configs/models/<name>.yaml` of the bundled files (`gemma_tune.config.paths.BUNDLED`), each a
recipe fragment holding `model.architecture`; and the bundled recipes, `recipes/<name>.yaml`."""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path

import yaml

from gemma_tune.config.paths import BUNDLED
from gemma_tune.errors import ConfigError
from gemma_tune.models.config import Architecture

CONFIGS_DIR = BUNDLED / "configs"
RECIPES_DIR = BUNDLED / "recipes"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_file(source: str | Path) -> Path:
    """The recipe file `source` names: a path (from the current directory, or as the bundled files spell it,
    `recipes/quickstart.yaml`) or a bundled recipe's name (`quickstart`)."""
    path = Path(source).expanduser()
    candidates = [path] if path.is_absolute() else [path, BUNDLED / path, RECIPES_DIR / f"{source}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    close = difflib.get_close_matches(path.stem, recipe_names(), n=3)
    hint = f"; bundled recipes with a close name: {', '.join(close)}" if close else ""
    raise ConfigError(f"recipe file not found (nor a bundled recipe of that name){hint}", where=str(source))


def preset_names() -> list[str]:
    return sorted(p.stem for p in (CONFIGS_DIR / "models").glob("*.yaml"))


@lru_cache(maxsize=None)
def _preset_file(name: str) -> dict:
    path = CONFIGS_DIR / "models" / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, preset_names(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known presets: {', '.join(preset_names())}"
        raise ConfigError(f"unknown model preset '{name}'{hint}", where="model.preset")
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def preset_description(name: str) -> str:
    return _preset_file(name).get("description", "")


def preset_architecture(name: str, **overrides) -> Architecture:
    """The architecture of preset `name`, with `overrides` (field=value) applied."""
    arch = dict(_preset_file(name)["model"]["architecture"])
    arch.update(overrides)
    return Architecture(**arch)
