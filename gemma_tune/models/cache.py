"""Writing a decoding step's keys and values into the KV cache, with the slot index a tensor on every backend.

    write_slots(cache [B, S, K, D], update [B, T, K, D], start) = cache with slots [start, start + T) ← update

`start` is an int32 scalar tensor, so one compiled decoding step serves every slot. JAX and TensorFlow take
`ops.slice_update` (XLA's dynamic-update-slice, in place inside a compiled while loop). On torch Keras' slice_update
reads the start back to the host (`.item()`), which torch.compile cannot trace; there the same assignment is
`Tensor.index_copy` along the slot axis, whose indices stay on the device.
"""

from __future__ import annotations

import keras
from keras import ops


def write_slots(cache, update, start):
    """`cache` with slots [start, start + T) of axis 1 replaced by `update` (module docstring); exact on every
    backend (an assignment)."""
    update = ops.cast(update, cache.dtype)
    if keras.backend.backend() == "torch":
        slots = start + ops.arange(update.shape[1], dtype="int32")
        return cache.index_copy(1, slots.long(), update)
    return ops.slice_update(cache, [0, start, 0, 0], update)
