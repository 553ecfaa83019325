"""gemma_tune.train."""
