"""One attention layer's forward on torch, compiled: FlexAttention against the dense-mask and tiled paths.

    KERAS_BACKEND=torch python bench/flex_forward.py                       # 1 × 2048 and 1 × 8192, window 512
    KERAS_BACKEND=torch python bench/flex_forward.py --length 4096 --heads 8 --repeats 10

For queries [1, T, heads, head_dim] over one key/value head (Gemma 3 1B's shape by default: 4 heads of 256),
causal self-attention over a row packed with segments of T/4 tokens, each path's `attend` (with its structure
built inside the compiled function, as the decoder does) is compiled by torch.compile and timed, without
gradients: "fused" (`scaled_dot_product_attention` under the dense [B, T, T] mask), "chunked" (tiles of
`tiling.CHUNK_ROWS` queries) and "flex" (FlexAttention: the rule inside the kernel, empty 128 × 128 tiles
skipped). On a CPU this is the forward only (torch 2.13 has no FlexAttention backward there); on a GPU the same
script times the same forwards. One JSON line per path, length and window: the median seconds of `--repeats`
calls after one compiling call, the largest difference from the fused path's output, and the share of
128 × 128 tiles the block mask leaves to compute.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "torch")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, action="append", default=None, help="tokens (default 2048 and 8192)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--window", type=int, action="append", default=None, help="sliding windows besides global")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    import torch

    from gemma_tune.models import tiling
    from gemma_tune.models.attention import attend, attention_structure
    from gemma_tune.models.flex import block_mask

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    torch.set_grad_enabled(False)
    for length in args.length or [2048, 8192]:
        generator = torch.Generator().manual_seed(0)
        q = torch.randn(1, length, args.heads, args.head_dim, generator=generator).to(device, dtype)
        k, v = (torch.randn(1, length, 1, args.head_dim, generator=generator).to(device, dtype) for _ in range(2))
        index = torch.arange(length, dtype=torch.int32, device=device)
        segments = (index // (length // 4) + 1)[None]
        for window in [None, *(args.window or [512])]:
            reference = None
            for path in ("fused", "chunked", "flex"):
                def run(q, k, v, path=path, window=window):
                    structure = attention_structure(index, index, segments, segments, window, self_attention=True,
                                                    dense=path == "fused", flex=path == "flex")
                    return attend(q, k, v, structure, scale=args.head_dim ** -0.5, softcap=None,
                                  implementation=path)

                torch._dynamo.reset()
                compiled = torch.compile(run)
                start = time.perf_counter()
                out = compiled(q, k, v)
                first = time.perf_counter() - start
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    out = compiled(q, k, v)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                reference = out if reference is None else reference
                mask = block_mask(attention_structure(index, index, segments, segments, window,
                                                      self_attention=True, dense=False))
                print(json.dumps({
                    "path": path, "length": length, "window": window, "heads": args.heads,
                    "head_dim": args.head_dim, "dtype": args.dtype, "device": device,
                    "threads": torch.get_num_threads(), "chunk_rows": tiling.CHUNK_ROWS,
                    "seconds_median": round(statistics.median(times), 4), "first_call_s": round(first, 2),
                    "max_abs_diff_vs_fused": float((out.float() - reference.float()).abs().max()),
                    "tiles_computed": round(1.0 - mask.sparsity() / 100, 4),
                    "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
