"""Per-sequence log-probabilities of target tokens, computed in chunks from hidden states.

For each row b, over the positions t with loss_mask[b, t] = 1, target token y_bt and final hidden
state h_bt,

    z_bt       = cap · tanh((h_bt · Eᵀ) / cap)          (E the tied embedding [V, H]; no cap when None)
    log p_bt   = z_bt[y_bt] − logsumexp(z_bt)            (in float32)
    logp_sum_b = Σ_t loss_mask[b, t] · log p_bt,   count_b = Σ_t loss_mask[b, t]

the sequence log-likelihood log π(y | x) that preference objectives (DPO, IPO, SimPO, ORPO) compare;
logp_sum / count is the length-averaged log-probability. As in `gemma_tune.methods.sft`, the logits
are built one chunk of the sequence axis at a time — [B, c, V] with c = max(1, chunk_size // B) —
and each chunk is rematerialised (`keras.remat`), so only one chunk's logits are alive in the forward
and in the backward pass: never the [B, T, V] tensor.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from gemma_tune.methods.padding import pad_tail


def target_logits(logits, targets):
    """z[..., y]: each target's entry of `logits` [..., V], for int `targets` [...] -> [...], exactly.

    On TensorFlow a select against the vocabulary's ids, summed over V: its one non-zero term is z_y, so the
    value is bit-equal to a gather's and so is the gradient (the one-hot mask), and it spares TensorFlow's graph
    executor the gather's gradient, a dense [..., V] UnsortedSegmentSum (a fifth of a LoRA step's time on the
    CPU: bench/RESULTS.md, "TensorFlow: where the step's time goes"). Elsewhere a gather (`take_along_axis`):
    on JAX the select gained nothing (XLA fuses either) and moved the compiled step's rounding elsewhere; eager
    torch would build the [..., V] mask and selection in memory.
    """
    if keras.backend.backend() != "tensorflow":
        return ops.squeeze(ops.take_along_axis(logits, ops.expand_dims(targets, -1), axis=-1), -1)
    vocab = ops.arange(logits.shape[-1], dtype=targets.dtype)
    return ops.sum(ops.where(ops.equal(ops.expand_dims(targets, -1), vocab), logits, 0.0), axis=-1)


def _chunk_logps(hidden, embedding, targets, mask, softcap):
    """Σ_t mask · log p(target) per row of one chunk: hidden [B, c, H], targets/mask [B, c] -> [B]."""
    logits = ops.cast(ops.matmul(hidden, ops.transpose(embedding)), "float32")
    if softcap is not None:
        logits = softcap * ops.tanh(logits / softcap)
    logp = target_logits(logits, targets) - ops.logsumexp(logits, axis=-1)
    return ops.sum(logp * mask, axis=-1)


def _chunked(caller: str, hidden, per_token: list, chunk_size: int):
    """(chunk, chunks, hidden, per_token) for cutting the sequence axis into `chunks` of `chunk` positions, about
    `chunk_size` tokens of all rows together each: hidden [B, T, H] and the [B, T] arrays `per_token` padded at
    the tail to chunks · chunk (padded positions are zeros: masked out, or cut off by the caller)."""
    if any(d is None for d in hidden.shape):
        raise ValueError(f"{caller} needs static shapes to plan its chunks, got hidden states {hidden.shape}")
    batch, length, _ = hidden.shape
    chunk = min(max(1, chunk_size // batch), length)
    chunks = math.ceil(length / chunk)
    pad = chunks * chunk - length
    if pad:
        hidden = pad_tail(hidden, pad, axis=1)
        per_token = [pad_tail(a, pad, axis=1) for a in per_token]
    return chunk, chunks, hidden, per_token


def sequence_logps(hidden, embedding, target_ids, loss_mask, *, chunk_size: int = 1024,
                   final_logit_softcap: float | None = None, remat: bool = True):
    """Chunked per-sequence log-probabilities (module docstring) -> (logp_sum [B], count [B]), float32.

    hidden [B, T, H] (any float dtype; the projection h·Eᵀ runs in it, the soft-cap and log-softmax in
    float32 — pass float32 hidden states for a float32 projection), embedding [V, H], target_ids [B, T]
    int, loss_mask [B, T] (1 = counted). `chunk_size` is the number of tokens (all rows together) whose
    logits one chunk holds. Shapes must be static.
    """
    embedding = ops.cast(embedding, hidden.dtype)
    chunk, chunks, hidden, (targets, mask) = _chunked(  # padded positions have mask 0 and add nothing
        "sequence_logps", hidden, [ops.cast(target_ids, "int32"), ops.cast(loss_mask, "float32")], chunk_size)
    batch = hidden.shape[0]

    def logps(h, e, t, m):
        return _chunk_logps(h, e, t, m, final_logit_softcap)

    step = keras.remat(logps) if remat and chunks > 1 else logps
    logp_sum = ops.zeros((batch,), "float32")
    for i in range(chunks):
        part = slice(i * chunk, (i + 1) * chunk)
        logp_sum = logp_sum + step(hidden[:, part], embedding, targets[:, part], mask[:, part])
    return logp_sum, ops.sum(mask, axis=-1)


def _chunk_token_logps(hidden, embedding, targets, softcap, temperature):
    """(log p(target) [B, c], entropy [B, c]) of one chunk at temperature τ: softmax((z) / τ)."""
    logits = ops.cast(ops.matmul(hidden, ops.transpose(embedding)), "float32")
    if softcap is not None:
        logits = softcap * ops.tanh(logits / softcap)
    logits = logits / temperature
    log_norm = ops.logsumexp(logits, axis=-1, keepdims=True)
    log_probs = logits - log_norm
    target_logp = target_logits(log_probs, targets)
    entropy = -ops.sum(ops.exp(log_probs) * log_probs, axis=-1)
    return target_logp, entropy


def token_logps(hidden, embedding, target_ids, *, chunk_size: int = 1024, final_logit_softcap: float | None = None,
                temperature: float = 1.0, remat: bool = True):
    """Per-token log-probabilities of the targets and the entropy of the policy at temperature τ, in chunks
    -> (logp [B, T], entropy [B, T]) float32:

        log p_bt = log softmax(z_bt / τ)[y_bt],   H_bt = −Σ_v p_btv log p_btv     (z soft-capped as above)

    what online RL's ratio, KL and `entropy` metric are made of (TRL divides the logits by the sampling
    temperature). Chunking and rematerialisation as `sequence_logps`: never [B, T, V] logits at once.
    """
    length = hidden.shape[1]
    embedding = ops.cast(embedding, hidden.dtype)
    chunk, chunks, hidden, (targets,) = _chunked("token_logps", hidden, [ops.cast(target_ids, "int32")], chunk_size)

    def logps(h, e, t):
        return _chunk_token_logps(h, e, t, final_logit_softcap, temperature)

    step = keras.remat(logps) if remat and chunks > 1 else logps
    parts = [step(hidden[:, i * chunk:(i + 1) * chunk], embedding, targets[:, i * chunk:(i + 1) * chunk])
             for i in range(chunks)]
    logp = ops.concatenate([p[0] for p in parts], axis=1)[:, :length]
    entropy = ops.concatenate([p[1] for p in parts], axis=1)[:, :length]
    return logp, entropy
