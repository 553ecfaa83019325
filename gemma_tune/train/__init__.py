"""gemma_tune.train: the SFT trainer on Keras' `fit` (see loop.py for the flow of a run)."""

from gemma_tune.train.loop import TrainingInterrupted, train

__all__ = ["TrainingInterrupted", "train"]
