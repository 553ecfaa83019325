"""gemma_tune: fine-tune Gemma models with Keras 3 on JAX, TensorFlow or PyTorch.

The Python API does exactly what the CLI does:

    import gemma_tune
    result = gemma_tune.run("recipes/quickstart.yaml", overrides=["train.max_steps=50"])
    result.run_dir, result.history

Keras is imported lazily, so the backend can still be chosen (recipe `backend:` or KERAS_BACKEND)
after `import gemma_tune`.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "run": "gemma_tune.runner",
    "RunResult": "gemma_tune.runner",
    "load_recipe": "gemma_tune.config",
    "Recipe": "gemma_tune.config",
    "load_model": "gemma_tune.loading", "load_model_and_tokenizer": "gemma_tune.loading",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gemma_tune' has no attribute '{name}'")
