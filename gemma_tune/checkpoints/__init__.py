"""gemma_tune.checkpoints."""
