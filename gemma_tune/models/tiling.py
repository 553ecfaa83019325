"""The chunked attention path's sizes, importable without Keras (`gemma_tune.plan` reads them).

`CHUNK_ROWS` queries make one tile of `gemma_tune.models.attention.chunked_attention`: a tile's float32
logits and probabilities are [B, heads, CHUNK_ROWS, keys]. Attention implementation "auto" takes the chunked
path from `CHUNKED_FROM` queries on (two tiles), where the cuDNN path does not apply: measured on CPU at 2 × 2048
it took 0.69× the dense path's CPU time per step on JAX and 0.83× on torch, with less memory (bench/RESULTS.md,
"Long context").
"""

CHUNK_ROWS = 1024
CHUNKED_FROM = 2048
