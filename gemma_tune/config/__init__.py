"""gemma_tune.config."""
