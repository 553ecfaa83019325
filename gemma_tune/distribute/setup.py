"""The distribution a run trains under: `distribution_for(recipe)` turns the recipe's `distribution:`
section into a Keras distribution over this job's devices (every host's), and `active(recipe)` is the
context the trainer builds the model, restores the checkpoint and runs `fit` in.

    none            no distribution (Keras' default placement: one device)
    data_parallel   keras.distribution.DataParallel over a (batch,) mesh: weights replicated
    fsdp            `ShardedLayouts` (layouts.py) over a (batch, model) mesh: weights, gradients and
                    optimizer state sharded over `model`, replicated over `batch`
    auto            `gemma_tune.plan.choose_mode`: none on one device, data_parallel when the replicated
                    model fits a device, else fsdp over every device

Each batch's rows are split over every device of the mesh, so `train.batch_size` must be a multiple of
the device count (checked here, before anything is built). Inside `active`, Keras gives every variable
its layout as it is created (the model, LoRA adapters, quantised kernels, the optimizer's slots) and
places each batch per `get_data_layout`; a checkpoint holds whole (gathered) arrays, so it restores onto
any mesh. On a multi-host job (gemma_tune.distribute.hosts) the mesh spans every host's devices.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from gemma_tune.distribute.hosts import process_count
from gemma_tune.distribute.mesh import MeshError, MeshShape, mesh_shape
from gemma_tune.errors import ConfigError

log = logging.getLogger("gemma_tune")


@dataclass
class Plan:
    """A resolved distribution: the mesh and the Keras distribution (None for mode none)."""

    mesh: MeshShape
    distribution: object | None


def job_devices(requested: int | None) -> list:
    """The devices a run uses: the first `requested` of every host's (`jax.devices()`), or all."""
    import jax

    devices = jax.devices()
    if requested is not None:
        if requested > len(devices):
            raise ConfigError(f"{requested} devices requested but this job has {len(devices)} "
                              f"({devices[0].platform}); expected at most {len(devices)}", where="distribution.devices")
        devices = devices[:requested]
    return devices


def accelerator_memory(device) -> int | None:
    """Bytes a JAX accelerator can allocate (its allocator's limit); None for a CPU."""
    if device.platform == "cpu":
        return None
    return (device.memory_stats() or {}).get("bytes_limit")


def resolve_mesh(recipe, device_count: int, device_memory: int | None) -> MeshShape:
    """The recipe's mesh over `device_count` devices (`auto` chosen by the memory plan)."""
    section = recipe.distribution
    try:
        if section.mode == "auto":
            from gemma_tune.plan import choose_mode

            return choose_mode(recipe, device_count, device_memory)
        return mesh_shape(section.mode, section.mesh, device_count)
    except MeshError as e:
        raise ConfigError(str(e), where=e.key) from None


def distribution_for(recipe) -> Plan:
    """The mesh and Keras distribution of `recipe` on this job (JAX; validation refused the others)."""
    import keras

    if recipe.distribution.mode == "none":
        return Plan(MeshShape("none"), None)
    if process_count() > 1:
        check_multi_host(recipe)
    devices = job_devices(recipe.distribution.devices)
    mesh = resolve_mesh(recipe, len(devices), accelerator_memory(devices[0]))
    if mesh.mode == "none":
        return Plan(mesh, None)
    if recipe.train.batch_size % mesh.data_shards:
        raise ConfigError(f"train.batch_size {recipe.train.batch_size} does not split over {mesh.data_shards} "
                          f"devices ({mesh.describe()}): expected a multiple of {mesh.data_shards}",
                          where="train.batch_size")
    if mesh.mode == "data_parallel":
        device_mesh = keras.distribution.DeviceMesh((mesh.batch,), ["batch"], devices)
        distribution = keras.distribution.DataParallel(device_mesh=device_mesh, auto_shard_dataset=False)
    else:
        from gemma_tune.distribute.layouts import ShardedLayouts

        device_mesh = keras.distribution.DeviceMesh((mesh.batch, mesh.model), ["batch", "model"], devices)
        distribution = ShardedLayouts(device_mesh, auto_shard_dataset=False)
    return Plan(mesh, distribution)


def check_multi_host(recipe) -> None:
    """What a multi-host job does not run (its steps read the weights on one host, which no host holds
    whole): sampling during training, exports at the end, online RL. ConfigError naming the key."""
    if recipe.train.sample_prompts:
        raise ConfigError("sampling during training does not run on a multi-host job; expected "
                          "train.sample_prompts=[] (sample the checkpoint afterwards: gemma-tune generate RUN)",
                          where="train.sample_prompts")
    if recipe.export.formats:
        raise ConfigError("a multi-host job writes checkpoints, not exports; expected export.formats=[] and the "
                          "export made from the run's checkpoint on one host: gemma-tune export RUN --format FORMAT",
                          where="export.formats")
    if recipe.data.train.format == "prompt":
        raise ConfigError(f"{recipe.method} samples completions from the weights each round, which a multi-host job "
                          "does not run; expected one host (distribution.mode data_parallel or fsdp over its devices)",
                          where="method")


@contextlib.contextmanager
def active(plan: Plan):
    """`plan`'s distribution as Keras' global one for the block (the previous one restored after)."""
    if plan.distribution is None:
        yield plan
        return
    import keras

    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(plan.distribution)
    try:
        yield plan
    finally:
        keras.distribution.set_distribution(previous)
