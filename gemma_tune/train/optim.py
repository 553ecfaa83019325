"""The optimiser of a recipe's `train:` section: Keras' AdamW / Adafactor / SGD with a warmup schedule,
global-norm clipping, gradient accumulation and weight decay that skips norms and biases."""

from __future__ import annotations

import math

import keras
from keras import ops

# Variables never decayed: RMSNorm scales (w in x·(1 + w)) and biases. Regexes searched in the variable's
# name: "scale" for Keras variables, but the TensorFlow optimiser passes the tf.Variable's own name,
# "block_0/pre_attention_norm/scale:0".
NO_DECAY = (r"(^|/)scale(:\d+)?$", r"(^|/)bias(:\d+)?$")


@keras.saving.register_keras_serializable("gemma_tune")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Learning rate at optimiser step s = ⌊iteration / accum⌋ (Keras counts micro-steps when it
    accumulates gradients):

        s < warmup:  peak · (s + 1) / warmup
        else:        peak · f(p),  p = (s − warmup) / max(1, total − warmup) clipped to [0, 1]
                     f = 1 (constant), 1 − p (linear), (1 + cos πp) / 2 (cosine)
    """

    def __init__(self, peak: float, total_steps: int, warmup_steps: int = 0, kind: str = "cosine",
                 accum: int = 1):
        if kind not in ("constant", "linear", "cosine"):
            raise ValueError(f"unknown schedule {kind!r}")
        self.peak, self.total_steps, self.warmup_steps = float(peak), int(total_steps), int(warmup_steps)
        self.kind, self.accum = kind, int(accum)

    @classmethod
    def for_recipe(cls, train, total_steps: int) -> "WarmupSchedule":
        """The schedule of a `TrainSection` over `total_steps` optimisation steps."""
        return cls(train.learning_rate, total_steps, train.warmup_steps, train.schedule, train.grad_accum)

    def __call__(self, iteration):
        step = ops.cast(ops.floor_divide(iteration, self.accum), "float32")
        warm = self.peak * (step + 1.0) / max(self.warmup_steps, 1)
        progress = ops.clip((step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps), 0.0, 1.0)
        if self.kind == "constant":
            decayed = self.peak * ops.ones_like(progress)
        elif self.kind == "linear":
            decayed = self.peak * (1.0 - progress)
        else:
            decayed = self.peak * 0.5 * (1.0 + ops.cos(math.pi * progress))
        return ops.where(step < self.warmup_steps, warm, decayed)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "kind": self.kind, "accum": self.accum}


def build_optimizer(train, schedule, loss_scaling: bool = False) -> keras.optimizers.Optimizer:
    """The optimiser for `train` (a `TrainSection`) following `schedule` (a `WarmupSchedule`).

    `train.grad_accum` > 1 uses Keras' `gradient_accumulation_steps` (gradients averaged over the
    micro-steps, then clipped, then applied); `loss_scaling` wraps it in a `LossScaleOptimizer` (float16).
    """
    common = {"name": "optimizer", "learning_rate": schedule, "global_clipnorm": train.max_grad_norm,
              "gradient_accumulation_steps": train.grad_accum if train.grad_accum > 1 else None}
    if train.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(weight_decay=train.weight_decay, **common)
    elif train.optimizer == "adafactor":
        optimizer = keras.optimizers.Adafactor(weight_decay=train.weight_decay or None, **common)
    else:
        optimizer = keras.optimizers.SGD(weight_decay=train.weight_decay or None, **common)
    if train.weight_decay:
        optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY))
    if loss_scaling:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
