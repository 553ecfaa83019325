"""Building blocks of the Gemma decoders: RMSNorm, rotary position embeddings, the gated MLP.

RMSNorm (all Gemma generations):  y = x · rsqrt(mean(x²) + ε) · (1 + w), computed in float32 and cast
back, with w initialised to zero (so a fresh norm is the identity scale).

RoPE ("rotate half" layout, as in transformers and keras-hub): for head dimension D and position p,
    inv_freq_i = 1 / (θ^(2i/D) · s)     i = 0 … D/2 − 1, s = linear scaling factor
    rope(x)    = x · cos(p · inv_freq) + rotate_half(x) · sin(p · inv_freq)
with cos/sin repeated over both halves and rotate_half([x1, x2]) = [−x2, x1].

GeGLU MLP:  down( gelu_tanh(gate(x)) ⊙ up(x) ).
"""

from __future__ import annotations

import keras
from keras import ops

from gemma_tune.models.init import HostNormal
from gemma_tune.models.projection import Projection


class RMSNorm(keras.layers.Layer):
    """Gemma's RMSNorm over the last axis; `scale` holds w of x̂·(1 + w)."""

    def __init__(self, epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(input_shape[-1],), initializer="zeros")

    def call(self, x):
        x32 = ops.cast(x, "float32")
        variance = ops.mean(ops.square(x32), axis=-1, keepdims=True)
        normed = x32 * ops.rsqrt(variance + self.epsilon)
        normed = normed * (1.0 + ops.cast(self.scale, "float32"))
        return ops.cast(normed, x.dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def rope_angles(positions, head_dim: int, theta: float, scaling_factor: float = 1.0):
    """cos and sin of the rotary angles, float32 [B, T, 1, head_dim] for integer `positions` [B, T]."""
    exponents = ops.arange(0, head_dim, 2, dtype="float32") / head_dim
    inv_freq = 1.0 / (ops.power(ops.cast(theta, "float32"), exponents) * scaling_factor)
    angles = ops.cast(positions, "float32")[..., None] * inv_freq  # [B, T, D/2]
    angles = ops.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return ops.cos(angles), ops.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate `x` [B, T, heads, head_dim] by the angles from `rope_angles` (in x's dtype)."""
    half = x.shape[-1] // 2
    rotated = ops.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * ops.cast(cos, x.dtype) + rotated * ops.cast(sin, x.dtype)


class GatedMLP(keras.layers.Layer):
    """GeGLU feed-forward: down(gelu_tanh(gate(x)) ⊙ up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        init = HostNormal(stddev=0.02)
        self.gate_proj = Projection(intermediate_size, kernel_initializer=init, dtype=self.dtype_policy,
                                    name="gate_proj")
        self.up_proj = Projection(intermediate_size, kernel_initializer=init, dtype=self.dtype_policy,
                                  name="up_proj")
        self.down_proj = Projection(hidden_size, kernel_initializer=init, dtype=self.dtype_policy,
                                    name="down_proj")

    def build(self, input_shape):
        self.gate_proj.build(input_shape)
        self.up_proj.build(input_shape)
        self.down_proj.build((*input_shape[:-1], self.intermediate_size))

    def call(self, x, training=None):
        gate = keras.activations.gelu(self.gate_proj(x, training=training), approximate=True)
        return self.down_proj(gate * self.up_proj(x, training=training), training=training)

    def get_config(self):
        return {**super().get_config(), "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size}
