"""The behaviour of a tuning method, as the one trainer (`gemma_tune.train.task.MethodTrainer`) runs it.

Statistics: `forward` returns, for one micro-batch, `loss` — the micro-batch's part of the optimisation
step's objective, already divided by the step's count (`count_of`, e.g. the trained target tokens of
all micro-batches of the step for SFT, the pairs for DPO), so that accumulation leaves the objective
unchanged — and the sums named in `stats` (every method has `tokens`, the real tokens it ran, and
`targets`, the tokens it trained on). The callbacks add them up over a step, a logging window or an
eval pass, with `loss` weighted back by the count: `sums["loss"]` is then the plain sum of the per-item
losses, and `metric_values(sums, split)` turns sums into the logged metrics (`metrics`, in order).
"""

from __future__ import annotations

import abc
from typing import ClassVar

import numpy as np


class Method(abc.ABC):
    """A tuning method: its batch count, forward statistics, metrics and extra layers (module docstring)."""

    stats: ClassVar[tuple[str, ...]]     # sums of a micro-batch besides "loss"; "tokens" and "targets" among them
    count_of: ClassVar[str]              # the stat whose step total divides the loss
    metrics: ClassVar[tuple[str, ...]]   # logged metric names, in column order ("loss" first)
    eval_metrics: ClassVar[tuple[str, ...]] = ()  # extra names of eval rows
    loss_label: ClassVar[str] = "loss"   # the loss curve's y axis

    def __init__(self, recipe, options: dict):
        self.recipe, self.options = recipe, options

    @abc.abstractmethod
    def count(self, batch: dict[str, np.ndarray]) -> float:
        """The micro-batch's share of the step count (`count_of`), from its NumPy arrays."""

    @abc.abstractmethod
    def forward(self, trainer, batch: dict, training: bool) -> dict:
        """{"loss", *stats} of one micro-batch; `batch["step_count"][0]` is the step's count."""

    @abc.abstractmethod
    def metric_values(self, sums: dict[str, float], split: str) -> dict[str, float | None]:
        """The logged metrics from summed statistics (module docstring)."""

    def layers(self, lm) -> dict:
        """Layers the method adds around the decoder (trained, checkpointed and resumed with it)."""
        return {}


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, None when there is nothing to divide by."""
    return numerator / denominator if denominator else None
