"""What a training step costs: FLOPs per token, the accelerator's peak FLOP/s (for MFU) and peak memory.

FLOPs per trained-on token (the usual transformer accounting, PaLM appendix B):

    forward 2·N, backward through activations 2·N, weight gradients 2·N_trainable, plus attention
    12 · layers · heads · head_dim · T (scores and values, forward and backward)

so 6·N + attention for full fine-tuning, 4·N + 2·N_lora + attention for LoRA (the frozen base gets no
weight gradients). N counts every parameter once (the tied embedding is the output projection).
MFU = tokens/s · FLOPs per token / peak FLOP/s of the device, reported only on a known accelerator.
"""

from __future__ import annotations

import resource
import sys

import keras

# Dense bf16 peak FLOP/s (no sparsity), by a substring of the device name.
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12), ("L40S", 362e12),
    ("L4", 121e12), ("A10G", 70e12), ("V100", 125e12), ("T4", 65e12), ("B200", 2250e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v4", 275e12),
)


def flops_per_token(total_params: int, trainable_params: int, arch, seq_len: int) -> float:
    attention = 12 * arch.num_layers * arch.num_heads * arch.head_dim * seq_len
    return 4.0 * total_params + 2.0 * trainable_params + attention


def accelerator() -> str | None:
    """Name of the first accelerator the backend uses (`gemma_tune.environment.devices`), or None on CPU."""
    from gemma_tune.environment import devices

    return next((d["name"] for d in devices(keras.backend.backend()) if d["kind"] != "cpu"), None)


def peak_flops(device_name: str | None) -> float | None:
    if device_name is None:
        return None
    return next((flops for key, flops in PEAK_FLOPS if key.lower() in device_name.lower()), None)


def peak_memory_bytes() -> tuple[int | None, str]:
    """(peak bytes, what was measured): accelerator memory where the backend reports it, else the
    process's peak resident memory (host)."""
    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            stats = jax.devices()[0].memory_stats() or {}
            if "peak_bytes_in_use" in stats:
                return int(stats["peak_bytes_in_use"]), "device"
        elif backend == "torch":
            import torch

            if torch.cuda.is_available():
                return int(torch.cuda.max_memory_allocated()), "device"
        else:
            import tensorflow as tf

            if tf.config.list_physical_devices("GPU"):
                return int(tf.config.experimental.get_memory_info("GPU:0")["peak"]), "device"
    except (RuntimeError, ValueError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "host"
