"""One run of a recipe, the same from the CLI and from Python: validate, choose the backend, seed,
prepare the run directory, train with the recipe's method, export."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from gemma_tune.backend import select_backend
from gemma_tune.config import Recipe, load_recipe

log = logging.getLogger("gemma_tune")


@dataclass
class RunResult:
    """What a run leaves: its directory, the metrics history (name -> values per log step), exports."""

    run_dir: Path
    history: dict[str, list[float]]
    exports: dict[str, Path] = field(default_factory=dict)


def run(recipe: str | Path | Mapping[str, Any] | Recipe, overrides: Iterable[str] = (), *,
        backend: str | None = None, resume: bool | None = None) -> RunResult:
    """Run a recipe (a YAML path, a dict shaped like the YAML, or a loaded `Recipe`).

    `overrides` are dotted `key=value` strings as on the command line; `backend` wins over the recipe's
    `backend:`; `resume=None` resumes when the run directory holds a checkpoint, True requires one,
    False starts afresh.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    recipe.backend = select_backend(backend or recipe.backend)

    import keras

    keras.utils.set_random_seed(recipe.seed)
    from gemma_tune.rundir import prepare_run_dir
    from gemma_tune.train import train

    run_dir = prepare_run_dir(recipe, recipe.backend)
    log.info("run %s on %s -> %s", recipe.name, recipe.backend, run_dir)
    outcome = train(recipe, run_dir, resume=resume)
    return RunResult(run_dir=run_dir, history=outcome["history"], exports=outcome.get("exports", {}))
