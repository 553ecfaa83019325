"""The device mesh a recipe's `distribution:` section asks for, as plain numbers (no backend imported).

Two axes, as keras-hub's distribution guides and MaxText name them:

    batch   each batch's rows are split over it (data parallelism); weights are replicated over it
    model   fsdp: every large weight, its gradient and its optimizer state are sharded over it

`MeshShape(mode, batch, model)`: mode none is one device (1 × 1); data_parallel is `batch` = the device
count, `model` = 1; fsdp defaults to `model` = the device count, `batch` = 1 (ZeRO-3 / FSDP: each device
holds 1/model of the weights), and a mesh such as {batch: 2, model: 4} shards weights 4 ways and
replicates them twice (hybrid sharding, for a model that fits in 4 devices). In both multi-device modes a
batch is split over every device of the mesh (`data_shards` = batch · model rows slices: under fsdp the
model axis carries data too, as FSDP does), so `train.batch_size` must be a multiple of the device count.
"""

from __future__ import annotations

from dataclasses import dataclass

AXES = ("batch", "model")


@dataclass(frozen=True)
class MeshShape:
    """A resolved mesh: `mode` in none | data_parallel | fsdp and the axis sizes."""

    mode: str
    batch: int = 1
    model: int = 1

    @property
    def devices(self) -> int:
        return self.batch * self.model

    @property
    def data_shards(self) -> int:
        """How many slices each batch's rows are split into (one per device)."""
        return self.devices

    @property
    def weight_shards(self) -> int:
        """How many ways a sharded weight is split (1 = replicated)."""
        return self.model if self.mode == "fsdp" else 1

    def describe(self) -> str:
        if self.mode == "none":
            return "one device"
        return f"{self.mode} on {self.devices} devices (mesh batch {self.batch} × model {self.model})"


class MeshError(ValueError):
    """A mesh that cannot be made from the devices at hand: `key` is the recipe key to change."""

    def __init__(self, message: str, key: str = "distribution.mesh"):
        super().__init__(message)
        self.key = key


def mesh_shape(mode: str, mesh: dict[str, int] | None, device_count: int) -> MeshShape:
    """The mesh of an explicit `mode` (none | data_parallel | fsdp; `auto` is decided by
    `gemma_tune.distribute.choose`) over `device_count` devices, `mesh` being the recipe's axis sizes or
    None. Raises MeshError when the sizes do not multiply to the device count or mix with the mode."""
    if mode == "none":
        if mesh and any(size != 1 for size in mesh.values()):
            raise MeshError("distribution.mode none runs on one device; a mesh needs mode data_parallel or fsdp")
        return MeshShape("none")
    if mesh is None:
        return MeshShape(mode, batch=device_count) if mode == "data_parallel" else MeshShape(mode, model=device_count)
    unknown = sorted(set(mesh) - set(AXES))
    if unknown:
        raise MeshError(f"unknown mesh axis {unknown[0]!r}; expected batch and model")
    if any(size < 1 for size in mesh.values()):
        raise MeshError("mesh axis sizes must be at least 1")
    batch, model = mesh.get("batch", 1), mesh.get("model", 1)
    if "batch" not in mesh:
        batch = max(1, device_count // model)
    if "model" not in mesh:
        model = max(1, device_count // batch)
    if batch * model != device_count:
        raise MeshError(f"mesh batch {batch} × model {model} = {batch * model} devices, but {device_count} are in "
                        "use (distribution.devices, else all); expected axis sizes whose product is "
                        f"{device_count}")
    if mode == "data_parallel" and model != 1:
        raise MeshError("data_parallel replicates the weights: its mesh has no model axis (use mode fsdp to shard)")
    return MeshShape(mode, batch=batch, model=model)
