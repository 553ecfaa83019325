"""The reward model: a Gemma decoder and a scalar head on the final hidden state of each sequence's last
real token, as transformers' `*ForSequenceClassification` with `num_labels: 1` computes it.

For a sequence x with final-normed hidden states h_t (`GemmaCausalLM(..., return_hidden_states=True)`)
and real tokens t (padding_mask 1, or segment_ids > 0),

    last = max { t : x_t is a real token }        (0 for a row without one)
    r(x) = h_last · w                              (w: the head's kernel [hidden, 1], no bias, float32)

transformers finds `last` the same way, as the rightmost token that is not `pad_token_id`
(`(arange(T) * non_pad).argmax(-1)`), so right- or left-padded batches give the same scores. The head
is `keras.layers.Dense(1, use_bias=False, name="score")` (`score_head`), built on its own so that its
one variable's path is `score/kernel`: the key a reward run's checkpoint holds it under, beside the
decoder's. Exported, it is transformers' `score.weight` [1, hidden] (its transpose).
"""

from __future__ import annotations

import keras
from keras import ops

from gemma_tune.models.init import glorot_uniform

SCORE = "score"  # the head's name: the method's layer, the RewardModel attribute, the HF module


def score_head(hidden_size: int) -> keras.layers.Dense:
    """A built, float32 scalar head for hidden states of width `hidden_size` (kernel path `score/kernel`)."""
    head = keras.layers.Dense(1, use_bias=False, kernel_initializer=glorot_uniform(), name=SCORE,
                              dtype="float32")
    head.build((None, hidden_size))
    return head


def real_tokens(inputs):
    """[B, T] 1 where `inputs` (the decoder's input dict) holds a real token, else 0."""
    if "segment_ids" in inputs:
        return ops.cast(ops.greater(inputs["segment_ids"], 0), "int32")
    if inputs.get("padding_mask") is not None:
        return ops.cast(inputs["padding_mask"], "int32")
    return ops.ones_like(ops.convert_to_tensor(inputs["token_ids"], "int32"))


def sequence_scores(lm, head, inputs, training=False):
    """r(x) of every row of `inputs` (module docstring) -> float32 [B]."""
    hidden = lm(inputs, training=training, return_hidden_states=True)  # [B, T, H]
    real = real_tokens(inputs)
    last = ops.cast(ops.argmax(ops.arange(ops.shape(real)[1], dtype="int32")[None, :] * real, axis=1), "int32")
    batch, _, width = ops.shape(hidden)
    index = ops.broadcast_to(ops.reshape(last, (-1, 1, 1)), (batch, 1, width))
    states = ops.squeeze(ops.take_along_axis(hidden, index, axis=1), 1)  # [B, H]: each row's last real token
    return ops.squeeze(head(ops.cast(states, "float32")), -1)


class RewardModel(keras.Model):
    """A GemmaCausalLM `lm` and its scalar head `score`: `model(inputs) -> scores` float32 [B], with the
    decoder's inputs (`token_ids` and `padding_mask`, or `segment_ids` and `positions`). `architecture`
    and `checkpoint_source` are the decoder's."""

    def __init__(self, lm, score=None, name: str = "reward_model", **kwargs):
        super().__init__(name=name, **kwargs)
        self.lm = lm
        self.score = score if score is not None else score_head(lm.architecture.hidden_size)
        if hasattr(lm, "checkpoint_source"):  # the base weights a PEFT export applies to (gemma_tune.loading)
            self.checkpoint_source = lm.checkpoint_source
        self.built = True

    @property
    def architecture(self):
        return self.lm.architecture

    def call(self, inputs, training=None):
        return sequence_scores(self.lm, self.score, inputs, training=training)


def trained_model(lm, heads: dict):
    """The model a run trained, from its decoder and its method's layers (`Method.layers`): a `RewardModel`
    when they hold a score head, else the decoder itself."""
    return RewardModel(lm, heads[SCORE]) if SCORE in heads else lm


def reward_parts(model):
    """(decoder, score head) of a `RewardModel`; (model, None) of a `GemmaCausalLM`."""
    return (model.lm, model.score) if isinstance(model, RewardModel) else (model, None)
