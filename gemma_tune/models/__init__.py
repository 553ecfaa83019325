"""Gemma model definitions as Keras 3 layers."""
