"""Choosing the Keras backend (before Keras is first imported), and seeding it.

Precedence: an explicit choice (CLI --backend or the recipe's `backend:`), then the KERAS_BACKEND
environment variable, then jax.

`set_random_seed` is `keras.utils.set_random_seed` without its TensorFlow import on the other backends:
Keras seeds TensorFlow whenever it is installed, importing it (seconds, and its start-up lines on the
console) for that alone.
"""

from __future__ import annotations

import os
import sys

from gemma_tune.errors import UserError

BACKENDS = ("jax", "tensorflow", "torch")


def select_backend(requested: str | None) -> str:
    """Set KERAS_BACKEND to `requested` (or the environment's, or jax) and return it."""
    backend = requested or os.environ.get("KERAS_BACKEND") or "jax"
    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}'; expected one of: {', '.join(BACKENDS)}", where="backend")
    if "keras" in sys.modules:
        import keras

        active = keras.backend.backend()
        if active != backend:
            raise UserError(f"Keras is already imported with the {active} backend in this process, so the "
                            f"{backend} backend cannot be used; restart with KERAS_BACKEND={backend} or "
                            f"set backend: {active}", where="backend")
        return backend
    os.environ["KERAS_BACKEND"] = backend
    return backend


class _NoTensorFlow:
    available = False


def set_random_seed(seed: int) -> None:
    """Seed gemma_tune's host-drawn initial weights (`gemma_tune.models.init`); Python's and NumPy's random
    state, torch's (on torch) and Keras' global seed generator, as `keras.utils.set_random_seed` does;
    TensorFlow's only when it is the backend or already imported.

    gemma_tune draws from TensorFlow's random state only in tf.data pipelines, which it builds on the
    TensorFlow backend alone. Elsewhere Keras' own function runs with its handle on TensorFlow (the
    lazily importing `keras.src.utils.rng_utils.tf`) replaced, for the call, by one that is unavailable.
    """
    import keras
    from keras.src.utils import rng_utils

    from gemma_tune.models.init import seed_initialisers

    seed_initialisers(seed)
    if keras.backend.backend() == "tensorflow" or "tensorflow" in sys.modules:
        keras.utils.set_random_seed(seed)
        return
    lazy = rng_utils.tf
    rng_utils.tf = _NoTensorFlow()
    try:
        keras.utils.set_random_seed(seed)
    finally:
        rng_utils.tf = lazy
