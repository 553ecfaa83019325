"""Rematerialising a decoder block (`train.remat`) on every backend, compiled or not.

`rematerialised(fn)` is `keras.remat(fn)` — the block's activations recomputed in the backward instead of kept —
except while torch.compile traces the step: dynamo cannot trace a Keras layer call inside
`torch.utils.checkpoint` (the layer's name scope is a mutation outside the checkpointed region), so each block
would run outside the compiled graph. There the block is traced as it is and the compiled step's partitioner
recomputes instead: `compiling.eager_first_call` compiles a model with remat under an activation memory budget
of 0 (AOTAutograd keeps what the backward cannot recompute, and recomputes the rest of the forward).
"""

from __future__ import annotations

import keras


def rematerialised(fn):
    """`fn` recomputed in the backward (module docstring)."""
    if keras.backend.backend() == "torch":
        import torch

        if torch.compiler.is_compiling():
            return fn
    return keras.remat(fn)
