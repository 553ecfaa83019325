"""The one name map between gemma_tune's weights and Hugging Face Gemma checkpoints.

Each `Tensor` pairs a weight path of `GemmaCausalLM` (docs/CONTRACTS.md, "Weight layout") with the
name transformers gives it, and says whether the HF tensor is the transpose of ours: HF `nn.Linear`
weights are [out, in], our `Dense` kernels [in, out]. Both import (`checkpoints.hf`) and export read
this table, so a mapping is written once.

Norm names differ between generations: Gemma 1 has no post-attention / post-FFN norms and its HF
`post_attention_layernorm` is the norm *before* the MLP (our `pre_ffw_norm`); Gemma 2 and 3 name that
one `pre_feedforward_layernorm` and use `post_attention_layernorm` for the norm after attention.

Text decoders live under `model.`; multimodal Gemma 3 checkpoints put the same names under
`language_model.model.` (written by transformers 4) or `model.language_model.` (transformers 5). A
reward model (transformers' `*ForSequenceClassification`) adds its head beside the decoder, unprefixed:
`SCORE`, our `score.kernel` [hidden, 1] of `gemma_tune.models.RewardModel` as `score.weight` [1, hidden].
"""

from __future__ import annotations

from dataclasses import dataclass

from gemma_tune.models.config import Architecture

EXPORT_PREFIX = "model."
IMPORT_PREFIXES = ("model.", "language_model.model.", "model.language_model.")
# Tensors of a multimodal checkpoint that a text decoder does not use (vision tower and projector).
MULTIMODAL_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                       "model.multi_modal_projector.")
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


@dataclass(frozen=True)
class Tensor:
    """One weight: our path, its HF name without the `model.` prefix, and whether HF holds it transposed."""

    ours: str
    hf: str
    transpose: bool = False


SCORE = Tensor("score.kernel", "score.weight", transpose=True)  # a reward model's head: its full HF name


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
    """Every tensor of a decoder with architecture `arch`, in checkpoint order."""
    tensors = [Tensor("token_embedding.embeddings", EMBEDDING_HF)]
    for i in range(arch.num_layers):
        tensors += [Tensor(f"blocks.{i}.{ours}.scale", f"layers.{i}.{hf}.weight") for ours, hf in _norms(arch)]
        if arch.use_qk_norm:
            tensors += [Tensor(f"blocks.{i}.attention.q_norm.scale", f"layers.{i}.self_attn.q_norm.weight"),
                        Tensor(f"blocks.{i}.attention.k_norm.scale", f"layers.{i}.self_attn.k_norm.weight")]
        tensors += [Tensor(ours.format(i=i) + ".kernel", hf.format(i=i) + ".weight", transpose=True)
                    for ours, hf in projection_names()]
    tensors.append(Tensor("final_norm.scale", "norm.weight"))
    return tensors


def hf_projection_name(our_layer_path: str) -> str:
    """HF module name (without prefix) of the projection at `our_layer_path`, e.g.
    `blocks.3.attention.q_proj` -> `layers.3.self_attn.q_proj`."""
    _, index, rest = our_layer_path.split(".", 2)
    for ours, hf in _PROJECTIONS:
        if rest == ours:
            return f"layers.{index}.{hf}"
    raise KeyError(f"not a projection path: {our_layer_path}")


def strip_prefix(name: str) -> str | None:
    """`name` without its decoder prefix (longest match first), or None when it has none."""
    for prefix in sorted(IMPORT_PREFIXES, key=len, reverse=True):
        if name.startswith(prefix):
            return name[len(prefix):]
    return None
