"""One run of a recipe, the same from the CLI and from Python: validate, choose the backend, seed, then
train with the recipe's method in its run directory (which `gemma_tune.train.train` holds, decides to
continue or start afresh in, and exports into)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from gemma_tune.backend import select_backend, set_random_seed, use_deterministic_kernels
from gemma_tune.config import Recipe, load_recipe
from gemma_tune.config.validate import check_backend_support


@dataclass
class RunResult:
    """What a run leaves: its directory, the metrics history (name -> values per log step), exports."""

    run_dir: Path
    history: dict[str, list[float]]
    exports: dict[str, Path] = field(default_factory=dict)


def run(recipe: str | Path | Mapping[str, Any] | Recipe, overrides: Iterable[str] = (), *,
        backend: str | None = None, resume: bool | None = None, callbacks: Iterable = ()) -> RunResult:
    """Run a recipe (a YAML path, a dict shaped like the YAML, or a loaded `Recipe`).

    `overrides` are dotted `key=value` strings as on the command line; `backend` wins over the recipe's
    `backend:`; `resume=None` continues the run directory's run when it is the same run, True requires a
    checkpoint (and allows changed optimisation settings), False starts afresh, moving a previous run
    aside (the rule: gemma_tune/train/resume.py). `callbacks`: extra Keras callbacks for `fit`, called
    after the run's own ones, once per micro-batch (`gemma_tune.train.train`; e.g. the notebooks' progress
    bar, `gemma_tune.notebook.progress_bar()`).
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    recipe.backend = select_backend(backend or recipe.backend)
    check_backend_support(recipe, recipe.backend)
    if recipe.distribution.mode != "none":
        from gemma_tune.distribute.hosts import join_job

        join_job()  # a multi-host job that the environment describes (before JAX computes anything)
    if recipe.train.deterministic:
        use_deterministic_kernels(recipe.backend)
    set_random_seed(recipe.seed)
    from gemma_tune.train import train

    outcome = train(recipe, resume=resume, callbacks=callbacks)
    return RunResult(run_dir=Path(outcome["summary"]["run_dir"]), history=outcome["history"],
                     exports=outcome.get("exports", {}))
