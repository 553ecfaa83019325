"""LoRA, QLoRA-style quantisation of the frozen base, what of a vision model trains, and access to the
model's weights by path.

LoRA (Hu et al., 2021) on a projection W [in, out]:  y = x·W + (α/r)·(dropout(x)·A)·B with A [in, r]
(random), B [r, out] (zeros), W frozen. Keras' own Dense LoRA variables hold A and B
(`lora_kernel_a`, `lora_kernel_b`). Merging folds the update into the base, W ← W + (α/r)·A·B, computed
in float32; `unmerge_lora` restores W and B.

QLoRA-style: `quantize_base` quantises every projection kernel to int8 or int4 with Keras' own
quantisation (the tied embedding stays in the compute dtype: it is also the output head); adapters added
afterwards stay float32.

Weight paths follow docs/CONTRACTS.md ("Weight layout"), e.g. `blocks.3.attention.q_proj.kernel`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import numpy as np
from keras import ops

from gemma_tune.models.projection import Projection

LORA_TARGET_PROJECTIONS = {
    "q": ("attention", "q_proj"), "k": ("attention", "k_proj"), "v": ("attention", "v_proj"),
    "o": ("attention", "o_proj"), "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}


def projections(model) -> Iterator[tuple[str, Projection]]:
    """Every projection of the model as (path without `.kernel`, layer), block by block."""
    for i, block in enumerate(model.blocks):
        for sub, name in LORA_TARGET_PROJECTIONS.values():
            yield f"blocks.{i}.{sub}.{name}", getattr(getattr(block, sub), name)


def lora_projections(model) -> Iterator[tuple[str, Projection]]:
    """(path, layer) for every projection with LoRA enabled."""
    return ((path, layer) for path, layer in projections(model) if layer.lora_enabled)


@contextmanager
def adapters_disabled(model) -> Iterator[None]:
    """Within the block, the model computes without its LoRA adapters: the frozen base alone (the
    reference model of DPO/IPO with LoRA, with no second copy of the weights). It switches Keras'
    `lora_enabled` flag of each adapted projection, read when the call is traced, so a traced step
    may call the model both ways."""
    adapted = [layer for _, layer in lora_projections(model)]
    for layer in adapted:
        layer.lora_enabled = False
    try:
        yield
    finally:
        for layer in adapted:
            layer.lora_enabled = True


def _owner(model, path: str):
    """(the layer holding the weight at `path`, the weight's attribute name)."""
    node = model
    *parts, leaf = path.split(".")
    for part in parts:
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node, leaf


def get_variable(model, path: str):
    """The variable at a weight path such as `blocks.3.attention.q_proj.kernel` (the base kernel, never
    a LoRA-merged view) or `blocks.3.attention.q_proj.lora_kernel_a`."""
    node, leaf = _owner(model, path)
    if leaf == "kernel" and isinstance(node, Projection):
        return node._kernel
    return getattr(node, leaf)


def float_weight(model, path: str, merge_lora: bool = True) -> np.ndarray:
    """The weight at `path` as float32 NumPy in our layout, as exports write it: a projection kernel
    through `float_kernel` (dequantised, LoRA merged when `merge_lora`), any other weight cast."""
    node, leaf = _owner(model, path)
    if leaf == "kernel" and isinstance(node, Projection):
        return float_kernel(node, merge_lora=merge_lora)
    return ops.convert_to_numpy(ops.cast(getattr(node, leaf), "float32")).astype(np.float32)


def enable_lora(model, rank: int, alpha: float, dropout: float = 0.0,
                targets: Iterable[str] = tuple(LORA_TARGET_PROJECTIONS)) -> None:
    """Freeze the whole model and add LoRA adapters (float32) to the target projections."""
    targets = set(targets)
    unknown = targets - set(LORA_TARGET_PROJECTIONS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; expected {list(LORA_TARGET_PROJECTIONS)}")
    target_names = {LORA_TARGET_PROJECTIONS[t][1] for t in targets}
    model.token_embedding.trainable = False
    if model.vision is not None:
        model.vision.trainable = False
    model.final_norm.trainable = False
    for block in model.blocks:
        for norm in (block.pre_attention_norm, block.post_attention_norm, block.pre_ffw_norm,
                     block.post_ffw_norm, getattr(block.attention, "q_norm", None),
                     getattr(block.attention, "k_norm", None)):
            if norm is not None:
                norm.trainable = False
    for path, layer in projections(model):
        if path.rsplit(".", 1)[-1] in target_names:
            layer.enable_lora(rank, lora_alpha=alpha, dropout=dropout)
        else:
            layer.trainable = False


def merge_lora(model) -> None:
    """Fold every adapter into its base kernel (float32 arithmetic), keeping B aside for `unmerge_lora`.

    Afterwards the adapters are inert (B = 0) and the model computes the same function.
    """
    for path, layer in lora_projections(model):
        if layer.quantization_mode is not None:
            raise ValueError(f"{path}: cannot merge LoRA into a {layer.quantization_mode} kernel in place; "
                             "use float_kernel(layer) to read the merged float weights")
        b = ops.convert_to_numpy(layer.lora_kernel_b)
        if not np.any(b):
            continue
        merged = float_kernel(layer, merge_lora=True)
        layer._kernel.assign(ops.cast(merged, layer._kernel.dtype))
        layer._lora_b_before_merge = b
        layer.lora_kernel_b.assign(np.zeros_like(b))


def unmerge_lora(model) -> None:
    """Undo `merge_lora`: W ← W − (α/r)·A·B and B restored (exact up to float32 rounding)."""
    for _, layer in lora_projections(model):
        b = getattr(layer, "_lora_b_before_merge", None)
        if b is None:
            continue
        a = ops.convert_to_numpy(ops.cast(layer.lora_kernel_a, "float32"))
        base = ops.convert_to_numpy(ops.cast(layer._kernel, "float32"))
        base = base - (layer.lora_alpha / layer.lora_rank) * (a @ b.astype(np.float32))
        layer._kernel.assign(ops.cast(base, layer._kernel.dtype))
        layer.lora_kernel_b.assign(b)
        del layer._lora_b_before_merge


def float_kernel(layer: Projection, merge_lora: bool = True) -> np.ndarray:
    """The projection's kernel [in, out] as float32 NumPy: dequantised if the base is int8/int4, plus the
    LoRA update (α/r)·A·B when `merge_lora` and LoRA is enabled."""
    mode = layer.quantization_mode
    if mode is None:
        kernel = ops.cast(layer._kernel, "float32")
    elif mode == "int8":
        kernel = ops.cast(layer._kernel, "float32") / ops.cast(layer.kernel_scale, "float32")
    elif mode == "int4":
        from keras.src.quantizers.quantizers import dequantize_with_sz_map, unpack_int4

        unpacked = ops.cast(unpack_int4(layer._kernel, layer._orig_output_dim, axis=-1), "float32")
        block_size = getattr(layer, "_int4_block_size", None)
        if block_size is None or block_size == -1:
            kernel = unpacked / ops.cast(layer.kernel_scale, "float32")
        else:
            kernel = ops.cast(dequantize_with_sz_map(unpacked, layer.kernel_scale, layer.kernel_zero,
                                                     layer.g_idx, group_axis=0), "float32")
    else:
        raise ValueError(f"unsupported quantisation mode {mode!r}")
    kernel = ops.convert_to_numpy(kernel).astype(np.float32)
    if merge_lora and layer.lora_enabled:
        a = ops.convert_to_numpy(ops.cast(layer.lora_kernel_a, "float32"))
        b = ops.convert_to_numpy(ops.cast(layer.lora_kernel_b, "float32"))
        kernel = kernel + np.float32(layer.lora_alpha / layer.lora_rank) * (a @ b)
    return kernel


def quantize_base(model, mode: str) -> None:
    """Quantise every projection kernel ("int8" or "int4", Keras' quantisation, per output channel).

    Call before `enable_lora`: the adapters then stay in float32 on the frozen quantised base.
    """
    if mode not in ("int8", "int4"):
        raise ValueError(f"quantisation mode must be int8 or int4, got {mode!r}")
    config = None
    if mode == "int4":
        from keras.quantizers import Int4QuantizationConfig

        config = Int4QuantizationConfig(block_size=-1)
    for _, layer in projections(model):
        if layer.lora_enabled:
            raise ValueError("quantize_base must come before enable_lora")
        layer.quantize(mode, type_check=False, config=config)


def count_params(model) -> dict[str, int]:
    """{"total": every weight element, "trainable": trainable elements} (int4 kernels count packed)."""
    def size(v):
        return int(np.prod(v.shape)) if len(v.shape) else 1
    total = sum(size(v) for v in model.weights)
    trainable = sum(size(v) for v in model.trainable_weights)
    return {"total": total, "trainable": trainable}


VISION_TRAINING = ("none", "projector", "all")


def set_vision_training(model, mode: str) -> None:
    """Which part of a vision model's image side trains: "none" (SigLIP and the projector frozen, as the
    references tune PaliGemma and Gemma 3), "projector" (the projector, and Gemma 3's soft-token norm), or
    "all" (the encoder too). A model without `vision` is left as it is."""
    if mode not in VISION_TRAINING:
        raise ValueError(f"vision training must be one of {VISION_TRAINING}, got {mode!r}")
    vision = model.vision
    if vision is None:
        return
    vision.trainable = mode != "none"
    vision.encoder.trainable = mode == "all"


def add_recipe_adapters(model, recipe) -> None:
    """The recipe's `quantize` (frozen base kernels) then its `lora` adapters, in that order: adapters
    added after quantisation stay float32 (QLoRA). Used by training and to restore a run's checkpoint."""
    if recipe.quantize is not None:  # validation ensures `lora:` is set too
        quantize_base(model, recipe.quantize)
    if recipe.lora is not None:
        lora = recipe.lora
        enable_lora(model, lora.rank, lora.alpha, dropout=lora.dropout, targets=lora.targets)
    set_vision_training(model, recipe.model.train_vision)
