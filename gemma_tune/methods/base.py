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

Batches: `train_stream` and `eval_stream` give what `fit` and `evaluate` run on. Offline methods take the
prepared split's rows as they are (the default); an online method (grpo/rloo) makes its batches from the
current weights (`on_policy`: completions sampled, scored and turned into rows), with `callbacks` it hands to
`fit` to do that between steps, and `state`/`restore` to keep with each checkpoint what a resumed run needs
of it (the rollouts of a round still being optimised).
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
    curve: ClassVar[str] = "loss"        # the metric loss_curve.png plots (and the summary shows first -> last)
    on_policy: ClassVar[bool] = False    # batches depend on the weights being trained (Keras must not read ahead)

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

    def setup(self, lm, data, run_dir, tokenizer=None) -> None:
        """Before training, with the starting weights (e.g. a reference model's log-probabilities) and the
        run's tokenizer."""

    def save(self, run_dir) -> None:
        """Once the run directory is committed: keep what `setup` made that a resumed run reuses."""

    def steps_per_epoch(self, split, train) -> float:
        """Optimisation steps of one pass over `split` (`train`: the recipe's train section)."""
        return split.steps_per_epoch(train.batch_size) / train.grad_accum

    def train_stream(self, trainer, split, *, batch_size: int, accum: int, seed: int, start_step: int,
                     total_steps: int | None = None):
        """Micro-batches for `fit` from optimisation step `start_step` on, to `total_steps` (endless for
        offline methods: gemma_tune.train.data)."""
        from gemma_tune.train.data import train_batches

        return train_batches(split, batch_size, accum, seed, self.count, start_step=start_step)

    def eval_stream(self, trainer, split, batch_size: int, step: int):
        """(batches, number of batches) for one evaluation at optimisation step `step`: every row once."""
        from gemma_tune.train.data import eval_batches

        return eval_batches(split, batch_size, self.count), split.steps_per_epoch(batch_size)

    def callbacks(self) -> list:
        """Keras callbacks the method needs in `fit` (after `train_stream` is made)."""
        return []

    def state(self, step: int) -> dict[str, np.ndarray]:
        """Arrays to keep with the checkpoint of optimisation step `step` ({} = none)."""
        return {}

    def restore(self, arrays: dict[str, np.ndarray], step: int) -> None:
        """A resumed run's `state` of the checkpoint it starts from (called before `train_stream`)."""


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, None when there is nothing to divide by."""
    return numerator / denominator if denominator else None
