"""Whether a run continues what its run directory holds, or starts afresh — decided before anything is
built or changed, by one rule a user can predict:

* A run continues from the directory's newest valid checkpoint when that checkpoint was written by the
  same run: the same resolved recipe, except for keys that do not change the steps themselves
  (`FREE`: logging, evaluation, sampling, saving, export, compilation, the device mesh, where the directory
  lies) and the run's length
  (`train.max_steps` / `train.epochs`: a longer run continues, a shorter one may stop earlier, but
  never before the step already reached). A changed length under a decaying schedule follows the new
  length from the checkpoint on; the log says so.
* `--resume` (resume=True) requires a checkpoint and also continues when optimisation settings changed
  (`CONTINUABLE`: learning rate, schedule, warm-up, clipping, weight decay, backend) — e.g. after a
  divergence, with a lower learning rate. The changes are logged.
* Anything else (the model, LoRA, quantisation, data, batch, seed, method, optimizer) is another run:
  it is refused with the differences and the two ways on — `--no-resume` (resume=False), which moves
  the old run aside, or another `output_dir`.
* With no valid checkpoint, a run starts afresh; over a previous run's checkpoints or exports only when
  the recipe is the same (they are moved aside), else it is refused as above.
* `--no-resume` always starts afresh; a previous run's results are moved aside, never deleted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from gemma_tune.errors import CheckpointError, ConfigError
from gemma_tune.train import checkpoint

log = logging.getLogger("gemma_tune")

FREE = ("name", "description", "output_dir", "export", "train.log_every", "train.eval_every", "train.save_every",
        "train.sample_prompts", "train.jit_compile", "train.remat", "data.num_proc", "distribution")
LENGTH = ("train.max_steps", "train.epochs")
CONTINUABLE = ("backend", "train.learning_rate", "train.schedule", "train.warmup_steps", "train.max_grad_norm",
               "train.weight_decay")


@dataclass
class Start:
    """Where a run starts: `checkpoint` (None = from scratch) at `step`; `fresh` = the directory is set
    up anew (previous results moved aside); `changes` = (key, old, new) continued across."""

    checkpoint: Path | None = None
    step: int = 0
    fresh: bool = True
    changes: list[tuple[str, object, object]] = field(default_factory=list)

    def check_length(self, total_steps: int, where: Path) -> None:
        """Refuse to continue a run already past `total_steps`."""
        if self.checkpoint is not None and self.step > total_steps:
            raise ConfigError(f"this run directory's run is already at step {self.step}, past the "
                              f"{total_steps} steps this recipe asks for; {_REMEDY}", where=str(where))


_REMEDY = ("to start afresh, pass --no-resume (resume=False in Python: the old run is moved aside, nothing is "
           "deleted), or give the new run its own directory with output_dir=…")


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        flat.update(_flatten(value, path) if isinstance(value, dict) and value else {path: value})
    return flat


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def recipe_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(dotted key, old, new) for every leaf that differs between two resolved recipes."""
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _describe(changes) -> str:
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)


def plan(run_dir, recipe, resume: bool | None) -> Start:
    """The `Start` of `recipe` in `run_dir` (a `gemma_tune.rundir.RunDirectory`) under the rule of the
    module docstring; a refusal is a ConfigError (CheckpointError when --resume finds no checkpoint)."""
    where = run_dir.path
    if resume is False:
        return Start()
    found = checkpoint.latest(where)
    previous = run_dir.previous_recipe()
    changes = recipe_changes(previous, recipe.model_dump(mode="json")) if previous is not None else None
    if found is None:
        if resume is True:
            raise CheckpointError("--resume needs a checkpoint, and this run directory has no valid one under "
                                  "checkpoints/", where=str(where))
        if run_dir.has_results() and (changes is None or _others(changes, allow=LENGTH)):
            raise ConfigError(f"this run directory holds another run's results ({_what_differs(changes)}); "
                              f"{_REMEDY}", where=str(where))
        return Start()
    if changes is None:
        raise ConfigError(f"this run directory has checkpoints but no readable recipe.yaml, so they cannot be "
                          f"told to belong to this run; {_REMEDY}", where=str(where))
    allowed = LENGTH + (CONTINUABLE if resume else ())
    refused = _others(changes, allow=allowed)
    if refused:
        hint = ""
        if not resume and not _others(changes, allow=LENGTH + CONTINUABLE):
            hint = "to continue it with these settings, pass --resume (resume=True in Python); "
        raise ConfigError(f"this run directory holds a run of other settings ({_describe(refused)}); {hint}"
                          f"{_REMEDY}", where=str(where))
    kept = [c for c in changes if not _under(c[0], FREE)]
    step = checkpoint.read_state(found)["step"]
    for moved in checkpoint.set_aside_invalid(where, found):
        log.warning("set aside %s: it does not verify (see above); continuing from %s", moved, found)
    if kept:
        log.warning("continuing %s with changed settings: %s", found, _describe(kept))
        if any(_under(k, LENGTH) for k, _, _ in kept) and recipe.train.schedule != "constant":
            log.warning("the %s learning-rate schedule follows the new run length from step %d on",
                        recipe.train.schedule, step)
    return Start(checkpoint=found, step=step, fresh=False, changes=kept)


def _others(changes, allow) -> list:
    return [c for c in changes if not _under(c[0], FREE + allow)]


def _what_differs(changes) -> str:
    if changes is None:
        return "its recipe.yaml is missing or unreadable"
    return "no valid checkpoint to continue from; it differs from this recipe in " + _describe(_others(changes, ()))
