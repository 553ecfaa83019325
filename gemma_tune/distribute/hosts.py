"""Runs over several hosts: joining the job, each host's rows of a batch, one writer.

A multi-host job runs the same `gemma-tune run RECIPE` on every host (SPMD, as MaxText and keras-hub's
distribution guides do); `distribution.mode` spreads it over the devices of every host.

* `join_job()` (called by `gemma_tune.run` before JAX starts, when the recipe distributes): where the
  environment describes a job of several processes — Keras' `KERAS_DISTRIBUTION_JOB_ADDRESSES`
  (coordinator first, comma-separated), `KERAS_DISTRIBUTION_NUM_PROCESSES`, `KERAS_DISTRIBUTION_PROCESS_ID`;
  JAX's `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`; or what `jax.distributed`
  detects itself (a Cloud TPU pod slice, SLURM, Open MPI) — it calls `keras.distribution.initialize()`,
  which starts `jax.distributed` with them. On CPUs the processes exchange through gloo.
* `local_rows(batches)`: every host builds the same global batches (the same seed, the same order) and
  keeps its own rows: those of the devices it holds, under the batch's layout
  (`jax.make_array_from_process_local_data`, which Keras' JAX trainer calls, assembles the global batch).
* `to_numpy(value)`: a whole array on every host (its shards gathered from all of them), for checkpoints.
* The writer (process 0) holds the run directory and writes in it; the other hosts (`is_writer()` false)
  keep their own logs and metrics in a scratch directory, start where the writer's decision says
  (`agreed_start`), take part in every checkpoint's gathering and write nothing in the run directory. The
  run directory must be on a filesystem every host sees (NFS, a GCS FUSE mount), for resuming.

With one process every function is the identity (or trivially true): single-host runs are unchanged.
"""

from __future__ import annotations

import os

import numpy as np

KERAS_ENV = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES", "KERAS_DISTRIBUTION_PROCESS_ID")
JAX_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _count(name: str) -> int:
    try:
        return int(os.environ.get(name, "1"))
    except ValueError:
        return 1


def cluster_described() -> bool:
    """Whether the environment describes a job of several processes (module docstring)."""
    if any(name in os.environ for name in KERAS_ENV + JAX_ENV):
        return True
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return ("," in tpu_hosts or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
            or _count("SLURM_NTASKS") > 1 or _count("OMPI_COMM_WORLD_SIZE") > 1)


def join_job() -> bool:
    """Join the job the environment describes (module docstring); False when it describes none. Must run
    before JAX computes anything."""
    if not cluster_described():
        return False
    import jax
    import keras

    if jax.distributed.is_initialized():
        return True
    if "JAX_COORDINATOR_ADDRESS" in os.environ and not any(name in os.environ for name in KERAS_ENV):
        os.environ["KERAS_DISTRIBUTION_JOB_ADDRESSES"] = os.environ["JAX_COORDINATOR_ADDRESS"]
        for keras_name, jax_name in zip(KERAS_ENV[1:], JAX_ENV[1:]):
            if jax_name in os.environ:
                os.environ[keras_name] = os.environ[jax_name]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts exchange through gloo
    keras.distribution.initialize()
    return True


def job_line() -> str | None:
    """The run log's line about a multi-host job (None for one process): its processes and devices."""
    if process_count() == 1:
        return None
    import jax

    return (f"job       process {jax.process_index()} of {jax.process_count()} "
            f"({jax.device_count()} devices, {jax.local_device_count()} here)")


def process_count() -> int:
    import keras

    if keras.backend.backend() != "jax":
        return 1
    import jax

    return jax.process_count()


def process_index() -> int:
    import keras

    if keras.backend.backend() != "jax":
        return 0
    import jax

    return jax.process_index()


def is_writer() -> bool:
    """Whether this process writes the run directory: the only one, or process 0 of a multi-host job."""
    return process_index() == 0


def row_slice(rows: int, layout) -> slice:
    """The rows of a [rows, ...] batch that this process's devices hold under `layout` (a jax Sharding):
    one contiguous range (devices are ordered by process in the mesh)."""
    parts = sorted({(index[0].start or 0, rows if index[0].stop is None else index[0].stop)
                    for index in layout.addressable_devices_indices_map((rows,)).values()})
    for (_, end), (start, _) in zip(parts, parts[1:]):
        if start != end:
            raise ValueError(f"this process's rows of a batch of {rows} are not contiguous: {parts}")
    return slice(parts[0][0], parts[-1][1])


def local_rows(batches):
    """`batches` (an iterator of `(dict of [rows, ...] arrays,)`) with each batch cut to this process's rows
    under the active distribution's data layout; `batches` itself with one process."""
    if process_count() == 1:
        return batches
    import keras

    distribution = keras.distribution.distribution()

    def cut():
        for (batch,) in batches:
            first = next(iter(batch.values()))
            part = row_slice(len(first), distribution.get_data_layout(first.shape).backend_layout)
            yield ({name: value[part] for name, value in batch.items()},)

    return cut()


def to_numpy(value) -> np.ndarray:
    """`value` (a backend tensor) as one NumPy array: on a multi-host job, its shards gathered from every
    process (a collective: every process calls it, in the same order)."""
    from keras import ops

    if getattr(value, "is_fully_addressable", True):
        return ops.convert_to_numpy(value)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def agree(number: int) -> int:
    """The writer's `number` on every process (a collective); `number` itself with one process."""
    if process_count() == 1:
        return number
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.asarray(number, np.int64)))
