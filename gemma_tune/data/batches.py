"""Deterministic, resumable batch iteration over prepared rows.

Step k (0-based, counted over all epochs) of `Split.batches(batch_size, seed)` is batch k % S of epoch
k // S, S = steps_per_epoch = ceil(rows / batch_size). Each epoch's order is a permutation drawn from
NumPy's PCG64 seeded by (seed, epoch), so the same seed gives the same batches on every run and backend,
and `start_step=k` resumes exactly where a run that finished k steps stops (with batch k+1, 1-based).
The last batch of an epoch is filled with padding rows (all zeros: no tokens, no loss), so every batch
has shape [batch_size, max_length]. Unpacked splits are length-bucketed: within windows of
`BUCKET_BATCHES` batches of the epoch's order, rows are sorted by length before batching, and the
batches are then shuffled.

A vision model's split whose rows hold images also has `images` (image_batches.ImageRows): each batch
then carries `images` float32 [batch_size, N, S, S, 3], decoded for that batch's rows only (zeros for
padding rows).
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

BUCKET_BATCHES = 32


class Split:
    """Prepared rows: `arrays` (name -> [rows, max_length]), each row's real-token count and, for a vision
    model, the rows' `images` (None otherwise)."""

    def __init__(self, arrays: dict[str, np.ndarray], lengths: np.ndarray, bucketed: bool, images=None):
        self.arrays = arrays
        self.lengths = np.asarray(lengths)
        self.bucketed = bucketed
        self.images = images

    def __len__(self) -> int:
        return len(self.lengths)

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)

    num_batches = steps_per_epoch

    def _epoch_batches(self, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([seed, epoch]).permutation(len(self))
        if not self.bucketed:
            return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        window = batch_size * BUCKET_BATCHES
        batches = []
        for w in range(0, len(order), window):
            chunk = order[w:w + window]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        shuffle = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
        return [batches[i] for i in shuffle]

    def _gather(self, rows: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
        batch = {}
        for name, array in self.arrays.items():
            out = np.zeros((batch_size,) + array.shape[1:], array.dtype)
            out[:len(rows)] = array[rows]
            batch[name] = out
        if self.images is not None:
            batch["images"] = self.images.gather(rows, batch_size)
        return batch

    def batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Endless shuffled batches, epoch after epoch, starting at global step `start_step`."""
        steps = self.steps_per_epoch(batch_size)
        epoch, index = divmod(start_step, steps)
        while True:
            for rows in self._epoch_batches(batch_size, seed, epoch)[index:]:
                yield self._gather(rows, batch_size)
            epoch, index = epoch + 1, 0

    def one_pass(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Every row once, in stored order (for evaluation)."""
        for i in range(0, len(self), batch_size):
            yield self._gather(np.arange(i, min(i + batch_size, len(self))), batch_size)
