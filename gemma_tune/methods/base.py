"""The behaviour of a tuning method, as the one trainer (`gemma_tune.train.task.MethodTrainer`) runs it.

Counts: `count(batch)` gives a micro-batch's counts (`counts`, e.g. the trained target tokens for SFT,
the pairs for DPO); the batches of an optimisation step carry each count's total over the step as
`step_<name>` (gemma_tune.train.data), by which the loss is normalised.

Statistics: `forward` returns, for one micro-batch, `loss` — the micro-batch's part of the optimisation
step's objective, already divided by the step's counts, so that accumulation leaves the objective
unchanged — and the sums named in `stats` (every method has `tokens`, the real tokens it ran, and
`targets`, the tokens it trained on). The callbacks add them up over a step, a logging window or an
eval pass, with `loss` weighted back by the first count (`count_of`): `sums["loss"]` is then the plain sum of the per-item
losses, and `metric_values(sums, split)` turns sums into the logged metrics (`metrics`, in order).
"""

from __future__ import annotations

import abc
from typing import ClassVar

import numpy as np

MODEL_INPUTS = ("token_ids", "segment_ids", "positions")
IMAGE_INPUTS = ("images", "prefix_mask")  # a vision model's batch: pixels [B, N, S, S, 3], PaliGemma's prefix


def model_inputs(batch: dict) -> dict:
    """The decoder's inputs in a batch of the data contract: the token arrays, and the images (with
    PaliGemma's prefix mask) when the batch carries them."""
    return {k: batch[k] for k in MODEL_INPUTS + IMAGE_INPUTS if k in batch}


class Method(abc.ABC):
    """A tuning method: its batch count, forward statistics, metrics and extra layers (module docstring)."""

    stats: ClassVar[tuple[str, ...]]     # sums of a micro-batch besides "loss"; "tokens" and "targets" among them
    counts: ClassVar[tuple[str, ...]]    # the step counts the loss is normalised by; the first is also a stat
    metrics: ClassVar[tuple[str, ...]]   # logged metric names, in column order ("loss" first)
    eval_metrics: ClassVar[tuple[str, ...]] = ()  # extra names of eval rows
    loss_label: ClassVar[str] = "loss"   # the loss curve's y axis

    def __init__(self, recipe, options: dict):
        self.recipe, self.options = recipe, options

    @property
    def count_of(self) -> str:
        """The count that weights the loss in summed statistics."""
        return self.counts[0]

    @abc.abstractmethod
    def count(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        """The micro-batch's `counts`, from its NumPy arrays."""

    @abc.abstractmethod
    def forward(self, trainer, batch: dict, training: bool) -> dict:
        """{"loss", *stats} of one micro-batch; `batch[f"step_{name}"][0]` is the step's count `name`."""

    @abc.abstractmethod
    def metric_values(self, sums: dict[str, float], split: str) -> dict[str, float | None]:
        """The logged metrics from summed statistics (module docstring)."""

    def layers(self, lm) -> dict:
        """Layers the method adds around the decoder (trained, checkpointed and resumed with it)."""
        return {}

    def setup(self, lm, data, run_dir) -> None:
        """Before training, with the starting weights (e.g. a reference model's log-probabilities)."""

    def save(self, run_dir) -> None:
        """Once the run directory is committed: keep what `setup` made that a resumed run reuses."""


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, None when there is nothing to divide by."""
    return numerator / denominator if denominator else None
