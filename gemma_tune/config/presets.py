"""Model presets: `configs/models/<name>.yaml`, each a recipe fragment holding `model.architecture`."""

from __future__ import annotations

import difflib
from functools import lru_cache

import yaml

from gemma_tune.config.paths import PROJECT_ROOT
from gemma_tune.errors import ConfigError
from gemma_tune.models.config import Architecture

CONFIGS_DIR = PROJECT_ROOT / "configs"
RECIPES_DIR = PROJECT_ROOT / "recipes"


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
