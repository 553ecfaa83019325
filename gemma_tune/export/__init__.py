"""gemma_tune.export."""
