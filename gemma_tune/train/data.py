"""Micro-batches for `fit` and `evaluate`, with the step count the loss divides by.

Training: micro-batch j (0-based, counted over the run) is `split.batches(batch_size, seed)` batch j;
optimisation step k is micro-batches k·accum … k·accum + accum − 1, and each of them carries
`step_<name>` [B] for each of the method's counts (`Method.count`: trained targets for SFT, pairs for
preference methods) summed over all `accum` of them, so that the loss of every micro-batch is divided
by the counts of the whole step. Resuming after k steps starts at micro-batch k·accum: the same batches as an
uninterrupted run.

Evaluation: every row once (`split.one_pass`), each batch with its own counts (a batch is its own step).

`for_fit` hands an iterator to Keras: as is (on a multi-host JAX job, each host's rows of every batch:
`gemma_tune.distribute.hosts.local_rows`), except on TensorFlow, where it becomes a `tf.data`
pipeline with the batch's static shapes (Keras' own generator adapter leaves the batch dimension
unknown, and the chunked loss needs the token count of a batch when it is traced).

`no_read_ahead(True)` is where `fit` runs for a method whose batches are made from the weights being
trained (online RL): Keras 3.15's JAX epoch iterator reads one batch ahead on an accelerator (to overlap its
transfer), which would make a round of completions before the step that precedes it has run; under a
`keras.distribution.DataParallel` over the one device the variables live on, it reads each batch when the
step takes it (its distributed path), and computes the same. Other backends read a batch when its step
begins.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterator

import numpy as np


def with_counts(batch: dict, counts: dict[str, float]) -> tuple[dict]:
    """`(inputs,)`: Keras takes a generator's items as (x,) / (x, y) tuples; the methods have no separate y."""
    batch = dict(batch)
    rows = len(next(iter(batch.values())))
    for name, value in counts.items():
        batch[f"step_{name}"] = np.full((rows,), value, np.float32)
    return (batch,)


def train_batches(split, batch_size: int, accum: int, seed: int, count: Callable[[dict], dict[str, float]],
                  start_step: int = 0) -> Iterator[dict]:
    """Endless micro-batches from optimisation step `start_step` on, `count` being the method's
    (`Method.count`; see module docstring)."""
    stream = split.batches(batch_size, seed, start_step=start_step * accum)
    while True:
        group = [next(stream) for _ in range(accum)]
        per_batch = [count(b) for b in group]
        step = {name: float(sum(c[name] for c in per_batch)) for name in per_batch[0]}
        for batch in group:
            yield with_counts(batch, step)


def eval_batches(split, batch_size: int, count: Callable[[dict], dict[str, float]]) -> Iterator[tuple[dict]]:
    """Every row once, each batch with its own counts (`Method.count`)."""
    for batch in split.one_pass(batch_size):
        yield with_counts(batch, count(batch))


def no_read_ahead(on_policy: bool):
    """The context `fit` runs in (module docstring): a one-device DataParallel on JAX for on-policy
    methods (unless a distribution is already set), else nothing."""
    import keras

    if not on_policy or keras.backend.backend() != "jax" or keras.distribution.distribution() is not None:
        return contextlib.nullcontext()
    import jax

    return keras.distribution.DataParallel(devices=jax.devices()[:1]).scope()


def for_fit(batches):
    """`batches` (a generator, or a `keras.utils.PyDataset` read in order, each batch when its step takes
    it) for `fit`/`evaluate`: as is, or a statically shaped tf.data.Dataset — which, for a PyDataset, reads
    on demand too (tf.data's injected prefetch off)."""
    import keras

    if keras.backend.backend() == "jax":
        from gemma_tune.distribute.hosts import local_rows

        return local_rows(batches)  # as is on one host; each host's own rows of a multi-host job's batches
    if keras.backend.backend() != "tensorflow":
        return batches
    import tensorflow as tf

    on_demand = isinstance(batches, keras.utils.PyDataset)
    if on_demand:
        dataset = batches
        batches = (dataset[i] for i in itertools.count())

    first = next(batches)

    def replay():
        yield first
        yield from batches

    spec = ({k: tf.TensorSpec(v.shape, tf.as_dtype(v.dtype)) for k, v in first[0].items()},)
    pipeline = tf.data.Dataset.from_generator(replay, output_signature=spec)
    if on_demand:
        options = tf.data.Options()
        options.autotune.enabled = False
        options.experimental_optimization.inject_prefetch = False
        pipeline = pipeline.with_options(options)
    return pipeline
