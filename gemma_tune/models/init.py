"""Initial weights drawn on the host, so that one seed gives the same model on every backend.

Keras' random initializers draw with the backend's generator (JAX threefry, TensorFlow philox, torch's
Mersenne twister): the same seed gives three different models, and an initializer with an int seed
gives every layer it is shared by the same values. These draw with NumPy instead:

    values = stddev · N(0, 1)             (`HostNormal`)
    values ~ U(−limit, limit)             (`HostUniform`; limit = √(6 / fan_in) for He uniform, LoRA's A,
                                           √(6 / (fan_in + fan_out)) for Glorot uniform, Keras' Dense default)

from `np.random.default_rng([seed, n])`, where `seed` is the initializer's own (taken from this module's
seed sequence when the initializer is made) and `n` counts its calls; fans as Keras computes them
(a kernel [..., in, out]: in and out times the receptive field). `seed_initialisers(seed)` restarts the
seed sequence (the trainer calls it with the recipe's seed, through `gemma_tune.backend.set_random_seed`);
layers are made in the same order on every backend, so each weight gets the same seed everywhere.

`no_initial_draws()`: within it, these initializers give zeros without drawing — for models whose every
weight is then read from a checkpoint (drawing a 27B model on the host would take minutes).
"""

from __future__ import annotations

import abc
import math
import random
from contextlib import contextmanager
from typing import Iterator

import keras
import numpy as np

_SEEDS = random.Random()
_DRAWING = [True]


def seed_initialisers(seed: int) -> None:
    """Restart the sequence of initializer seeds from `seed`."""
    _SEEDS.seed(seed)


@contextmanager
def no_initial_draws() -> Iterator[None]:
    """Initializers made by this module give zeros within the block (see the module docstring)."""
    _DRAWING.append(False)
    try:
        yield
    finally:
        _DRAWING.pop()


def _fans(shape) -> tuple[int, int]:
    if len(shape) < 2:
        return (shape[0], shape[0]) if shape else (1, 1)
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


class _HostInitializer(keras.initializers.Initializer, abc.ABC):
    """Zeros within `no_initial_draws`, else `draw(np.random.default_rng([seed, call]), shape)`."""

    def __init__(self, seed: int | None = None):
        self.seed = _SEEDS.randint(1, 10 ** 9) if seed is None else int(seed)
        self._calls = 0

    def __call__(self, shape, dtype=None):
        shape = tuple(int(d) for d in shape)
        if not _DRAWING[-1]:
            return keras.ops.zeros(shape, dtype=dtype)
        rng = np.random.default_rng([self.seed, self._calls])
        self._calls += 1
        return keras.ops.convert_to_tensor(self.draw(rng, shape), dtype=dtype)

    @abc.abstractmethod
    def draw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """float32 values of `shape` from the subclass's distribution."""

    def get_config(self):
        return {"seed": self.seed}


@keras.saving.register_keras_serializable(package="gemma_tune")
class HostNormal(_HostInitializer):
    """N(0, stddev²), drawn on the host."""

    def __init__(self, stddev: float, seed: int | None = None):
        super().__init__(seed)
        self.stddev = float(stddev)

    def draw(self, rng, shape):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(self.stddev)

    def get_config(self):
        return {**super().get_config(), "stddev": self.stddev}


@keras.saving.register_keras_serializable(package="gemma_tune")
class HostUniform(_HostInitializer):
    """U(−limit, limit), drawn on the host; `fans` = "in" (He uniform), "in+out" (Glorot uniform) or
    None with a fixed `limit`."""

    def __init__(self, fans: str | None = None, limit: float | None = None, seed: int | None = None):
        super().__init__(seed)
        if (fans is None) == (limit is None) or fans not in (None, "in", "in+out"):
            raise ValueError("give fans ('in' or 'in+out') or a fixed limit")
        self.fans, self.limit = fans, limit

    def draw(self, rng, shape):
        limit = self.limit
        if limit is None:
            fan_in, fan_out = _fans(shape)
            limit = math.sqrt(6.0 / (fan_in if self.fans == "in" else fan_in + fan_out))
        return rng.uniform(-limit, limit, shape).astype(np.float32)

    def get_config(self):
        return {**super().get_config(), "fans": self.fans, "limit": self.limit}


def he_uniform() -> HostUniform:
    return HostUniform(fans="in")


def glorot_uniform() -> HostUniform:
    return HostUniform(fans="in+out")
