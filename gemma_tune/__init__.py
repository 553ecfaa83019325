"""gemma_tune: fine-tune Gemma models with Keras 3 on JAX, TensorFlow or PyTorch.

The Python API does exactly what the CLI does:

    import gemma_tune
    result = gemma_tune.run("recipes/quickstart.yaml", overrides=["train.max_steps=50"])
    result.run_dir, result.history

Keras is imported lazily, so the backend can still be chosen (recipe `backend:` or KERAS_BACKEND)
after `import gemma_tune`. The model classes that `.keras` archives name (`gemma_tune>GemmaCausalLM`,
`gemma_tune>Projection`) are registered with Keras by `import gemma_tune` when Keras is already
imported, else by `gemma_tune.register_keras_objects()` (or any import of gemma_tune.models' classes).
"""

from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"

_LAZY = {
    "run": "gemma_tune.runner",
    "RunResult": "gemma_tune.runner",
    "load_recipe": "gemma_tune.config",
    "Recipe": "gemma_tune.config",
    "load_model": "gemma_tune.loading", "load_model_and_tokenizer": "gemma_tune.loading",
    "score": "gemma_tune.scoring", "Scores": "gemma_tune.scoring",
    "repro": "gemma_tune.reproduce", "ReproResult": "gemma_tune.reproduce",
}

__all__ = sorted(_LAZY) + ["register_keras_objects"]


def register_keras_objects() -> None:
    """Register gemma_tune's Keras classes, so `keras.saving.load_model(path, safe_mode=True)` finds them."""
    importlib.import_module("gemma_tune.models.decoder")


if "keras" in sys.modules:  # the backend is already chosen: nothing is lost by registering now
    register_keras_objects()


def __dir__() -> list[str]:
    """The public API (the lazily imported names included), as `dir(gemma_tune)` shows it."""
    return sorted(__all__ + ["__version__"])


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gemma_tune' has no attribute '{name}'")
