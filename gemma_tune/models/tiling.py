"""The chunked attention path's sizes, importable without Keras (`gemma_tune.plan` reads them).

`CHUNK_ROWS` queries make one tile of `gemma_tune.models.attention.chunked_attention`: a tile's float32
logits and probabilities are [B, heads, CHUNK_ROWS, keys]. Attention implementation "auto" takes the chunked
path from `CHUNKED_FROM` queries on, where the cuDNN path does not apply.
"""

CHUNK_ROWS = 1024
CHUNKED_FROM = 8192
