"""The bias-free linear projection every Gemma weight matrix uses, with LoRA computed as a side path.

`Projection` is a `keras.layers.Dense(use_bias=False)`, so Keras' own LoRA variables
(`lora_kernel_a` [in, r], `lora_kernel_b` [r, out]) and quantisation (`quantize("int8"|"int4")`)
apply unchanged. With LoRA enabled the output is

    y = x·W + (α / r) · (dropout(x)·A)·B

computed as a side path rather than through Keras' merged kernel W + (α/r)·A·B: the adapter's
gradient then costs O(tokens · r · (in + out)) instead of a full [in, out] weight gradient, and LoRA
dropout (PEFT's `lora_dropout`) is applied to the adapter's input only. On a quantised base, Keras'
quantised call already adds (α/r)·x·A·B; dropout is added there as (α/r)·((dropout(x) − x)·A)·B.
"""

from __future__ import annotations

import keras
from keras import ops

from gemma_tune.models.init import he_uniform


@keras.saving.register_keras_serializable(package="gemma_tune")
class Projection(keras.layers.Dense):
    """Dense(use_bias=False) with LoRA as a side path and optional LoRA dropout."""

    def __init__(self, units, lora_dropout: float = 0.0, **kwargs):
        kwargs["use_bias"] = False
        super().__init__(units, **kwargs)
        self.lora_dropout = lora_dropout
        self.lora_dropout_seed = None

    def enable_lora(self, rank, lora_alpha=None, a_initializer=None, b_initializer="zeros",
                    dropout: float | None = None):
        """Keras' LoRA variables, plus the seed state of LoRA dropout when `dropout` (or the configured
        `lora_dropout`) is positive. A is He uniform drawn on the host (`gemma_tune.models.init`) unless
        `a_initializer` says otherwise; B is zeros."""
        a_initializer = a_initializer or he_uniform()
        if lora_alpha is None:  # Dense.build re-enables a deserialised LoRA with the rank alone
            lora_alpha = self.lora_alpha
        super().enable_lora(rank, lora_alpha=lora_alpha, a_initializer=a_initializer, b_initializer=b_initializer)
        if dropout is not None:
            self.lora_dropout = dropout
        if self.lora_dropout:
            self._tracker.unlock()
            self.lora_dropout_seed = keras.random.SeedGenerator(name="lora_dropout_seed")
            self._tracker.lock()

    def call(self, inputs, training=None):
        if not self.lora_enabled:
            return super().call(inputs, training=training)
        scaling = self.lora_alpha / self.lora_rank
        dropped = inputs
        if self.lora_dropout and training:
            dropped = keras.random.dropout(inputs, self.lora_dropout, seed=self.lora_dropout_seed)
        if self.quantization_mode is not None:
            outputs = super().call(inputs, training=training)  # includes scaling·x·A·B
            if dropped is inputs:
                return outputs
            correction = ops.matmul(ops.matmul(dropped - inputs, self.lora_kernel_a), self.lora_kernel_b)
            return outputs + ops.cast(scaling, outputs.dtype) * correction
        base = ops.matmul(inputs, ops.cast(self._kernel, self.compute_dtype))
        lora_a = ops.cast(self.lora_kernel_a, self.compute_dtype)
        lora_b = ops.cast(self.lora_kernel_b, self.compute_dtype)
        adapter = ops.matmul(ops.matmul(dropped, lora_a), lora_b)
        return base + ops.cast(scaling, base.dtype) * adapter

    def get_config(self):
        config = super().get_config()
        config.pop("use_bias", None)
        config["lora_dropout"] = self.lora_dropout
        return config
