"""gemma_tune.methods."""
