"""Choosing the Keras backend. It must happen before Keras is first imported.

Precedence: an explicit choice (CLI --backend or the recipe's `backend:`), then the KERAS_BACKEND
environment variable, then jax.
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
