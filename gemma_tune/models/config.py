"""Architecture hyperparameters of the Gemma decoders (and the vision towers of the VLMs).

One `Architecture` describes Gemma 1, Gemma 2 and Gemma 3 text decoders; the official sizes live
as YAML in `configs/models/<preset>.yaml` under `model.architecture` (one source of truth).

Layer pattern: layer i uses sliding-window attention iff `sliding_window` is set and
`(i + 1) % sliding_window_pattern != 0` — Gemma 2 (pattern 2): even layers local, odd global;
Gemma 3 (pattern 6): i % 6 < 5 local, every sixth global.
Query scale: 1 / sqrt(query_pre_attn_scalar) (query_pre_attn_scalar defaults to head_dim).
RoPE: global layers use `rope_theta` with linear position scaling `rope_scaling_factor`;
local (sliding) layers use `rope_local_theta` (defaults to `rope_theta`) and no scaling.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class VisionArchitecture(BaseModel):
    """SigLIP vision tower and projector of PaliGemma 1/2 and Gemma 3 (4B and larger).

    An image of `image_size`² pixels is cut into (image_size / patch_size)² patches, encoded by SigLIP
    and turned into `tokens_per_image` soft tokens: all patches for PaliGemma (one linear projection),
    the patches average-pooled in k×k windows for Gemma 3 (k = patches per side / √tokens_per_image).
    `image_token_id` is the token id the text holds at every soft-token slot (PaliGemma's `<image>`
    257152, Gemma 3's `<image_soft_token>` 262144; either is the tokenizer's vocabulary size). It may lie
    outside the embedding (keras-hub's PaliGemma has 257152 rows): its slots are always replaced by the
    image's embeddings, so it is looked up as token 0, as transformers does.
    """

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(gt=0)
    patch_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    layer_norm_eps: float = Field(default=1e-6, gt=0)
    tokens_per_image: int = Field(gt=0, description="soft tokens per image after pooling (if any)")
    image_token_id: int = Field(ge=0, description="the token id at each image soft-token slot of the text")

    @model_validator(mode="after")
    def _consistent(self) -> "VisionArchitecture":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                             f"({self.num_heads})")
        side = self.patches_per_side
        tokens_side = round(self.tokens_per_image ** 0.5)
        if tokens_side ** 2 != self.tokens_per_image or side % tokens_side:
            raise ValueError(f"tokens_per_image ({self.tokens_per_image}) must be a square whose side divides the "
                             f"{side} patches per side (image_size / patch_size)")
        return self

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def pool_size(self) -> int:
        """k of the k×k average pooling from patches to soft tokens (1: every patch is a token)."""
        return self.patches_per_side // round(self.tokens_per_image ** 0.5)


class Architecture(BaseModel):
    """Hyperparameters of one Gemma decoder. Field meanings follow the module docstring."""

    model_config = ConfigDict(extra="forbid")

    family: Literal["gemma", "gemma2", "gemma3"]
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    query_pre_attn_scalar: float | None = Field(default=None, gt=0)
    rms_norm_eps: float = Field(default=1e-6, gt=0)
    rope_theta: float = Field(default=10_000.0, gt=0)
    rope_local_theta: float | None = Field(default=None, gt=0)
    rope_scaling_factor: float = Field(default=1.0, ge=1.0)
    sliding_window: int | None = Field(default=None, gt=0)
    sliding_window_pattern: int | None = Field(default=None, gt=0)
    attn_logit_softcap: float | None = Field(default=None, gt=0)
    final_logit_softcap: float | None = Field(default=None, gt=0)
    use_post_attention_norm: bool = False
    use_post_ffw_norm: bool = False
    use_qk_norm: bool = False
    max_position_embeddings: int = Field(default=8192, gt=0)
    vision: VisionArchitecture | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "Architecture":
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.sliding_window is not None and self.sliding_window_pattern is None:
            raise ValueError("sliding_window needs sliding_window_pattern (2 for Gemma 2, 6 for Gemma 3)")
        if self.vision is not None:
            if self.vision.pool_size != 1 and self.family != "gemma3":
                raise ValueError("PaliGemma projects every patch (tokens_per_image = (image_size / patch_size)²); "
                                 "only Gemma 3 pools patches into fewer soft tokens")
        return self

    @property
    def prefix_lm(self) -> bool:
        """Whether the model is a PaliGemma (prefix-LM attention over image + prefix); Gemma 3 vision models
        attend bidirectionally within each image instead."""
        return self.vision is not None and self.family != "gemma3"

    @property
    def query_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def is_sliding(self, layer_index: int) -> bool:
        """Whether layer `layer_index` uses sliding-window (local) attention."""
        if self.sliding_window is None:
            return False
        return (layer_index + 1) % self.sliding_window_pattern != 0

    def rope_for_layer(self, layer_index: int) -> tuple[float, float]:
        """(theta, linear scaling factor) of the rotary embedding of layer `layer_index`."""
        if self.is_sliding(layer_index):
            return (self.rope_local_theta or self.rope_theta, 1.0)
        return (self.rope_theta, self.rope_scaling_factor)
