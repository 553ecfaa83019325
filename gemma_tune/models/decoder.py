"""The Gemma decoder (Gemma 1, 2 and 3 text; CodeGemma, ShieldGemma and DataGemma share it).

    h_0 = E[token] · √d_model                                  (tied embedding E [vocab, d_model])
    for each layer ℓ:                                           (pre-norm residual blocks)
        a   = Attention_ℓ(RMSNorm(h))                          GQA, RoPE (θ, scaling per layer),
                                                                QK-norm (Gemma 3), sliding window on
                                                                local layers, soft-cap (Gemma 2)
        h   = h + PostAttnNorm(a)                               (Gemma 2/3; Gemma 1: h + a)
        f   = GeGLU(PreFFWNorm(h))
        h   = h + PostFFWNorm(f)                                (Gemma 2/3; Gemma 1: h + f)
    logits = c · tanh( (RMSNorm(h) · Eᵀ) / c )                  final soft-cap c (Gemma 2), else RMSNorm(h)·Eᵀ

Layer ℓ is local (sliding window) or global per `Architecture.is_sliding`; its RoPE per
`Architecture.rope_for_layer`; the query scale is `Architecture.query_scale`.

Inputs are a dict of int arrays [B, T]: `token_ids` with either `padding_mask` (1 = real token;
positions 0 … T−1) or `segment_ids` (0 = padding, 1 … k = packed sequences) with per-segment
`positions`. Attention never crosses segments.

A vision model (`Architecture.vision` set: PaliGemma, Gemma 3 4B+) also takes `images` [B, N, S, S, 3]
float in [−1, 1] and, for PaliGemma, `prefix_mask` [B, T]: `embed_inputs` is the hook between the token
embedding and the blocks, where the images' soft tokens replace the slots that hold
`vision.image_token_id` and the attention blocks (prefix-LM, bidirectional images) are made
(`gemma_tune.models.vision`). Without `images` a vision model reads text alone.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from gemma_tune.models.attention import GemmaAttention, attention_structure, runs_flex, runs_in_chunks
from gemma_tune.models.config import Architecture
from gemma_tune.models.init import HostNormal, no_initial_draws
from gemma_tune.models.layers import GatedMLP, RMSNorm
from gemma_tune.models.remat import rematerialised
from gemma_tune.models.vision import VisionEmbedder, attention_blocks, merge_images


class DecoderBlock(keras.layers.Layer):
    """One residual block: attention then GeGLU MLP, each between its pre- and (optional) post-norm."""

    def __init__(self, architecture: dict, layer_index: int, attention_implementation: str = "auto",
                 **kwargs):
        super().__init__(**kwargs)
        arch = Architecture.model_validate(architecture)
        self.architecture = arch.model_dump()
        self.layer_index = layer_index
        self.attention_implementation = attention_implementation
        self.is_sliding = arch.is_sliding(layer_index)
        theta, scaling = arch.rope_for_layer(layer_index)
        policy = self.dtype_policy
        eps = arch.rms_norm_eps
        self.pre_attention_norm = RMSNorm(eps, dtype=policy, name="pre_attention_norm")
        self.attention = GemmaAttention(
            arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim,
            query_scale=arch.query_scale, rope_theta=theta, rope_scaling=scaling,
            window=arch.sliding_window if self.is_sliding else None, softcap=arch.attn_logit_softcap,
            qk_norm=arch.use_qk_norm, rms_norm_eps=eps, implementation=attention_implementation,
            dtype=policy, name="attention")
        self.post_attention_norm = (RMSNorm(eps, dtype=policy, name="post_attention_norm")
                                    if arch.use_post_attention_norm else None)
        self.pre_ffw_norm = RMSNorm(eps, dtype=policy, name="pre_ffw_norm")
        self.mlp = GatedMLP(arch.hidden_size, arch.intermediate_size, dtype=policy, name="mlp")
        self.post_ffw_norm = (RMSNorm(eps, dtype=policy, name="post_ffw_norm")
                              if arch.use_post_ffw_norm else None)

    def build(self, input_shape):
        for layer in (self.pre_attention_norm, self.attention, self.post_attention_norm,
                      self.pre_ffw_norm, self.mlp, self.post_ffw_norm):
            if layer is not None:
                layer.build(input_shape)

    def call(self, x, positions, structure, cache=None, cache_index=None, training=None):
        attended = self.attention(self.pre_attention_norm(x), positions, structure=structure, cache=cache,
                                  cache_index=cache_index, training=training)
        if cache is not None:
            attended, cache = attended
        if self.post_attention_norm is not None:
            attended = self.post_attention_norm(attended)
        x = x + attended
        fed = self.mlp(self.pre_ffw_norm(x), training=training)
        if self.post_ffw_norm is not None:
            fed = self.post_ffw_norm(fed)
        x = x + fed
        return (x, cache) if cache is not None else x

    def get_config(self):
        return {**super().get_config(), "architecture": self.architecture, "layer_index": self.layer_index,
                "attention_implementation": self.attention_implementation}


@keras.saving.register_keras_serializable(package="gemma_tune")
class GemmaCausalLM(keras.Model):
    """A Gemma decoder with its tied output head. See the module docstring for the equations."""

    def __init__(self, architecture: Architecture | dict, attention_implementation: str = "auto",
                 **kwargs):
        super().__init__(**kwargs)
        arch = Architecture.model_validate(architecture if isinstance(architecture, dict)
                                           else architecture.model_dump())
        self.architecture = arch
        self.attention_implementation = attention_implementation
        self.remat = False  # set by the trainer: recompute each block in the backward pass
        policy = self.dtype_policy
        # E ~ N(0, 1/d_model): the scaled input E[token]·√d_model has unit variance, and a hidden state
        # aligned with E[v] reaches logits of order √d_model, so even a frozen random head can be fitted.
        self.token_embedding = keras.layers.Embedding(
            arch.vocab_size, arch.hidden_size,
            embeddings_initializer=HostNormal(stddev=arch.hidden_size ** -0.5),
            dtype=policy, name="token_embedding")
        self.blocks = [DecoderBlock(arch.model_dump(), i, attention_implementation, dtype=policy,
                                    name=f"block_{i}") for i in range(arch.num_layers)]
        self.final_norm = RMSNorm(arch.rms_norm_eps, dtype=policy, name="final_norm")
        self.vision = (VisionEmbedder(arch.model_dump(), dtype=policy, name="vision")
                       if arch.vision is not None else None)
        self.build_weights()

    def build_weights(self):
        hidden = (None, None, self.architecture.hidden_size)
        self.token_embedding.build((None, None))
        for block in self.blocks:
            block.build(hidden)
        self.final_norm.build(hidden)
        if self.vision is not None:
            self.vision.build()
        self.built = True

    def embed(self, token_ids):
        """E[token] · √d_model, the scale cast to the compute dtype first (as the references do)."""
        x = self.token_embedding(token_ids)
        return x * ops.cast(math.sqrt(self.architecture.hidden_size), x.dtype)

    def logits_from_hidden_states(self, hidden_states):
        """Logits for final-normed hidden states [..., hidden]: h·Eᵀ, soft-capped where the model is."""
        embeddings = ops.cast(self.token_embedding.embeddings, hidden_states.dtype)
        logits = ops.matmul(hidden_states, ops.transpose(embeddings))
        cap = self.architecture.final_logit_softcap
        if cap is not None:
            logits = ops.tanh(logits / cap) * cap
        return logits

    def _structures(self, query_index, key_index, query_segment, key_segment, query_block=None, key_block=None,
                    *, self_attention: bool):
        """One `AttentionStructure` per attention kind present: {None: global, window: sliding}, each with its
        FlexAttention block mask where the layers take that path (`runs_flex`), else its dense mask unless they
        attend in chunks (`runs_in_chunks`)."""
        windows = {block.attention.window for block in self.blocks}
        flex = runs_flex(self.attention_implementation, query_segment, self_attention)
        dense = not (flex or runs_in_chunks(self.attention_implementation, query_segment.shape[1],
                                            self.compute_dtype, self_attention and query_block is None))
        return {w: attention_structure(query_index, key_index, query_segment, key_segment, w, query_block,
                                       key_block, window_bounds_blocks=not self.architecture.prefix_lm,
                                       self_attention=self_attention, dense=dense, flex=flex)
                for w in windows}

    def embed_inputs(self, token_ids, images=None, prefix_mask=None):
        """(hidden states entering the blocks [B, T, d], attention blocks [B, T] or None): the token
        embeddings, with a vision model's image soft tokens merged in (module docstring)."""
        if self.vision is None:
            return self.embed(token_ids), None
        vision = self.architecture.vision
        in_vocabulary = ops.less(token_ids, self.architecture.vocab_size)
        x = self.embed(ops.where(in_vocabulary, token_ids, 0))
        if images is None:
            return x, None
        x = merge_images(x, token_ids, self.vision(images), vision.image_token_id)
        return x, attention_blocks(token_ids, vision.image_token_id,
                                   prefix_mask if self.architecture.prefix_lm else None)

    def call(self, inputs, training=None, return_hidden_states=False):
        token_ids = ops.convert_to_tensor(inputs["token_ids"], "int32")
        length = ops.shape(token_ids)[1]
        index = ops.arange(length, dtype="int32")
        if "segment_ids" in inputs:
            segments = ops.cast(inputs["segment_ids"], "int32")
            positions = ops.cast(inputs["positions"], "int32")
        else:
            padding = inputs.get("padding_mask")
            segments = (ops.ones_like(token_ids) if padding is None else ops.cast(padding, "int32"))
            positions = ops.broadcast_to(index[None, :], ops.shape(token_ids))
        x, blocks = self.embed_inputs(token_ids, inputs.get("images"), inputs.get("prefix_mask"))
        structures = self._structures(index, index, segments, segments, blocks, blocks, self_attention=True)
        for block in self.blocks:
            structure = structures[block.attention.window]
            if self.remat and training:
                # Only the hidden states pass through the rematerialised function (the structure is closed
                # over): TensorFlow's recompute_grad takes no keyword arguments and would differentiate it.
                x = rematerialised(lambda h, block=block, structure=structure: block(
                    h, positions, structure=structure, training=True))(x)
            else:
                x = block(x, positions, structure=structure, training=training)
        x = self.final_norm(x)
        if return_hidden_states:
            return x
        return self.logits_from_hidden_states(x)

    def init_cache(self, batch_size: int, max_length: int):
        """An empty KV cache: per layer (keys, values) zeros [B, max_length, kv_heads, head_dim]."""
        arch = self.architecture
        shape = (batch_size, max_length, arch.num_kv_heads, arch.head_dim)
        dtype = self.compute_dtype
        return [(ops.zeros(shape, dtype), ops.zeros(shape, dtype)) for _ in self.blocks]

    def call_with_cache(self, token_ids, positions, key_segments, cache, cache_index, images=None,
                        key_blocks=None):
        """One decoding step (or the prefill) over cache slots [cache_index, cache_index + t).

        `token_ids`, `positions` [B, t]; `key_segments` [B, S]: 1 where a cache slot holds (or, for this
        step's slots, is about to hold) a real token, 0 for padding; `cache` from `init_cache`. A vision
        model's prefill also takes `images` (merged as in `call`) and `key_blocks` [B, S], the attention
        blocks of the cache slots (`gemma_tune.models.vision.attention_blocks` of the prompt; 0 for the
        generated slots, which are causal).
        Returns (logits [B, t, vocab], new cache).
        """
        token_ids = ops.convert_to_tensor(token_ids, "int32")
        length = ops.shape(token_ids)[1]
        key_segments = ops.cast(key_segments, "int32")
        cache_index = ops.convert_to_tensor(cache_index, "int32")  # a tensor: one compiled step for all slots
        query_index = cache_index + ops.arange(length, dtype="int32")
        key_index = ops.arange(ops.shape(key_segments)[1], dtype="int32")
        query_segments = ops.take(key_segments, query_index, axis=1)
        query_blocks = None
        if key_blocks is not None:
            key_blocks = ops.cast(key_blocks, "int32")
            query_blocks = ops.take(key_blocks, query_index, axis=1)
        structures = self._structures(query_index, key_index, query_segments, key_segments, query_blocks,
                                      key_blocks, self_attention=False)
        x, _ = self.embed_inputs(token_ids, images)
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache):
            x, layer_cache = block(x, positions, structure=structures[block.attention.window],
                                   cache=layer_cache, cache_index=cache_index)
            new_cache.append(layer_cache)
        return self.logits_from_hidden_states(self.final_norm(x)), new_cache

    def get_config(self):
        return {**super().get_config(), "architecture": self.architecture.model_dump(),
                "attention_implementation": self.attention_implementation}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def build_model(arch: Architecture, dtype: str = "float32", attention_implementation: str = "auto",
                random_init: bool = True) -> GemmaCausalLM:
    """A `GemmaCausalLM`, randomly initialised on the host (`gemma_tune.models.init`: the same weights on every
    backend for the same seed), or with zeros and no draws (`random_init=False`) for a model whose weights
    are then all read from a checkpoint. `dtype`: a Keras dtype policy name ("float32", "bfloat16",
    "mixed_bfloat16", "mixed_float16")."""
    if not random_init:
        with no_initial_draws():
            return build_model(arch, dtype, attention_implementation)
    return GemmaCausalLM(arch, attention_implementation=attention_implementation, dtype=dtype,
                         name="gemma_causal_lm")
