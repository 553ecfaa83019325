"""Gemma self-attention: GQA/MQA projections, optional QK-norm, RoPE, soft-capped scaled dot products.

For query i and key j of one sequence (indices into the token axis, positions from the inputs):

    logits_ij = scale · q_i·k_j                    scale = 1/√query_pre_attn_scalar (1/√head_dim)
    logits_ij = c · tanh(logits_ij / c)            Gemma 2 attention soft-cap c (50.0)
    p_i       = softmax_j(logits_ij where allowed_ij, else −∞)    in float32
    out_i     = Σ_j p_ij v_j

`allowed` comes from `attention_mask`: same segment, key not padding, causal (j ≤ i) or both in the
same attention block (PaliGemma's prefix, a Gemma 3 image: `gemma_tune.models.vision`), and on
sliding-window layers i − j < window. Query heads share key/value heads in groups (GQA; MQA when
there is one key/value head).

A layer receives that rule as an `AttentionStructure` (indices, segments, blocks, window) and the dense
[B, Tq, Tk] mask only when the path that runs needs it. The chunked path never builds it: it runs the
reference equations over tiles of queries (`tiling.tile_queries`), each tile's mask made from the structure
inside the tile, and keys no query of a causal tile may see (after its last query, before its window) left
out of the tile; in training each tile is rematerialised, so a layer keeps O(T) for its backward, not [T, T].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import keras
from keras import ops

from gemma_tune.models.layers import RMSNorm, apply_rope, rope_angles
from gemma_tune.models.init import HostNormal
from gemma_tune.models.projection import Projection
from gemma_tune.models import tiling
from gemma_tune.models.flex import block_mask, flex_attention, flex_attention_applies
from gemma_tune.models.cache import write_slots

MASKED_LOGIT = -1e30


def attention_mask(query_index, key_index, query_segment, key_segment, window: int | None = None,
                   query_block=None, key_block=None, window_bounds_blocks: bool = True):
    """Boolean [B, Tq, Tk] mask of allowed (query, key) pairs.

    `query_index` [Tq] / `key_index` [Tk] are token indices in one shared frame (cache slots while
    decoding); `query_segment` [B, Tq] / `key_segment` [B, Tk] are segment ids, 0 for padding;
    `query_block` [B, Tq] / `key_block` [B, Tk] (optional) attention block ids, 0 for causal tokens.
    Allowed: same non-zero segment, and key_index ≤ query_index or the same non-zero block; on a
    sliding layer also query_index − key_index < window — for every pair when `window_bounds_blocks`
    (Gemma 3: AND(window, OR(causal, block)), as transformers), else for causal pairs only (PaliGemma 2:
    OR(AND(causal, window), block), as transformers). A padding query attends to its own slot only, so that every row has one allowed
    key and no NaN can arise from an empty softmax (its output is never trained on or returned as
    meaningful).
    """
    qi = query_index[:, None]
    ki = key_index[None, :]
    order = (ki <= qi)[None]
    in_window = ((qi - ki) < window)[None] if window is not None else None
    if in_window is not None and not window_bounds_blocks:
        order = ops.logical_and(order, in_window)
    if query_block is not None:
        same_block = ops.logical_and(ops.equal(query_block[:, :, None], key_block[:, None, :]),
                                     ops.not_equal(query_block, 0)[:, :, None])
        order = ops.logical_or(order, same_block)
    if in_window is not None and window_bounds_blocks:
        order = ops.logical_and(order, in_window)
    same = ops.equal(query_segment[:, :, None], key_segment[:, None, :])
    real_key = ops.not_equal(key_segment, 0)[:, None, :]
    allowed = ops.logical_and(ops.logical_and(same, real_key), order)
    self_slot = ops.logical_and(ops.equal(query_segment, 0)[:, :, None], ops.equal(qi, ki)[None])
    return ops.logical_or(allowed, self_slot)



@dataclass(frozen=True, eq=False)
class AttentionStructure:
    """Which (query, key) pairs attend — the rule of `attention_mask`, as its inputs rather than its output.

    `self_attention`: queries and keys are one frame (query i is key i, the indices are the token axis: a forward
    pass without a cache), so a causal tile of queries [start, stop) never sees keys ≥ stop, nor (sliding layers)
    keys ≤ start − window.
    `mask`: the dense [B, Tq, Tk] mask, built once outside any rematerialised block when the path that runs
    reads it; None on the chunked path (a dense path that meets None builds it then: `dense`).
    `block_mask`: on the FlexAttention path, its `BlockMask` (`flex.block_mask`), built once the same way.
    """

    query_index: object
    key_index: object
    query_segment: object
    key_segment: object
    window: int | None = None
    query_block: object = None
    key_block: object = None
    window_bounds_blocks: bool = True
    self_attention: bool = False
    mask: object = None
    block_mask: object = None

    @property
    def causal(self) -> bool:
        """No attention blocks: no key after its query is ever allowed."""
        return self.query_block is None

    def dense(self):
        """The [B, Tq, Tk] mask (`mask` when it was built)."""
        return self.mask if self.mask is not None else self.tile(0, None, 0, None)

    def tile(self, start: int, stop: int | None, key_start: int, key_stop: int | None):
        """The mask [B, stop − start, key_stop − key_start] of queries [start, stop) over keys
        [key_start, key_stop)."""
        query_block = None if self.query_block is None else self.query_block[:, start:stop]
        key_block = None if self.key_block is None else self.key_block[:, key_start:key_stop]
        return attention_mask(self.query_index[start:stop], self.key_index[key_start:key_stop],
                              self.query_segment[:, start:stop], self.key_segment[:, key_start:key_stop],
                              self.window, query_block, key_block, self.window_bounds_blocks)

    def key_range(self, start: int, stop: int, keys: int) -> tuple[int, int]:
        """The keys [first, last) that queries [start, stop) may see: all of them unless causal self-attention
        bounds them by the tile's last query and the window."""
        if not (self.self_attention and self.causal):
            return 0, keys
        first = 0 if self.window is None else max(0, start - self.window + 1)
        return first, min(stop, keys)


def attention_structure(query_index, key_index, query_segment, key_segment, window: int | None = None,
                        query_block=None, key_block=None, *, window_bounds_blocks: bool = True,
                        self_attention: bool = False, dense: bool = True, flex: bool = False) -> AttentionStructure:
    """An `AttentionStructure`, with its dense mask built now when `dense`, its FlexAttention `BlockMask` when
    `flex`."""
    structure = AttentionStructure(query_index, key_index, query_segment, key_segment, window, query_block,
                                   key_block, window_bounds_blocks, self_attention)
    if not (dense or flex):
        return structure
    return dataclasses.replace(structure, mask=structure.dense() if dense else None,
                               block_mask=block_mask(structure) if flex else None)


def plain_attention(query, key, value, mask, *, scale: float, softcap: float | None):
    """Reference attention in keras.ops. query [B, T, N, D], key/value [B, S, K, D], mask [B, T, S]."""
    length, num_heads, head_dim = ops.shape(query)[1], query.shape[2], query.shape[3]
    num_kv = key.shape[2]
    groups = num_heads // num_kv
    query = ops.reshape(query, (-1, length, num_kv, groups, head_dim))
    logits = ops.einsum("btkgd,bskd->bkgts", query, key)
    logits = ops.cast(logits, "float32") * scale
    if softcap is not None:
        logits = softcap * ops.tanh(logits / softcap)
    logits = ops.where(mask[:, None, None, :, :], logits, MASKED_LOGIT)
    probs = ops.cast(ops.softmax(logits, axis=-1), value.dtype)
    out = ops.einsum("bkgts,bskd->btkgd", probs, value)
    return ops.reshape(out, (-1, length, num_heads, head_dim))


def fused_attention(query, key, value, mask, *, scale: float):
    """`keras.ops.dot_product_attention` (flash / cuDNN / SDPA kernels where the backend has them).

    On torch the kernel is `scaled_dot_product_attention` with the mask as a bias, which rules out torch's flash
    kernel: Keras is told so (`flash_attention=False`) instead of asking torch, whose check builds a pybind11
    object that torch.compile cannot trace and so splits a compiled step's graph at every attention layer. The
    kernel torch picks is the same either way.

    One key/value head (MQA: Gemma 3 270M/1B, Gemma 1 2B) is repeated to the query heads on TensorFlow and torch:
    Keras 3.15 repeats key/value heads only when there are several. On TensorFlow its einsum then fails; on
    torch a single head reaches `scaled_dot_product_attention` as a broadcast, which its fused CUDA kernels
    (memory-efficient, cuDNN) refuse without `enable_gqa` — torch would fall back to the math kernel, which
    builds the [B, heads, T, S] scores.
    """
    num_heads, num_kv = query.shape[2], key.shape[2]
    backend = keras.backend.backend()
    if num_kv == 1 and num_heads > 1 and backend in ("tensorflow", "torch"):
        key = ops.repeat(key, num_heads, axis=2)
        value = ops.repeat(value, num_heads, axis=2)
    return ops.dot_product_attention(query, key, value, mask=mask[:, None, :, :], scale=scale,
                                     flash_attention=False if backend == "torch" else None)



def chunked_attention(query, key, value, structure: AttentionStructure, *, scale: float, softcap: float | None,
                      training: bool = False, tile_queries: int | None = None):
    """The attention of `tile_queries` queries at a time, never the [B, Tq, Tk] mask (module docstring).

    Each tile is the plain path (with a soft-cap) or the fused kernel over the keys `structure.key_range`
    leaves it, under the mask `structure.tile` makes for it. Exact: a key left out of a tile is one the mask
    forbids, whose probability is exactly 0 on the dense path. With `training` each tile is rematerialised
    (`keras.remat`): its mask, logits and probabilities are recomputed in the backward. The whole float
    queries, keys and values enter the rematerialised function and are sliced inside it, so the backward keeps
    them once rather than each tile's slices. `tile_queries` defaults to `tiling.tile_queries` of the shapes.
    """
    length, keys = query.shape[1], key.shape[1]
    if length is None or keys is None:
        raise ValueError("the chunked attention path needs static query and key lengths")
    step = tile_queries or tiling.tile_queries(query.shape[0] or 1, query.shape[2], keys)
    tiles = []
    for start in range(0, length, step):
        stop = min(start + step, length)
        first, last = structure.key_range(start, stop, keys)

        def tile(q, k, v, start=start, stop=stop, first=first, last=last):
            q, k, v = q[:, start:stop], k[:, first:last], v[:, first:last]
            mask = structure.tile(start, stop, first, last)
            if softcap is not None:
                return plain_attention(q, k, v, mask, scale=scale, softcap=softcap)
            return fused_attention(q, k, v, mask, scale=scale)

        run = keras.remat(tile) if training else tile
        tiles.append(run(query, key, value))
    return tiles[0] if len(tiles) == 1 else ops.concatenate(tiles, axis=1)


def runs_flex(implementation: str, tensor, self_attention: bool) -> bool:
    """Whether `attend` takes FlexAttention (`flex.flex_attention`): "flex", or "auto" for self-attention (a
    forward pass without a cache) where `flex.flex_attention_applies` to `tensor` (the queries or their segment
    ids): torch.compile tracing for a Hopper or Blackwell GPU."""
    return implementation == "flex" or (implementation == "auto" and self_attention
                                        and flex_attention_applies(tensor))


def runs_in_chunks(implementation: str, query_length, dtype, causal_self_attention: bool) -> bool:
    """Whether `attend` takes the chunked path: "chunked", or "auto" from `tiling.CHUNKED_FROM` queries on (a
    static length) unless the cuDNN path applies (causal self-attention, JAX on a GPU, 16-bit)."""
    if implementation == "chunked":
        return True
    if implementation != "auto" or not isinstance(query_length, int) or query_length < tiling.CHUNKED_FROM:
        return False
    return not (causal_self_attention and cudnn_attention_available(dtype))


def cudnn_attention_available(dtype) -> bool:
    """Whether the cuDNN flash-attention fast path applies: JAX backend, a GPU, 16-bit compute."""
    if keras.backend.backend() != "jax" or str(dtype) not in ("bfloat16", "float16"):
        return False
    import jax

    return jax.devices()[0].platform == "gpu"


def cudnn_attention(query, key, value, mask, *, scale: float, window: int | None):
    """JAX's cuDNN flash attention (the backend-specific fast path; JAX on GPU only).

    Self-attention over one frame (query i and key i are the same token): cuDNN applies the causal
    and sliding-window structure itself and skips the blocks they exclude; `mask` (segments and
    padding, a subset of causal ∧ window) is added as a bias. Never builds [B, heads, T, T] logits.
    """
    import jax

    return jax.nn.dot_product_attention(
        query, key, value, mask=mask[:, None, :, :], scale=scale, is_causal=True,
        local_window_size=(window - 1, 0) if window is not None else None, implementation="cudnn")


def attend(query, key, value, structure: AttentionStructure, *, scale: float, softcap: float | None,
           implementation: str = "auto", training: bool = False):
    """Attention through the fastest exact path.

    `implementation`: "plain" (keras.ops reference over the dense mask), "fused"
    (`keras.ops.dot_product_attention`), "cudnn" (JAX GPU flash attention, causal self-attention only),
    "chunked" (`chunked_attention`: tiles of queries, no dense mask; a soft-cap tile is plain), "flex" (torch's
    FlexAttention, `flex.flex_attention`: any structure and the soft-cap, no dense mask; no backward on a CPU),
    or "auto": FlexAttention where `runs_flex`, else chunked where `runs_in_chunks`, else cuDNN where it
    applies, else fused without a soft-cap, else plain. cuDNN applies causal structure itself and would drop the
    key-after-query pairs of attention blocks (a PaliGemma prefix, a Gemma 3 image): with blocks "auto" takes
    the fused path and "cudnn" is an error.
    """
    if runs_flex(implementation, query, structure.self_attention):
        return flex_attention(query, key, value, structure, scale=scale, softcap=softcap)
    causal_self = structure.self_attention and structure.causal
    if runs_in_chunks(implementation, query.shape[1], query.dtype, causal_self):
        return chunked_attention(query, key, value, structure, scale=scale, softcap=softcap, training=training)
    if implementation == "plain" or (implementation == "auto" and softcap is not None):
        return plain_attention(query, key, value, structure.dense(), scale=scale, softcap=softcap)
    if softcap is not None:
        raise ValueError(f"the {implementation} attention kernel has no exact logit soft-cap")
    if implementation == "cudnn" or (implementation == "auto" and causal_self
                                     and cudnn_attention_available(query.dtype)):
        if not structure.self_attention:
            raise ValueError("the cudnn attention path needs self-attention over one frame (no cache)")
        if not structure.causal:
            raise ValueError("the cudnn attention path is causal only: it would drop the bidirectional attention "
                             "of image and prefix tokens; use attention implementation auto, fused or plain")
        if implementation == "cudnn":
            return cudnn_attention(query, key, value, structure.dense(), scale=scale, window=structure.window)
        try:  # "auto": cuDNN checks shapes, head size and its version while tracing
            return cudnn_attention(query, key, value, structure.dense(), scale=scale, window=structure.window)
        except (ValueError, NotImplementedError, RuntimeError) as e:
            _warn_once(f"cuDNN attention unavailable here ({e}); using keras.ops.dot_product_attention")
    return fused_attention(query, key, value, structure.dense(), scale=scale)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        import logging

        logging.getLogger("gemma_tune").warning(message)


class GemmaAttention(keras.layers.Layer):
    """One attention layer. `window` set = a sliding-window (local) layer; rope (θ, scaling) per layer."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 query_scale: float, rope_theta: float, rope_scaling: float = 1.0,
                 window: int | None = None, softcap: float | None = None, qk_norm: bool = False,
                 rms_norm_eps: float = 1e-6, implementation: str = "auto", **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.query_scale = query_scale
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.window = window
        self.softcap = softcap
        self.qk_norm = qk_norm
        self.rms_norm_eps = rms_norm_eps
        self.implementation = implementation
        init = HostNormal(stddev=0.02)
        policy = self.dtype_policy
        self.q_proj = Projection(num_heads * head_dim, kernel_initializer=init, dtype=policy, name="q_proj")
        self.k_proj = Projection(num_kv_heads * head_dim, kernel_initializer=init, dtype=policy, name="k_proj")
        self.v_proj = Projection(num_kv_heads * head_dim, kernel_initializer=init, dtype=policy, name="v_proj")
        self.o_proj = Projection(hidden_size, kernel_initializer=init, dtype=policy, name="o_proj")
        if qk_norm:
            self.q_norm = RMSNorm(rms_norm_eps, dtype=policy, name="q_norm")
            self.k_norm = RMSNorm(rms_norm_eps, dtype=policy, name="k_norm")

    def build(self, input_shape):
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            proj.build(input_shape)
        self.o_proj.build((*input_shape[:-1], self.num_heads * self.head_dim))
        if self.qk_norm:
            self.q_norm.build((None, None, None, self.head_dim))
            self.k_norm.build((None, None, None, self.head_dim))

    def project_qkv(self, x, positions, training=None):
        """Queries [B, T, N, D] and keys/values [B, T, K, D], QK-normed and rotated."""
        length = ops.shape(x)[1]
        q = ops.reshape(self.q_proj(x, training=training), (-1, length, self.num_heads, self.head_dim))
        k = ops.reshape(self.k_proj(x, training=training), (-1, length, self.num_kv_heads, self.head_dim))
        v = ops.reshape(self.v_proj(x, training=training), (-1, length, self.num_kv_heads, self.head_dim))
        if self.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        cos, sin = rope_angles(positions, self.head_dim, self.rope_theta, self.rope_scaling)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def call(self, x, positions, structure, cache=None, cache_index=None, training=None):
        """x [B, T, hidden]; `structure` an `AttentionStructure` of T queries over S keys.

        Without a cache S = T. With `cache` = (keys, values) [B, S, K, D], this step's keys and values are
        written at slots [cache_index, cache_index + T) and attention runs over all S slots; returns
        (output, new_cache) then, else the output alone.
        """
        q, k, v = self.project_qkv(x, positions, training=training)
        if cache is not None:
            k, v = write_slots(cache[0], k, cache_index), write_slots(cache[1], v, cache_index)
        out = attend(q, k, v, structure, scale=self.query_scale, softcap=self.softcap,
                     implementation=self.implementation, training=bool(training))
        length = ops.shape(x)[1]
        out = self.o_proj(ops.reshape(out, (-1, length, self.num_heads * self.head_dim)), training=training)
        return (out, (k, v)) if cache is not None else out

    def get_config(self):
        return {**super().get_config(), "hidden_size": self.hidden_size, "num_heads": self.num_heads,
                "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "query_scale": self.query_scale, "rope_theta": self.rope_theta,
                "rope_scaling": self.rope_scaling, "window": self.window, "softcap": self.softcap,
                "qk_norm": self.qk_norm, "rms_norm_eps": self.rms_norm_eps,
                "implementation": self.implementation}
