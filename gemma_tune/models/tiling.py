"""The chunked attention path's sizes, importable without Keras (`gemma_tune.plan` reads them).

A tile of `gemma_tune.models.attention.chunked_attention` is `tile_queries(...)` queries over the keys they may
see: `CHUNK_ROWS`, halved (down to `MIN_TILE_QUERIES`) while its float32 scores [B, heads, queries, keys] would
exceed `TILE_SCORES` elements (512 MiB per array) — many heads at long context (Gemma 3 27B: 32 heads, 128
queries per tile at 32k). Attention implementation "auto" takes the chunked path from `CHUNKED_FROM` queries on
(two tiles), where the cuDNN path does not apply: measured on CPU at 2 × 2048 it took 0.69× the dense path's
CPU time per step on JAX and 0.83× on torch, with less memory (bench/RESULTS.md, "Long context").
"""

CHUNK_ROWS = 1024
MIN_TILE_QUERIES = 128
TILE_SCORES = 2 ** 27
CHUNKED_FROM = 2048


def tile_queries(rows: int, heads: int, keys: int) -> int:
    """Queries per tile for `rows` rows of `heads` heads over `keys` keys (module docstring)."""
    queries = CHUNK_ROWS
    while queries > MIN_TILE_QUERIES and rows * heads * queries * keys > TILE_SCORES:
        queries //= 2
    return queries
