"""The model that Keras' `fit` trains: a GemmaCausalLM wrapped so that its forward pass yields the
statistics of the SFT loss rather than logits.

`call(batch)` runs the decoder to final hidden states and reduces them with the chunked loss
(`gemma_tune.methods.sft.sft_loss`) to `{"loss", "correct", "targets", "tokens"}` for the batch;
`compute_loss` returns `loss · accum` (Keras averages the gradients of the `accum` micro-steps of an
accumulation step, and each micro-loss is already divided by the whole step's target count, so the
applied gradient is that of Σ nll / N over the whole step); `compute_metrics` hands the statistics to
the callbacks unchanged. The train step itself is Keras' own on every backend.

Batches are the data contract's dicts plus `num_targets` [B] (every entry the global target count N of
the optimisation step the micro-batch belongs to; see `gemma_tune.train.data`).
"""

from __future__ import annotations

import keras
from keras import ops

from gemma_tune.methods.sft import sft_loss

MODEL_INPUTS = ("token_ids", "segment_ids", "positions")


class CausalLMTrainer(keras.Model):
    """Wraps `lm` (a GemmaCausalLM) for `fit`/`evaluate`; see the module docstring."""

    def __init__(self, lm, *, chunk_size: int = 1024, accum: int = 1, name: str = "trainer", **kwargs):
        super().__init__(name=name, **kwargs)
        self.lm = lm
        self.chunk_size = chunk_size
        self.accum = accum
        self.final_logit_softcap = lm.architecture.final_logit_softcap

    def call(self, batch, training=False):
        hidden = self.lm({k: batch[k] for k in MODEL_INPUTS}, training=training, return_hidden_states=True)
        num_targets = batch["num_targets"][0]
        loss, correct = sft_loss(hidden, self.lm.token_embedding.embeddings, batch["target_ids"],
                                 batch["loss_mask"], num_targets, chunk_size=self.chunk_size,
                                 final_logit_softcap=self.final_logit_softcap)
        return {"loss": loss, "correct": correct,
                "targets": ops.sum(ops.cast(batch["loss_mask"], "float32")),
                "tokens": ops.sum(ops.cast(ops.greater(batch["segment_ids"], 0), "float32"))}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return y_pred["loss"] * self.accum if training else y_pred["loss"]

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return dict(y_pred)
