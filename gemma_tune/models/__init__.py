"""gemma_tune's Keras 3 Gemma models (see docs/CONTRACTS.md, "Model")."""

from gemma_tune.models.adapters import (
    LORA_TARGET_PROJECTIONS,
    count_params,
    enable_lora,
    float_kernel,
    get_variable,
    lora_projections,
    merge_lora,
    projections,
    quantize_base,
    unmerge_lora,
)
from gemma_tune.models.config import Architecture
from gemma_tune.models.decoder import DecoderBlock, GemmaCausalLM, build_model
from gemma_tune.models.projection import Projection

__all__ = [
    "Architecture", "DecoderBlock", "GemmaCausalLM", "LORA_TARGET_PROJECTIONS", "Projection", "build_model",
    "count_params", "enable_lora", "float_kernel", "get_variable", "lora_projections", "merge_lora",
    "projections", "quantize_base", "unmerge_lora",
]
