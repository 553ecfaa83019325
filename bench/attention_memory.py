"""XLA's memory for one attention layer's gradient: the dense plain path against the chunked path (JAX).

    KERAS_BACKEND=jax python bench/attention_memory.py                  # 8192 tokens, global and window 512
    KERAS_BACKEND=jax python bench/attention_memory.py --length 16384 --window 1024 --heads 8

For queries [1, T, heads, 64] over one key/value head, causal self-attention in one segment, the gradient of
sum(attention(q, k, v)) with respect to q, k and v is jitted and compiled (not run), and XLA's
`memory_analysis()` temp bytes are printed per path: "plain" (`plain_attention` over the dense mask: [T, T]
logits, exponentials and probabilities) and "chunked" (`chunked_attention` in training, tiles of
`tiling.CHUNK_ROWS` queries rematerialised). One JSON line per path and window.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("KERAS_BACKEND", "jax")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--window", type=int, action="append", default=None, help="sliding windows besides global")
    args = p.parse_args()
    import jax
    import jax.numpy as jnp

    from gemma_tune.models import tiling
    from gemma_tune.models.attention import attention_structure, chunked_attention, plain_attention

    length = args.length
    index, segments = jnp.arange(length, dtype=jnp.int32), jnp.ones((1, length), jnp.int32)
    q = jnp.ones((1, length, args.heads, args.head_dim), jnp.float32)
    kv = jnp.ones((1, length, 1, args.head_dim), jnp.float32)
    for window in [None, *(args.window or [512])]:
        for path in ("plain", "chunked"):
            def loss(q, k, v, path=path, window=window):
                structure = attention_structure(index, index, segments, segments, window, self_attention=True,
                                                dense=path == "plain")
                if path == "plain":
                    return jnp.sum(plain_attention(q, k, v, structure.dense(), scale=0.125, softcap=None))
                return jnp.sum(chunked_attention(q, k, v, structure, scale=0.125, softcap=None, training=True))

            compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
            memory = compiled.memory_analysis()
            print(json.dumps({"path": path, "length": length, "window": window, "heads": args.heads,
                              "chunk_rows": tiling.CHUNK_ROWS, "platform": jax.devices()[0].platform,
                              "temp_mib": round(memory.temp_size_in_bytes / 2 ** 20, 1),
                              "argument_mib": round(memory.argument_size_in_bytes / 2 ** 20, 1)}))


if __name__ == "__main__":
    main()
