"""Where every gemma_tune variable lives on the device mesh, as a `keras.distribution.LayoutMap`.

Keys are regexes that match a variable's whole Keras path (LayoutMap uses `re.fullmatch`):
`block_3/attention/q_proj/kernel`, `vision/encoder/layer_0/fc1/kernel`, `score/kernel`, …; at most one key
matches any path. Values shard one
dimension over the mesh's `model` axis (FSDP / ZeRO-3: the weight is split, and XLA gathers it where it
is used); every other dimension, and everything no key names, is replicated:

    token_embedding/embeddings          [vocab, d]           vocab sharded
    q/k/v/gate/up_proj kernel           [d, out]             d (the input) sharded
    o/down_proj kernel                  [in, d]              d (the output) sharded
      int8 `kernel` and int4 packed `kernel` ([in, ⌈out/2⌉]) follow their projection; `kernel_scale`
      [out] is sharded with an o/down projection's output, else replicated
    lora_kernel_a [in, r] / lora_kernel_b [r, out]   the large dimension sharded, r replicated
    norm `scale`s, biases, LayerNorm gamma/beta      replicated (small, read by every token)
    vision: SigLIP attention/MLP kernels [in, out] input sharded, patch embedding [14, 14, 3, w] and
      position embedding [n, w] width sharded, projector [w, d] input sharded
    score/kernel (reward head) [d, 1]               d sharded

A dimension that the `model` axis does not divide stays replicated (`ShardedLayouts` says which), so
any model trains on any mesh; the optimizer's slots take their variable's layout (Keras'
`add_variable_from_reference`), so moments and gradient accumulators are sharded the same way.
"""

from __future__ import annotations

import logging

import keras

log = logging.getLogger("gemma_tune")

MODEL = "model"

# (regex, axes) — in-sharded and out-sharded projections, embeddings and heads; see the module docstring.
RULES: tuple[tuple[str, tuple], ...] = (
    (r"(?:.*/)?token_embedding/embeddings", (MODEL, None)),
    (r"(?:.*/)?(?:q_proj|k_proj|v_proj|gate_proj|up_proj|fc1|projector|score)/kernel", (MODEL, None)),
    (r"(?:.*/)?(?:o_proj|down_proj|fc2)/kernel", (None, MODEL)),
    (r"(?:.*/)?(?:o_proj|down_proj|fc2)/kernel_scale", (MODEL,)),
    (r"(?:.*/)?lora_kernel_a", (MODEL, None)),
    (r"(?:.*/)?lora_kernel_b", (None, MODEL)),
    (r"(?:.*/)?patch_embedding/kernel", (None, None, None, MODEL)),
    (r"(?:.*/)?position_embedding/embeddings", (None, MODEL)),
)


def layout_map(device_mesh) -> keras.distribution.LayoutMap:
    """The LayoutMap of `RULES` on `device_mesh` (a `keras.distribution.DeviceMesh` with a `model` axis)."""
    layouts = keras.distribution.LayoutMap(device_mesh)
    for pattern, axes in RULES:
        layouts[pattern] = axes
    return layouts


class SpreadLayout(keras.distribution.TensorLayout):
    """A TensorLayout whose dimensions may be split over several mesh axes at once (a tuple of names, as
    `jax.sharding.PartitionSpec` takes): a batch split over every device of a (batch, model) mesh."""

    def _validate_axes(self):
        names = {n for axis in self.axes if axis is not None for n in (axis if isinstance(axis, tuple) else (axis,))}
        unknown = names - set(self.device_mesh.axis_names) if self.device_mesh else set()
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh has {self.device_mesh.axis_names}")


class ShardedLayouts(keras.distribution.ModelParallel):
    """`keras.distribution.ModelParallel` with gemma_tune's `layout_map`, two refinements:

    - a variable dimension that the mesh axis it would be sharded over does not divide is replicated
      instead (a tiny test model, a 2-row LoRA factor); `replicated` lists those variables' paths;
    - every batch is split over all devices of the mesh (rows over (batch, model)), as FSDP does: the
      model axis holds weight shards and data both.
    """

    def __init__(self, device_mesh, **kwargs):
        super().__init__(layout_map=layout_map(device_mesh), batch_dim_name="batch", **kwargs)
        self.replicated: list[str] = []

    def get_variable_layout(self, variable):
        layout = super().get_variable_layout(variable)
        if not isinstance(layout, keras.distribution.TensorLayout):
            return layout  # a layout the variable already carries
        axes = list(layout.axes)
        sizes = dict(zip(self.device_mesh.axis_names, self.device_mesh.shape))
        for dim, axis in enumerate(axes):
            if axis is not None and (dim >= len(variable.shape) or variable.shape[dim] % sizes[axis]):
                axes[dim] = None
        if axes != list(layout.axes):
            self.replicated.append(variable.path)
            log.debug("%s %s: not divisible by the mesh, replicated", variable.path, tuple(variable.shape))
        return keras.distribution.TensorLayout(axes, self.device_mesh)

    def get_data_layout(self, data_shape):
        return SpreadLayout([tuple(self.device_mesh.axis_names)] + [None] * (len(data_shape) - 1), self.device_mesh)

