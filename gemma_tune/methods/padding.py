"""Zeros after the end of an axis, for the chunked losses (`sft_loss`, `logps`), without `keras.ops.pad`.

`ops.pad` is the one Keras op used here that builds an `Operation` object at every call, even on concrete
tensors, and naming it advances a global counter. A compiled torch step is guarded on that counter, so a step
that pads compiled again at every call (GRPO's log-probabilities did, under dynamo's `error_on_recompile`).
Concatenating zeros computes the same array and touches no global state.
"""

from __future__ import annotations

from keras import ops


def pad_tail(x, amount: int, axis: int):
    """`x` with `amount` zeros appended along `axis` (static shapes)."""
    if not amount:
        return x
    shape = list(x.shape)
    shape[axis] = amount
    return ops.concatenate([x, ops.zeros(shape, x.dtype)], axis=axis)
