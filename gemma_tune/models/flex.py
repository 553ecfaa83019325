"""torch's FlexAttention for Gemma: the reference attention of `attention.attention_mask`'s rule, never the mask.

The torch-specific fast path of `attention.attend` ("flex"). FlexAttention computes, per query i and key j,

    s_ij = scale · q_i·k_j;   s_ij = c · tanh(s_ij / c) (Gemma 2's soft-cap, a `score_mod`);
    out_i = Σ_j softmax_j(s_ij where allowed(i, j), else −∞) v_j

with `allowed(i, j)` evaluated per element by a `mask_mod` over the `AttentionStructure`'s index, segment and
block arrays — the elementwise form of `attention.attention_mask` (same segment, a real key, causal or the same
block, within the window; a padding query sees its own slot). From it `create_block_mask` builds a `BlockMask`:
per 128 × 128 tile, whether it is empty, full or partial, [B, 1, ⌈T/128⌉, ⌈S/128⌉] integers instead of [B, T, S].
The compiled kernel skips the empty tiles (a causal sliding-window layer computes O(T · window), not O(T²)) and
evaluates `mask_mod` inside the partial ones, so neither the mask nor the scores are ever in memory.

Compiled by torch.compile, FlexAttention is one fused Triton kernel on a GPU. Run eagerly it is a reference that
materialises the scores, and on a CPU torch 2.13 has no backward for it. So "auto" takes it only where it pays
and trains (`flex_attention_applies`); "flex" asked for by name runs anywhere without gradients.
"""

from __future__ import annotations

import keras
from keras import ops

# The CUDA compute capabilities (major) where "auto" takes FlexAttention: torch's inductor has kernel
# configurations for head sizes up to 256 (Gemma's) on Hopper (9.x) and datacenter Blackwell (10.x); elsewhere
# its default backward at head_dim 256 can need more shared memory than a block has (pytorch/pytorch#198224).
FLEX_CAPABILITY_MAJORS = (9, 10)


def flex_attention_applies(tensor) -> bool:
    """Whether attention "auto" takes FlexAttention: the torch backend, `tensor` (the queries or their segment
    ids) on a CUDA device of `FLEX_CAPABILITY_MAJORS`, inside a graph torch.compile is tracing (eager FlexAttention
    materialises the scores), and deterministic algorithms off (`train.deterministic` keeps to the paths whose
    determinism was checked here)."""
    if keras.backend.backend() != "torch":
        return False
    import torch

    if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cuda" or not torch.compiler.is_compiling():
        return False
    if torch.are_deterministic_algorithms_enabled():
        return False
    return torch.cuda.get_device_capability(tensor.device)[0] in FLEX_CAPABILITY_MAJORS


def mask_mod(structure):
    """The `mask_mod(b, h, q, k) -> bool` of `structure` (an `attention.AttentionStructure`): `attention_mask`'s
    rule for query q and key k of row b, read from the structure's arrays. In self-attention the token indices
    are q and k themselves (the structure's indices are the token axis), so none is gathered: a gather from an
    index array computed inside the compiled graph is what inductor's CPU kernel cannot take. The rule is
    restated in tensor operators rather than by calling `attention_mask` on the pair: keras.ops read Keras' global
    state, which dynamo then guards on inside FlexAttention's subgraph, and the compiled step recompiles."""

    def tensor(array):
        return None if array is None else ops.convert_to_tensor(array, "int32")

    query_index, key_index = tensor(structure.query_index), tensor(structure.key_index)
    self_attention = structure.self_attention
    query_segment, key_segment = tensor(structure.query_segment), tensor(structure.key_segment)
    query_block, key_block = tensor(structure.query_block), tensor(structure.key_block)
    window, window_bounds_blocks = structure.window, structure.window_bounds_blocks

    def allowed(b, h, q, k):
        qi, ki = (q, k) if self_attention else (query_index[q], key_index[k])
        order = ki <= qi
        in_window = (qi - ki) < window if window is not None else None
        if in_window is not None and not window_bounds_blocks:
            order = order & in_window
        if query_block is not None:
            qb = query_block[b, q]
            order = order | ((qb == key_block[b, k]) & (qb != 0))
        if in_window is not None and window_bounds_blocks:
            order = order & in_window
        qs, ks = query_segment[b, q], key_segment[b, k]
        return ((qs == ks) & (ks != 0) & order) | ((qs == 0) & (qi == ki))

    return allowed


def block_mask(structure):
    """The `BlockMask` of `structure`: its rule per 128 × 128 tile of [queries, keys] (module docstring)."""
    from torch.nn.attention.flex_attention import create_block_mask

    query_segment = ops.convert_to_tensor(structure.query_segment)
    batch, queries = query_segment.shape
    keys = structure.key_segment.shape[1]
    return create_block_mask(mask_mod(structure), batch, None, queries, keys, device=query_segment.device)


def flex_attention(query, key, value, structure, *, scale: float, softcap: float | None):
    """Attention by FlexAttention. query [B, T, N, D], key/value [B, S, K, D] (K divides N: grouped heads share a
    key/value head), `structure` an `AttentionStructure` (its `block_mask` when built, else one is built here);
    returns [B, T, N, D] in the query's dtype. Another backend, or gradients on a CPU, is a ValueError."""
    if keras.backend.backend() != "torch":
        raise ValueError(f"the flex attention path is torch's FlexAttention; on {keras.backend.backend()} "
                         "use attention implementation auto, fused, chunked or plain")
    from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

    query, key, value = (ops.convert_to_tensor(x) for x in (query, key, value))
    if query.device.type == "cpu" and any(x.requires_grad for x in (query, key, value)):
        raise ValueError("torch has no FlexAttention backward on a CPU: take gradients there (or run outside "
                         "torch.no_grad) with attention implementation auto, fused, chunked or plain")
    mask = structure.block_mask if structure.block_mask is not None else block_mask(structure)
    out = torch_flex_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                               score_mod=None if softcap is None else soft_cap(softcap), block_mask=mask,
                               scale=scale, enable_gqa=query.shape[2] != key.shape[2])
    return out.transpose(1, 2)


def soft_cap(cap: float):
    """The `score_mod` of Gemma 2's attention soft-cap: s ↦ c · tanh(s / c)."""
    import torch

    def capped(score, b, h, q, k):
        return cap * torch.tanh(score / cap)

    return capped
