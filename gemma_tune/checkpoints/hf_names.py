"""The one name map between gemma_tune's weights and Hugging Face Gemma, PaliGemma and Gemma 3 checkpoints.

Each `Tensor` pairs a weight path of `GemmaCausalLM` (docs/CONTRACTS.md, "Weight layout") with the name
transformers gives it inside one `part` of the checkpoint, and says how the HF array is laid out: `axes`
is the permutation with HF = `np.transpose(ours, axes)` — `LINEAR` (1, 0) for `nn.Linear` weights [out, in]
against our `Dense` kernels [in, out], `CONV` (3, 2, 0, 1) for SigLIP's `nn.Conv2d` patch embedding
[W, 3, p, p] against our channels-last `Conv2D` kernel [p, p, 3, W], None for the same layout. Both import
(`checkpoints.hf`) and export read this table, so a mapping is written once.

Parts and their prefixes:

    part       text-only        hub layout (transformers 4),   transformers 5          in memory (5)
                                also what export writes         save_pretrained
    TEXT       model.           language_model.model.           language_model.model.   model.language_model.
    VISION     —                vision_tower.vision_model.      vision_tower.           model.vision_tower.
    PROJECTOR  —                multi_modal_projector.          multi_modal_projector.  model.multi_modal_projector.

`split_name` finds a name's part by its longest prefix. The SigLIP pooling head (`head.*` of the vision
tower; transformers 5 writes it, the VLMs never run it) is ignored (`IGNORED_VISION`). An untied-looking
`lm_head.weight` / `language_model.lm_head.weight` must equal the embedding (`LM_HEAD_NAMES`).

Norm names differ between generations: Gemma 1 has no post-attention / post-FFN norms and its HF
`post_attention_layernorm` is the norm *before* the MLP (our `pre_ffw_norm`); Gemma 2 and 3 name that
one `pre_feedforward_layernorm` and use `post_attention_layernorm` for the norm after attention.

Vision tensors (`vision_name_map`): SigLIP's `embeddings.patch_embedding` (CONV kernel, bias),
`embeddings.position_embedding.weight`, per layer `encoder.layers.{j}.layer_norm{1,2}` (our LayerNorm
gamma/beta = HF weight/bias), `self_attn.{q,k,v}_proj` and `self_attn.out_proj` (our `o_proj`), `mlp.fc1`,
`mlp.fc2` (LINEAR kernels + biases), `post_layernorm`; the projector: PaliGemma's `linear` (LINEAR + bias),
Gemma 3's `mm_input_projection_weight` ([W, d], our kernel as is) and `mm_soft_emb_norm.weight` (RMSNorm).

A reward model (transformers' `*ForSequenceClassification`) adds its head beside the decoder, unprefixed:
`SCORE`, our `score.kernel` [hidden, 1] of `gemma_tune.models.RewardModel` as `score.weight` [1, hidden].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gemma_tune.models.config import Architecture

TEXT, VISION, PROJECTOR = "text", "vision", "projector"
LINEAR = (1, 0)
CONV = (3, 2, 0, 1)

EXPORT_PREFIX = "model."  # the decoder of a text-only checkpoint (*ForCausalLM)
# what a multimodal export writes: the hub's layout, which transformers 4 and 5 both load
MULTIMODAL_EXPORT_PREFIXES = {TEXT: "language_model.model.", VISION: "vision_tower.vision_model.",
                              PROJECTOR: "multi_modal_projector."}
IMPORT_PREFIXES = ("model.", "language_model.model.", "model.language_model.")  # the decoder's
PART_PREFIXES = {
    TEXT: IMPORT_PREFIXES,
    VISION: ("vision_tower.vision_model.", "vision_tower.", "model.vision_tower.", "model.vision_tower.vision_model."),
    PROJECTOR: ("multi_modal_projector.", "model.multi_modal_projector."),
}
# Tensors of a multimodal checkpoint that a text decoder alone does not use (vision tower and projector).
MULTIMODAL_PREFIXES = PART_PREFIXES[VISION] + PART_PREFIXES[PROJECTOR]
IGNORED_VISION = ("head.",)  # SigLIP's attention-pooling head: not part of PaliGemma / Gemma 3
# Untied output projections a tied Gemma checkpoint may still carry (equal to the embedding).
LM_HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight")
EMBEDDING_HF = "embed_tokens.weight"

_PROJECTIONS = (
    ("attention.q_proj", "self_attn.q_proj"),
    ("attention.k_proj", "self_attn.k_proj"),
    ("attention.v_proj", "self_attn.v_proj"),
    ("attention.o_proj", "self_attn.o_proj"),
    ("mlp.gate_proj", "mlp.gate_proj"),
    ("mlp.up_proj", "mlp.up_proj"),
    ("mlp.down_proj", "mlp.down_proj"),
)
_VISION_DENSE = (
    ("attention.q_proj", "self_attn.q_proj"),
    ("attention.k_proj", "self_attn.k_proj"),
    ("attention.v_proj", "self_attn.v_proj"),
    ("attention.o_proj", "self_attn.out_proj"),
    ("fc1", "mlp.fc1"),
    ("fc2", "mlp.fc2"),
)


@dataclass(frozen=True)
class Tensor:
    """One weight: our path, its HF name inside `part` (without the part's prefix), and `axes`, the
    permutation that gives the HF array from ours (None: the same layout)."""

    ours: str
    hf: str
    axes: tuple[int, ...] | None = None
    part: str = TEXT

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        return value if self.axes is None else np.transpose(value, self.axes)

    def from_hf(self, value: np.ndarray) -> np.ndarray:
        return value if self.axes is None else np.transpose(value, np.argsort(self.axes))

    def hf_shape(self, shape) -> tuple[int, ...]:
        """The HF shape of a weight whose shape is `shape` in our layout."""
        shape = tuple(shape)
        return shape if self.axes is None else tuple(shape[a] for a in self.axes)


SCORE = Tensor("score.kernel", "score.weight", LINEAR)  # a reward model's head: its full HF name


def projection_names() -> tuple[tuple[str, str], ...]:
    """(our layer path, HF module name) of the seven projections of a block, `{i}` for the layer index."""
    return tuple((f"blocks.{{i}}.{ours}", f"layers.{{i}}.{hf}") for ours, hf in _PROJECTIONS)


def _norms(arch: Architecture) -> list[tuple[str, str]]:
    if arch.family == "gemma":
        return [("pre_attention_norm", "input_layernorm"), ("pre_ffw_norm", "post_attention_layernorm")]
    norms = [("pre_attention_norm", "input_layernorm"), ("pre_ffw_norm", "pre_feedforward_layernorm")]
    if arch.use_post_attention_norm:
        norms.append(("post_attention_norm", "post_attention_layernorm"))
    if arch.use_post_ffw_norm:
        norms.append(("post_ffw_norm", "post_feedforward_layernorm"))
    return norms


def name_map(arch: Architecture) -> list[Tensor]:
    """Every tensor of the text decoder of `arch`, in checkpoint order (the vision tower's: `vision_name_map`)."""
    tensors = [Tensor("token_embedding.embeddings", EMBEDDING_HF)]
    for i in range(arch.num_layers):
        tensors += [Tensor(f"blocks.{i}.{ours}.scale", f"layers.{i}.{hf}.weight") for ours, hf in _norms(arch)]
        if arch.use_qk_norm:
            tensors += [Tensor(f"blocks.{i}.attention.q_norm.scale", f"layers.{i}.self_attn.q_norm.weight"),
                        Tensor(f"blocks.{i}.attention.k_norm.scale", f"layers.{i}.self_attn.k_norm.weight")]
        tensors += [Tensor(ours.format(i=i) + ".kernel", hf.format(i=i) + ".weight", LINEAR)
                    for ours, hf in projection_names()]
    tensors.append(Tensor("final_norm.scale", "norm.weight"))
    return tensors


def vision_name_map(arch: Architecture) -> list[Tensor]:
    """Every tensor of the vision tower and projector of `arch` (none without `arch.vision`)."""
    if arch.vision is None:
        return []
    enc = "vision.encoder"

    def vision(ours: str, hf: str, axes=None) -> Tensor:
        return Tensor(ours, hf, axes, VISION)

    tensors = [vision(f"{enc}.patch_embedding.kernel", "embeddings.patch_embedding.weight", CONV),
               vision(f"{enc}.patch_embedding.bias", "embeddings.patch_embedding.bias"),
               vision(f"{enc}.position_embedding.embeddings", "embeddings.position_embedding.weight")]
    for j in range(arch.vision.num_layers):
        ours, hf = f"{enc}.layers.{j}", f"encoder.layers.{j}"
        for norm in ("layer_norm1", "layer_norm2"):
            tensors += [vision(f"{ours}.{norm}.gamma", f"{hf}.{norm}.weight"),
                        vision(f"{ours}.{norm}.beta", f"{hf}.{norm}.bias")]
        for our_layer, hf_layer in _VISION_DENSE:
            tensors += [vision(f"{ours}.{our_layer}.kernel", f"{hf}.{hf_layer}.weight", LINEAR),
                        vision(f"{ours}.{our_layer}.bias", f"{hf}.{hf_layer}.bias")]
    tensors += [vision(f"{enc}.post_layernorm.gamma", "post_layernorm.weight"),
                vision(f"{enc}.post_layernorm.beta", "post_layernorm.bias")]
    if arch.family == "gemma3":
        tensors += [Tensor("vision.soft_embedding_norm.scale", "mm_soft_emb_norm.weight", None, PROJECTOR),
                    Tensor("vision.projector.kernel", "mm_input_projection_weight", None, PROJECTOR)]
    else:
        tensors += [Tensor("vision.projector.kernel", "linear.weight", LINEAR, PROJECTOR),
                    Tensor("vision.projector.bias", "linear.bias", None, PROJECTOR)]
    return tensors


def checkpoint_map(arch: Architecture) -> list[Tensor]:
    """Every tensor of a model with architecture `arch`: the decoder's, then the vision tower's and projector's."""
    return name_map(arch) + vision_name_map(arch)


def export_name(tensor: Tensor, multimodal: bool) -> str:
    """The full name export writes for `tensor`: `model.…` in a text-only checkpoint, the hub layout in a
    multimodal one."""
    if multimodal:
        return MULTIMODAL_EXPORT_PREFIXES[tensor.part] + tensor.hf
    if tensor.part != TEXT:
        raise ValueError(f"{tensor.ours} belongs in a multimodal checkpoint")
    return EXPORT_PREFIX + tensor.hf


def hf_projection_name(our_layer_path: str) -> str:
    """HF module name (inside the text part) of the projection at `our_layer_path`, e.g.
    `blocks.3.attention.q_proj` -> `layers.3.self_attn.q_proj`."""
    _, index, rest = our_layer_path.split(".", 2)
    for ours, hf in _PROJECTIONS:
        if rest == ours:
            return f"layers.{index}.{hf}"
    raise KeyError(f"not a projection path: {our_layer_path}")


def split_name(name: str) -> tuple[str, str] | None:
    """(part, name inside the part) of a full HF tensor name, by its longest known prefix; None when it has none."""
    best = None
    for part, prefixes in PART_PREFIXES.items():
        for prefix in prefixes:
            if name.startswith(prefix) and (best is None or len(prefix) > len(best[1])):
                best = (part, prefix)
    return None if best is None else (best[0], name[len(best[1]):])


def strip_prefix(name: str) -> str | None:
    """`name` without its decoder prefix, or None when it is not a decoder tensor's name."""
    found = split_name(name)
    return found[1] if found is not None and found[0] == TEXT else None
