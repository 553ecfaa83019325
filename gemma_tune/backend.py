"""Choosing the Keras backend (before Keras is first imported), seeding it, and restricting it to
deterministic kernels (`use_deterministic_kernels`).

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


DETERMINISTIC_XLA_FLAG = "--xla_gpu_deterministic_ops=true"
CUBLAS_WORKSPACE = ":4096:8"  # what torch's deterministic cuBLAS needs
_TENSORFLOW_DETERMINISM = [False]


def use_deterministic_kernels(backend: str) -> None:
    """Restrict `backend` to deterministic kernels (`train.deterministic`; `deterministic_kernels` says what
    is set).

    JAX: XLA_FLAGS gains --xla_gpu_deterministic_ops=true (XLA reads it when JAX starts its GPU backend, so
    this must come before the process first uses a device). TensorFlow: `enable_op_determinism()`. torch:
    `use_deterministic_algorithms(True)` with CUBLAS_WORKSPACE_CONFIG set (before CUDA starts). All three
    matter on accelerators only: on CPUs these backends' kernels already repeat bit for bit.
    """
    if backend == "jax":
        flags = os.environ.get("XLA_FLAGS", "")
        if DETERMINISTIC_XLA_FLAG not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_XLA_FLAG}".strip()
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
        _TENSORFLOW_DETERMINISM[0] = True  # TensorFlow has no public way to ask
    else:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        import torch

        torch.use_deterministic_algorithms(True)


def deterministic_kernels(backend: str) -> str:
    """Whether `backend` is restricted to deterministic kernels in this process, and by what."""
    if backend == "jax":
        return "on (XLA_FLAGS)" if DETERMINISTIC_XLA_FLAG in os.environ.get("XLA_FLAGS", "") else "off"
    if backend == "tensorflow":
        return "on (enable_op_determinism)" if _TENSORFLOW_DETERMINISM[0] else "off"
    import torch

    return "on (use_deterministic_algorithms)" if torch.are_deterministic_algorithms_enabled() else "off"


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
