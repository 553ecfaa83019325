"""gemma_tune.data."""
