"""The bias-free linear projection every Gemma weight matrix uses, with LoRA computed as a side path.

`Projection` is a `keras.layers.Dense(use_bias=False)`, so Keras' own LoRA variables
(`lora_kernel_a` [in, r], `lora_kernel_b` [r, out]) and quantisation (`quantize("int8"|"int4")`)
apply unchanged. With LoRA enabled the output is

    y = x·W + (α / r) · (dropout(x)·A)·B

computed as a side path rather than through Keras' merged kernel W + (α/r)·A·B: the adapter's
gradient then costs O(tokens · r · (in + out)) instead of a full [in, out] weight gradient, and LoRA
dropout (PEFT's `lora_dropout`) is applied to the adapter's input only.

A quantised layer is called through `quantized_call` (Keras' `Layer.__call__` picks it), not `call`. Its
base x·W is `gemma_tune.models.quantized.quantized_matmul` for the quantisations QLoRA trains (Keras' int8,
and per-channel int4): Keras' numbers, traceable by torch.compile. The same side path is then added. Any
other quantisation (sub-channel int4, float8, GPTQ, AWQ: exports, never trained here) is Keras' own call,
and LoRA on it is an error.
"""

from __future__ import annotations

import keras
from keras import ops
from keras.quantizers import AbsMaxQuantizer

from gemma_tune.models.init import he_uniform
from gemma_tune.models.quantized import RowQuantizer, quantized_matmul


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
        base = ops.matmul(inputs, ops.cast(self._kernel, self.compute_dtype))
        return base + self._adapter(inputs, training, base.dtype)

    def quantized_call(self, inputs, training=None):
        """The quantised base (module docstring) plus the LoRA side path."""
        base = self._quantized_base(inputs)
        if base is None:
            if self.lora_enabled:
                raise ValueError(f"{self.path}: LoRA trains on an int8 or per-channel int4 base (quantize_base), "
                                 f"not on this {self.dtype_policy.name} one")
            return super().quantized_call(inputs, training=training)
        return base + self._adapter(inputs, training, base.dtype) if self.lora_enabled else base

    def _quantized_base(self, inputs):
        """x·W through `quantized_matmul` for int8 and per-channel int4 with no or Keras' abs-max activation
        quantiser; None for any other quantisation."""
        mode = self.quantization_mode
        if mode == "int4" and getattr(self, "_int4_block_size", None) not in (None, -1):
            return None
        quantizer = getattr(self, "inputs_quantizer", None)
        if mode not in ("int8", "int4") or (quantizer is not None and type(quantizer) is not AbsMaxQuantizer):
            return None
        return quantized_matmul(inputs, ops.convert_to_tensor(self._kernel), ops.convert_to_tensor(self.kernel_scale),
                                rows=None if quantizer is None else RowQuantizer.of(quantizer),
                                unpacked_width=self._orig_output_dim if mode == "int4" else None,
                                compute_dtype=self.compute_dtype)

    def _adapter_inputs(self, inputs, training):
        """dropout(x) while training with `lora_dropout`, else x itself."""
        if self.lora_dropout and training:
            return keras.random.dropout(inputs, self.lora_dropout, seed=self.lora_dropout_seed)
        return inputs

    def _adapter(self, inputs, training, dtype):
        """(α / r) · (dropout(x)·A)·B in `dtype`."""
        lora_a = ops.cast(self.lora_kernel_a, self.compute_dtype)
        lora_b = ops.cast(self.lora_kernel_b, self.compute_dtype)
        adapter = ops.matmul(ops.matmul(self._adapter_inputs(inputs, training), lora_a), lora_b)
        return ops.cast(self.lora_alpha / self.lora_rank, dtype) * ops.cast(adapter, dtype)

    def get_config(self):
        config = super().get_config()
        config.pop("use_bias", None)
        config["lora_dropout"] = self.lora_dropout
        return config
