"""Supervised fine-tuning (SFT): next-token cross-entropy, computed in chunks from hidden states.

Text and image-text batches alike: a vision model's batch also carries `images` (and PaliGemma's
`prefix_mask`), passed to the decoder with the tokens; image and prefix tokens have loss_mask 0.

For the trained positions t (loss_mask[t] = 1) with target token y_t and final hidden state h_t,

    z_t    = cap · tanh((h_t · Eᵀ) / cap)        (E the tied embedding [V, H]; no cap when cap is None)
    nll_t  = logsumexp(z_t) − z_t[y_t]            (in float32)
    loss   = Σ_t nll_t / N

where N (`num_targets`) is the number of trained targets in the WHOLE optimisation batch — all
micro-batches of a gradient-accumulation step, all packed segments — so that accumulation and
packing leave the objective unchanged. The logits z are built one chunk of `chunk_size` tokens at a
time and each chunk is rematerialised (`keras.remat`), so only one chunk of [chunk, V] logits is
alive in the forward and in the backward pass: never the [B, T, V] tensor.

`SFT` is the method component (`gemma_tune.methods.base.Method`): a step is normalised by its trained
targets; metrics `loss` (mean nll per trained target), `accuracy` (share of targets whose logit is the
largest) and, on eval rows, `perplexity` = exp(loss).
"""

from __future__ import annotations

import math

import keras
from keras import ops

from gemma_tune.methods.base import Method, model_inputs, ratio
from gemma_tune.methods.logps import target_logits
from gemma_tune.methods.padding import pad_tail


def _chunk_stats(hidden, embedding, targets, mask, softcap):
    """(Σ mask · nll, Σ mask · [z_y = max z]) of one chunk: hidden [C, H], targets/mask [C].

    A hit is a target whose logit is the largest — argmax z = y except on exact ties — because a max
    fuses with the log-sum-exp's own while an argmax is a separate (value, index) pass over the
    logits: 11–17% of a LoRA step on CPU (bench/RESULTS.md).
    """
    logits = ops.cast(ops.matmul(hidden, ops.transpose(embedding)), "float32")
    if softcap is not None:
        logits = softcap * ops.tanh(logits / softcap)
    target_logit = target_logits(logits, targets)
    nll = ops.logsumexp(logits, axis=-1) - target_logit
    hit = ops.cast(ops.greater_equal(target_logit, ops.amax(logits, axis=-1)), "float32")
    return ops.sum(nll * mask), ops.sum(hit * mask)


def sft_loss(hidden, embedding, target_ids, loss_mask, num_targets, *, chunk_size: int = 1024,
             final_logit_softcap: float | None = None, remat: bool = True):
    """Chunked SFT loss (module docstring) -> (loss, correct).

    hidden [B, T, H] (any float dtype; the projection runs in it), embedding [V, H], target_ids [B, T]
    int, loss_mask [B, T] (1 = trained), num_targets a scalar N (the global count; ≥ 1 is enforced).
    `loss` is Σ nll / N (float32); `correct` the number of trained targets whose logit is the largest.
    """
    if any(d is None for d in hidden.shape):
        raise ValueError(f"sft_loss needs static shapes to plan its chunks, got hidden states {hidden.shape}")
    width = hidden.shape[-1]
    hidden = ops.reshape(hidden, (-1, width))
    targets = ops.reshape(ops.cast(target_ids, "int32"), (-1,))
    mask = ops.reshape(ops.cast(loss_mask, "float32"), (-1,))
    embedding = ops.cast(embedding, hidden.dtype)
    tokens = hidden.shape[0]
    chunk = min(chunk_size, tokens)
    chunks = math.ceil(tokens / chunk)
    if chunks * chunk != tokens:  # pad the tail: padded tokens have mask 0 and add nothing
        pad = chunks * chunk - tokens
        hidden = pad_tail(hidden, pad, axis=0)
        targets = pad_tail(targets, pad, axis=0)
        mask = pad_tail(mask, pad, axis=0)

    def stats(h, e, t, m):
        return _chunk_stats(h, e, t, m, final_logit_softcap)

    step = keras.remat(stats) if remat and chunks > 1 else stats
    nll_sum, correct = 0.0, 0.0
    for i in range(chunks):
        part = slice(i * chunk, (i + 1) * chunk)
        nll, hit = step(hidden[part], embedding, targets[part], mask[part])
        nll_sum, correct = nll_sum + nll, correct + hit
    denominator = ops.maximum(ops.cast(num_targets, "float32"), 1.0)
    return nll_sum / denominator, correct


class SFT(Method):
    """Supervised fine-tuning on text, prompt/completion and chat rows (module docstring)."""

    stats = ("correct", "targets", "tokens")
    counts = ("targets",)
    metrics = ("loss", "accuracy")
    eval_metrics = ("perplexity",)
    loss_label = "loss (nats per target token)"

    def count(self, batch):
        return {"targets": float(batch["loss_mask"].sum())}

    def forward(self, trainer, batch, training):
        lm = trainer.lm
        hidden = lm(model_inputs(batch), training=training, return_hidden_states=True)
        loss, correct = sft_loss(hidden, lm.token_embedding.embeddings, batch["target_ids"], batch["loss_mask"],
                                 batch["step_targets"][0], chunk_size=trainer.chunk_size,
                                 final_logit_softcap=lm.architecture.final_logit_softcap)
        return {"loss": loss, "correct": correct,
                "targets": ops.sum(ops.cast(batch["loss_mask"], "float32")),
                "tokens": ops.sum(ops.cast(ops.greater(batch["segment_ids"], 0), "float32"))}

    def metric_values(self, sums, split):
        loss = ratio(sums["loss"], sums["targets"])
        values = {"loss": loss, "accuracy": ratio(sums["correct"], sums["targets"])}
        if split != "train":
            values["perplexity"] = math.exp(min(loss, 700.0)) if loss is not None else None
        return values
