"""Images into the decoder: the vision embedder, the merge of its soft tokens into the text, and the
attention blocks that let image (and PaliGemma prefix) tokens see each other.

Soft tokens of N images [B, N, S, S, 3] (SigLIP states v [B·N, P, W], `gemma_tune.models.siglip`):

    PaliGemma:  t = v·W_proj + b                                      [B, N·P, d_model]
    Gemma 3:    t = RMSNorm(avgpool_k×k(v)) · W_proj                   [B, N·256, d_model]  (k = √P / 16)

Merge (`merge_images`): the k-th slot of a row holding `image_token_id` takes the row's k-th soft token
(image ⌊k / tokens_per_image⌋, in order), every other slot its token embedding E[x]·√d_model, as
transformers' `masked_scatter` does. Soft tokens are not scaled by √d_model (transformers scales inside
the text embedding, before the merge).

Attention blocks (`attention_blocks`) [B, T] int32: 0 for a causal token, b ≥ 1 for a token of block b,
whose tokens attend to each other whatever their order (`attention.attention_mask`):
    PaliGemma: one block, the prefix (`prefix_mask` = 1 over image tokens, <bos>, prefix and "\n");
    Gemma 3:   one block per image, each run of consecutive image tokens.
"""

from __future__ import annotations

import keras
from keras import ops

from gemma_tune.models.config import Architecture
from gemma_tune.models.init import glorot_uniform
from gemma_tune.models.layers import RMSNorm
from gemma_tune.models.siglip import SigLIPEncoder


class VisionEmbedder(keras.layers.Layer):
    """Images [B, N, S, S, 3] -> soft tokens [B, N·tokens_per_image, d_model] (module docstring)."""

    def __init__(self, architecture: dict, **kwargs):
        super().__init__(**kwargs)
        arch = Architecture.model_validate(architecture)
        self.architecture = arch.model_dump()
        vision = arch.vision
        policy = self.dtype_policy
        self.pool_size = vision.pool_size
        self.tokens_per_image = vision.tokens_per_image
        self.encoder = SigLIPEncoder(vision.model_dump(), dtype=policy, name="encoder")
        self.soft_embedding_norm = (RMSNorm(vision.layer_norm_eps, dtype=policy, name="soft_embedding_norm")
                                    if arch.family == "gemma3" else None)
        self.projector = keras.layers.Dense(arch.hidden_size, use_bias=arch.family != "gemma3",
                                            kernel_initializer=glorot_uniform(), dtype=policy, name="projector")

    def build(self, input_shape=None):
        self.encoder.build()
        width = self.encoder.vision["hidden_size"]
        if self.soft_embedding_norm is not None:
            self.soft_embedding_norm.build((None, None, width))
        self.projector.build((None, None, width))
        self.built = True

    def _pool(self, states):
        """k×k average pooling of the row-major patch grid [M, P, W] -> [M, P / k², W]."""
        k = self.pool_size
        if k == 1:
            return states
        side = self.encoder.vision["image_size"] // self.encoder.vision["patch_size"]
        width = ops.shape(states)[-1]
        grid = ops.reshape(states, (-1, side // k, k, side // k, k, width))
        pooled = ops.mean(ops.cast(grid, "float32"), axis=(2, 4))
        return ops.cast(ops.reshape(pooled, (-1, (side // k) ** 2, width)), states.dtype)

    def call(self, images):
        shape = ops.shape(images)
        batch, count = shape[0], shape[1]
        flat = ops.reshape(images, (-1, *images.shape[2:]))
        tokens = self._pool(self.encoder(flat))
        if self.soft_embedding_norm is not None:
            tokens = self.soft_embedding_norm(tokens)
        tokens = self.projector(tokens)
        return ops.reshape(tokens, (batch, count * self.tokens_per_image, ops.shape(tokens)[-1]))

    def get_config(self):
        return {**super().get_config(), "architecture": self.architecture}


def image_slots(token_ids, image_token_id: int):
    """Boolean [B, T]: where the text holds an image soft token."""
    return ops.equal(token_ids, image_token_id)


def merge_images(text_embeddings, token_ids, soft_tokens, image_token_id: int):
    """Text embeddings [B, T, d] with the image slots replaced by the soft tokens [B, M, d], in order."""
    slots = image_slots(token_ids, image_token_id)
    order = ops.cumsum(ops.cast(slots, "int32"), axis=1) - 1
    order = ops.clip(order, 0, ops.shape(soft_tokens)[1] - 1)
    picked = ops.take_along_axis(soft_tokens, order[:, :, None], axis=1)
    return ops.where(slots[:, :, None], ops.cast(picked, text_embeddings.dtype), text_embeddings)


def attention_blocks(token_ids, image_token_id: int, prefix_mask=None):
    """[B, T] int32 block ids (module docstring): the prefix when `prefix_mask` is given, else one block per
    run of image tokens."""
    if prefix_mask is not None:
        return ops.cast(ops.greater(ops.cast(prefix_mask, "int32"), 0), "int32")
    slots = ops.cast(image_slots(token_ids, image_token_id), "int32")
    previous = ops.concatenate([ops.zeros_like(slots[:, :1]), slots[:, :-1]], axis=1)  # not ops.pad: methods/padding.py
    starts = ops.cast(ops.logical_and(ops.equal(slots, 1), ops.equal(previous, 0)), "int32")
    return ops.cumsum(starts, axis=1) * slots
