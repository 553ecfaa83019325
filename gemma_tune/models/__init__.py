"""gemma_tune's Keras 3 Gemma models (see docs/CONTRACTS.md, "Model").

Names are resolved lazily: `gemma_tune.models.config` (the Architecture schema, read when a recipe is
validated) must stay importable without importing Keras, so that the backend can still be chosen.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "Architecture": "gemma_tune.models.config",
    "DecoderBlock": "gemma_tune.models.decoder",
    "GemmaCausalLM": "gemma_tune.models.decoder",
    "build_model": "gemma_tune.models.decoder",
    "Projection": "gemma_tune.models.projection",
    **{name: "gemma_tune.models.reward" for name in (
        "RewardModel", "reward_parts", "score_head", "sequence_scores", "trained_model")},
    **{name: "gemma_tune.models.adapters" for name in (
        "LORA_TARGET_PROJECTIONS", "adapters_disabled", "count_params", "enable_lora", "float_kernel", "float_weight", "get_variable",
        "lora_projections", "merge_lora", "projections", "quantize_base", "unmerge_lora")},
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gemma_tune.models' has no attribute '{name}'")
