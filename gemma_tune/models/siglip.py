"""The SigLIP vision encoder of PaliGemma 1/2 and Gemma 3 (So400m/14: 27 layers, width 1152, 16 heads,
MLP 4304), as transformers' `SiglipVisionModel` without its pooling head.

For images x [B, S, S, 3] in [−1, 1] (channels last), patch size p, P = (S/p)² patches:

    h_0 = Conv_p×p,stride p(x) reshaped to [B, P, W] + E_pos          (row-major patch order)
    for each layer ℓ (pre-norm):
        h = h + Attn(LN₁(h))        full (unmasked) multi-head attention, scale 1/√(W/heads), biases
        h = h + FC₂(gelu_tanh(FC₁(LN₂(h))))
    out = LN_post(h)                                                   [B, P, W]

LayerNorms have learned scale and bias (ε = `layer_norm_eps`).
"""

from __future__ import annotations

import keras
from keras import ops

from gemma_tune.models.config import VisionArchitecture
from gemma_tune.models.init import HostUniform, glorot_uniform


class SigLIPAttention(keras.layers.Layer):
    """Multi-head self-attention over all patches, with biased q/k/v/out projections."""

    def __init__(self, hidden_size: int, num_heads: int, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = hidden_size // num_heads
        policy = self.dtype_policy
        self.q_proj = keras.layers.Dense(hidden_size, kernel_initializer=glorot_uniform(), dtype=policy,
                                          name="q_proj")
        self.k_proj = keras.layers.Dense(hidden_size, kernel_initializer=glorot_uniform(), dtype=policy,
                                          name="k_proj")
        self.v_proj = keras.layers.Dense(hidden_size, kernel_initializer=glorot_uniform(), dtype=policy,
                                          name="v_proj")
        self.o_proj = keras.layers.Dense(hidden_size, kernel_initializer=glorot_uniform(), dtype=policy,
                                          name="o_proj")

    def build(self, input_shape):
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            proj.build(input_shape)

    def call(self, x):
        length = ops.shape(x)[1]
        heads = [ops.reshape(proj(x), (-1, length, self.num_heads, self.head_dim))
                 for proj in (self.q_proj, self.k_proj, self.v_proj)]
        out = ops.dot_product_attention(*heads, scale=self.head_dim ** -0.5)
        return self.o_proj(ops.reshape(out, (-1, length, self.hidden_size)))

    def get_config(self):
        return {**super().get_config(), "hidden_size": self.hidden_size, "num_heads": self.num_heads}


class SigLIPLayer(keras.layers.Layer):
    """One pre-norm encoder layer: attention, then the gelu-tanh MLP, each residual."""

    def __init__(self, vision: dict, **kwargs):
        super().__init__(**kwargs)
        arch = VisionArchitecture.model_validate(vision)
        self.vision = arch.model_dump()
        policy = self.dtype_policy
        eps = arch.layer_norm_eps
        self.layer_norm1 = keras.layers.LayerNormalization(epsilon=eps, dtype=policy, name="layer_norm1")
        self.attention = SigLIPAttention(arch.hidden_size, arch.num_heads, dtype=policy, name="attention")
        self.layer_norm2 = keras.layers.LayerNormalization(epsilon=eps, dtype=policy, name="layer_norm2")
        self.fc1 = keras.layers.Dense(arch.intermediate_size, kernel_initializer=glorot_uniform(), dtype=policy,
                                      name="fc1")
        self.fc2 = keras.layers.Dense(arch.hidden_size, kernel_initializer=glorot_uniform(), dtype=policy,
                                      name="fc2")

    def build(self, input_shape):
        for layer in (self.layer_norm1, self.attention, self.layer_norm2, self.fc1):
            layer.build(input_shape)
        self.fc2.build((*input_shape[:-1], self.fc1.units))

    def call(self, x):
        x = x + self.attention(self.layer_norm1(x))
        return x + self.fc2(keras.activations.gelu(self.fc1(self.layer_norm2(x)), approximate=True))

    def get_config(self):
        return {**super().get_config(), "vision": self.vision}


class SigLIPEncoder(keras.layers.Layer):
    """Images [B, S, S, 3] -> patch states [B, P, W] (module docstring)."""

    def __init__(self, vision: dict, **kwargs):
        super().__init__(**kwargs)
        arch = VisionArchitecture.model_validate(vision)
        self.vision = arch.model_dump()
        policy = self.dtype_policy
        self.num_patches = arch.patches_per_side ** 2
        self.patch_embedding = keras.layers.Conv2D(
            arch.hidden_size, arch.patch_size, strides=arch.patch_size, padding="valid",
            data_format="channels_last", kernel_initializer=glorot_uniform(), dtype=policy, name="patch_embedding")
        self.position_embedding = keras.layers.Embedding(self.num_patches, arch.hidden_size,
                                                         embeddings_initializer=HostUniform(limit=0.05),
                                                         dtype=policy, name="position_embedding")
        self.layers = [SigLIPLayer(self.vision, dtype=policy, name=f"layer_{i}") for i in range(arch.num_layers)]
        self.post_layernorm = keras.layers.LayerNormalization(epsilon=arch.layer_norm_eps, dtype=policy,
                                                              name="post_layernorm")

    def build(self, input_shape=None):
        arch = VisionArchitecture.model_validate(self.vision)
        self.patch_embedding.build((None, arch.image_size, arch.image_size, 3))
        self.position_embedding.build((None, self.num_patches))
        states = (None, self.num_patches, arch.hidden_size)
        for layer in self.layers:
            layer.build(states)
        self.post_layernorm.build(states)
        self.built = True

    def call(self, images):
        patches = self.patch_embedding(ops.cast(images, self.compute_dtype))
        x = ops.reshape(patches, (-1, self.num_patches, ops.shape(patches)[-1]))
        x = x + self.position_embedding(ops.arange(self.num_patches, dtype="int32"))[None]
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)

    def get_config(self):
        return {**super().get_config(), "vision": self.vision}
