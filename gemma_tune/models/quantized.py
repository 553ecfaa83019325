"""The frozen base of a quantised projection (QLoRA): y = x·K̂ with K̂ = K / s, and a gradient for x alone.

K is Keras' int8 kernel [in, out], or its per-channel int4 kernel packed two values to a byte
[in, ⌈out/2⌉] (`unpacked_width` = out); s [out] holds one scale per output channel. With an activation
quantiser (Keras' `AbsMaxQuantizer`, int8's default) every row of x is quantised too:

    q(x) = clip(round(x · s_x), lo, hi),    s_x = hi / (max_j |x_j| + ε)      (lo, hi = ∓127)
    y    = (q(x) · K) / (s · s_x)

the product q(x)·K being Keras' integer matmul (int32; float on a torch GPU). Without a quantiser,
y = (x · K) / s. This is what Keras' `Dense._int8_call` and per-channel `Dense._int4_call` compute. The
gradient is the same straight-through one Keras defines: ∂L/∂x = (∂L/∂y) · K̂ᵀ. K and s are frozen and
get none. The backward keeps K and s, never a float copy of the kernel.

Why not Keras' own call: Keras builds that gradient with `ops.custom_gradient`, whose torch form stores the
backward as a Python closure on the autograd context. torch.compile cannot trace that, nor the torch result check
inside `ops.max` that Keras' activation quantiser calls. So a compiled QLoRA step broke its graph at every
projection. Here the torch form is a `torch.autograd.Function` that saves tensors only; JAX and TensorFlow use
`ops.custom_gradient`. The forward and the backward are the same keras.ops functions on all three backends.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import ops
from keras.quantizers import unpack_int4


@dataclass(frozen=True)
class RowQuantizer:
    """Keras' `AbsMaxQuantizer` as constants: the integer range [low, high], ε and the integer dtype."""

    low: float
    high: float
    epsilon: float
    dtype: str

    @classmethod
    def of(cls, quantizer) -> "RowQuantizer":
        low, high = quantizer.value_range
        return cls(low, high, quantizer.epsilon, quantizer.output_dtype)

    def __call__(self, x):
        """(q(x), s_x): `keras.quantizers.abs_max_quantize(x, axis=-1)`, with the maximum taken by `ops.amax`."""
        scale = ops.divide(self.high, ops.add(ops.amax(ops.abs(x), axis=-1, keepdims=True), self.epsilon))
        scale = ops.cast(scale, x.dtype)
        quantized = ops.clip(ops.round(ops.multiply(x, scale)), self.low, self.high)
        return ops.cast(quantized, self.dtype), scale


def _kernel_values(kernel, unpacked_width: int | None):
    """The kernel one integer per element: int4 unpacked to `unpacked_width` columns, int8 as it is."""
    if unpacked_width is None:
        return kernel
    return unpack_int4(kernel, unpacked_width, axis=-1)


def base_forward(inputs, kernel, kernel_scale, rows: RowQuantizer | None, unpacked_width: int | None,
                 compute_dtype: str):
    """y of the module docstring."""
    output_scale = kernel_scale
    if rows is not None:
        inputs, inputs_scale = rows(inputs)
        output_scale = ops.multiply(output_scale, inputs_scale)
    outputs = ops.cast(ops.matmul(inputs, _kernel_values(kernel, unpacked_width)), compute_dtype)
    return ops.divide(outputs, output_scale)


def base_input_gradient(upstream, kernel, kernel_scale, unpacked_width: int | None, compute_dtype: str):
    """∂L/∂x = upstream · K̂ᵀ, K̂ = K / s."""
    float_kernel = ops.divide(ops.cast(_kernel_values(kernel, unpacked_width), compute_dtype), kernel_scale)
    return ops.matmul(upstream, ops.transpose(float_kernel))


def quantized_matmul(inputs, kernel, kernel_scale, *, rows: RowQuantizer | None, unpacked_width: int | None,
                     compute_dtype: str):
    """y = x·K̂ of the module docstring, differentiable in `inputs` only."""
    if keras.backend.backend() == "torch":
        return _TorchQuantizedMatmul.apply(inputs, kernel, kernel_scale, rows, unpacked_width, compute_dtype)

    @ops.custom_gradient
    def matmul(inputs, kernel, kernel_scale):
        def gradient(*args, upstream=None):
            if upstream is None:  # Keras' custom_gradient passes it positionally or by keyword, by backend
                (upstream,) = args
            return base_input_gradient(upstream, kernel, kernel_scale, unpacked_width, compute_dtype), None, None

        return base_forward(inputs, kernel, kernel_scale, rows, unpacked_width, compute_dtype), gradient

    return matmul(inputs, kernel, kernel_scale)


if keras.backend.backend() == "torch":  # defined at import: torch.compile cannot trace a class definition
    import torch

    class _TorchQuantizedMatmul(torch.autograd.Function):
        """The torch autograd function of `quantized_matmul`: it saves the kernel and its scale, both tensors."""

        @staticmethod
        def forward(ctx, inputs, kernel, kernel_scale, rows, unpacked_width, compute_dtype):
            ctx.save_for_backward(kernel, kernel_scale)
            ctx.unpacked_width = unpacked_width
            ctx.compute_dtype = compute_dtype
            return base_forward(inputs, kernel, kernel_scale, rows, unpacked_width, compute_dtype)

        @staticmethod
        def backward(ctx, upstream):
            kernel, kernel_scale = ctx.saved_tensors
            inputs_gradient = base_input_gradient(upstream, kernel, kernel_scale, ctx.unpacked_width,
                                                  ctx.compute_dtype)
            return inputs_gradient, None, None, None, None, None
