"""The model and tokenizer a recipe trains: random init or loaded weights, then the frozen base
quantised (`quantize`) and LoRA adapters added (`lora`), rematerialisation, and the dtype policy.

`model.dtype` -> Keras dtype policy: float32 -> "float32"; bfloat16 -> "mixed_bfloat16" (float32
variables, bfloat16 compute) for full fine-tuning, "bfloat16" with LoRA (the frozen base is stored in
bfloat16, half the memory; Keras keeps the adapters, the only trained weights, in float32);
float16 -> "mixed_float16" (and the optimiser scales the loss).
QLoRA = `quantize: int8|int4` with `lora:`: base kernels quantised first, then float32 adapters on them.

With `model.weights`, the architecture is the checkpoint's; one the recipe also states (its preset with
`model.architecture` applied) must compute the same decoder, on every kind of source (`hf://` included,
checked once downloaded), and is then the one used. A tokenizer larger than the model's vocabulary is an
error; a smaller one is logged (the embedding rows above it are never produced by the tokenizer).
"""

from __future__ import annotations

import logging

from gemma_tune.config import recipe_architecture
from gemma_tune.errors import ConfigError
from gemma_tune.models.adapters import add_recipe_adapters

log = logging.getLogger("gemma_tune")

POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def build_for_recipe(recipe):
    """(GemmaCausalLM ready to train, GemmaTokenizer) for `recipe`."""
    from gemma_tune.models import build_model, count_params
    from gemma_tune.tokenizer import load_tokenizer

    policy = POLICIES[recipe.model.dtype]
    if recipe.lora is not None and recipe.model.dtype == "bfloat16":
        policy = "bfloat16"  # frozen base in bf16; LoRA variables are float32 whatever the policy
    if recipe.model.weights is None:
        model = build_model(recipe_architecture(recipe), dtype=policy)
        tokenizer = load_tokenizer(recipe.model.tokenizer)
    else:
        from gemma_tune.loading import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(recipe.model.weights, dtype=policy,
                                                    tokenizer=recipe.model.tokenizer,
                                                    architecture=recipe_architecture(recipe))
    vocab = model.architecture.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                          f"{vocab}", where="model.tokenizer")
    if tokenizer.vocab_size < vocab:
        log.warning("the model's vocabulary has %d rows but the tokenizer %d tokens: embedding rows at ids >= %d "
                    "are never produced by the tokenizer (expected for Gemma 3 multimodal checkpoints, whose extra "
                    "rows are image tokens)", vocab, tokenizer.vocab_size, tokenizer.vocab_size)
    add_recipe_adapters(model, recipe)
    model.remat = recipe.train.remat
    counts = count_params(model)
    log.info("model: %s parameters, %s trainable (%.2f%%)%s%s", f"{counts['total']:,}",
             f"{counts['trainable']:,}", 100 * counts["trainable"] / max(counts["total"], 1),
             f", LoRA rank {recipe.lora.rank}" if recipe.lora else ", full fine-tuning",
             f", base {recipe.quantize}" if recipe.quantize else "")
    return model, tokenizer
