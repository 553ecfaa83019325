"""gemma_tune.data: datasets -> Gemma chat template (and image slots) -> loss masks -> packed, deterministic
batches (with the images of their rows for vision models).

Entry point: `prepare(recipe.data, tokenizer, seed, cache_dir=None, architecture=None) -> PreparedData` (see
docs/CONTRACTS.md, "Training batches").
"""

from gemma_tune.data.batches import Split
from gemma_tune.data.prepare import PreparedData, prepare

__all__ = ["PreparedData", "Split", "prepare"]
