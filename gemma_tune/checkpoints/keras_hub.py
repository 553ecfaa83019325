"""keras-hub presets <-> gemma_tune models: GemmaBackbone (Gemma 1 and 2), Gemma3Backbone (text, or with its
Gemma3VisionEncoder) and PaliGemmaBackbone (PaliGemma 1 and 2).

A keras-hub preset directory holds `config.json` (the backbone's `class_name` and constructor `config`),
`model.weights.h5` (or sharded weights) and `assets/tokenizer/vocabulary.spm`; `save_to_preset` of a
CausalLM adds `task.json`, `preprocessor.json`, `tokenizer.json` and `metadata.json`.

Configuration (keras-hub 0.32 constructor arguments -> `Architecture`):

    GemmaBackbone    family "gemma2" when it has post norms, soft-caps or sliding windows, else "gemma";
                     intermediate_size = intermediate_dim / 2 (keras-hub's `intermediate_dim` counts both
                     GeGLU halves); sliding layers i % 2 == 0; RoPE θ = 10 000 on every layer.
    PaliGemmaBackbone  the decoder as GemmaBackbone (PaliGemma 1: "gemma", PaliGemma 2: "gemma2"), plus
                     `vision`: image_size, vit_patch_size, vit_num_layers, vit_hidden_dim, vit_num_heads,
                     vit_intermediate_dim (None: keras-hub's 4304), layer_norm_eps 1e-6 (keras-hub's ViT
                     hard-codes it), tokens_per_image = (image_size / patch)² (every patch; vit_pooling must
                     be None and vit_classifier_activation None/linear: the "classifier" is the projector).
    Gemma3Backbone   family "gemma3"; intermediate_size = intermediate_dim; sliding layers i % 6 < 5;
                     RoPE θ = 10 000 on sliding layers, 1 000 000 (scaled by global_rope_scaling_factor) on
                     global ones; max_position_embeddings = 32 768 · global_rope_scaling_factor (1B: 32k,
                     4B and larger: 128k). With a `vision_encoder` (Gemma3VisionEncoder: image_size,
                     patch_size, num_layers, hidden_dim, num_heads, intermediate_dim, pool_size,
                     output_dim = hidden_dim, layer_norm_epsilon) `vision` has tokens_per_image =
                     (image_size / patch / pool_size)². keras-hub builds the encoder blocks' LayerNorms with
                     1e-6 whatever layer_norm_epsilon says (it reaches only the post-LayerNorm and the
                     soft-embedding RMSNorm), so only 1e-6 describes one model.
    query scale      query_head_dim_normalize=True -> 1/√head_dim; False -> 1/√(hidden_dim / num_heads), the
                     models' real scale (Gemma 2 27B: 144, Gemma 3 27B: 168). keras-hub 0.32 itself always
                     computes 1/√head_dim (its decoder blocks pass `query_head_dim_normalize=True` down), so
                     for those presets our logits follow transformers, not keras-hub.

The image token. keras-hub keeps images apart from the text ids, so its presets do not record the id that our
`token_ids` hold at every image slot (`VisionArchitecture.image_token_id`). Import takes, in order: the
`"gemma_tune": {"image_token_id": …}` entry that our export writes into metadata.json (keras-hub never reads
that file); for Gemma 3 the id of the tokenizer's image placeholder `<img>` (keras-hub's Gemma3Tokenizer),
else 262144 (`<image_soft_token>` of transformers); for PaliGemma `vocabulary_size` (keras-hub's HF converter
sets vocabulary_size = image_token_index, so 257152 for the released models). An id outside the embedding is
looked up as token 0 and replaced by the image's soft token, as transformers does.

Inputs, keras-hub vs ours (same weights give the same logits, see the differences below):
    PaliGemma  keras-hub: `images` [B, S, S, 3], `token_ids` / `padding_mask` / `response_mask` [B, T] over the
               text only; the backbone concatenates [image soft tokens, text] (image first) and attends fully
               over every key that is not `response_mask`, causally over the response. Ours: `token_ids`
               [B, P + T] with image_token_id at the P image slots, `images` [B, 1, S, S, 3], `prefix_mask` 1
               over image + prefix. Positions 0… run over [image, text] in both. Neither scales the image
               embeddings (keras-hub multiplies the text embeddings by √d_model before the concatenation;
               transformers 5 scales inside the text embedding before its masked_scatter).
    Gemma 3    keras-hub: `images` [B, N, S, S, 3], `token_ids` (any id at image slots: its embedding is
               overwritten), `vision_indices` [B, N·tokens] (the slots, in order) and `vision_mask` [B, T];
               image tokens attend bidirectionally within each run of consecutive vision_mask tokens, as
               transformers' block ids. Ours: image_token_id at the slots.

Where keras-hub 0.32 differs from transformers (the reference: gemma_tune follows transformers):
    sliding windows  keras-hub ANDs a symmetric band |i − j| < window onto its mask; transformers bounds only
                     the past (j > i − window) and, for PaliGemma 2, not the prefix at all:
                       Gemma 3 (AND(window, OR(causal, image block))): an image token does not see the tokens of
                         its own image ≥ window positions ahead in keras-hub. Equal whenever tokens_per_image ≤
                         sliding_window (the released 256 tokens vs windows 512/1024 always are).
                       PaliGemma 2 (OR(AND(causal, window), prefix)): prefix tokens ≥ window apart do not see each
                         other in keras-hub. Equal whenever image + prefix ≤ sliding_window (4096): always at
                         224 and 448 px with prompts under 3072 tokens, never at 896 px (4096 image tokens).
                     Measured (transformers 5.24, tiny random float32 models of tests/test_parity_vision_keras_hub.py):
                     Gemma 3 with 4 tokens per image and window 2, max |Δ logit| keras-hub vs transformers 2.5;
                     PaliGemma 2 with image + prefix 19 and window 8, 1.9; ours vs transformers ≤ 5e-6 in both
                     (and keras-hub = transformers to 0 with windows 4 and 20). The tests pin both differences and
                     check parity where keras-hub agrees.
    loading HF       keras-hub's `hf://` PaliGemma converter sets head_dim = num_image_tokens (right at 224 px
                     only) and cannot read transformers 5's layout (see ARCHITECTURE.md); this module reads and
                     writes keras-hub presets only (HF checkpoints go through gemma_tune.checkpoints.hf).

Weights: `NAME_MAP` (decoder) and `VISION_NAME_MAP` (vision tower and projector) pair each weight path of
`GemmaCausalLM` (docs/CONTRACTS.md, "Weight layout") with its keras-hub variable path and layout. keras-hub keeps
attention kernels per head as einsum kernels:

    query/key/value  [heads, hidden, head_dim]   ours [hidden, heads·head_dim]   ("heads_in")
    attention_output [heads, head_dim, hidden]   ours [heads·head_dim, hidden]   ("heads_out")

Vision weights have the same layout on both sides (Conv2D kernel [p, p, 3, W], Dense [in, out] + bias,
LayerNorm gamma/beta). PaliGemma's projector is keras-hub's `image_classifier` (Dense with bias); Gemma 3's is
`vision_output_encoder/vision_input_projection` (no bias) after `vision_soft_embedding_norm` (RMSNorm, 1 + w).

The same tables import (`load_keras_hub_preset`) and export (`write_keras_hub_preset`). Import builds the
keras-hub backbone with `Backbone.from_preset` and copies every variable by path; a variable left over,
missing or of the wrong shape is a CheckpointError.

Export writes a keras-hub CausalLM (backbone + tokenizer + preprocessor; vision models an image converter
mapping [0, 255] to [−1, 1]) with `save_to_preset`, and for vision models the image token into metadata.json.
LoRA is merged in float32 (`float_kernel`) and the result cast to the export dtype; a quantised base is
dequantised. Where keras-hub cannot express a model exactly the export refuses with a CheckpointError,
except for the query scale: when query_pre_attn_scalar ≠ head_dim the factor √(head_dim / scalar) is folded
into the query (the q kernel, or the query-norm scale (1 + w) where QK-norm follows it) and the preset says
`query_head_dim_normalize=True`, so keras-hub's 1/√head_dim gives the model's logits. The sliding-window
differences above are not refused: keras-hub computes its own mask from the same weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from gemma_tune.errors import CheckpointError
from gemma_tune.models.config import Architecture

CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
METADATA_KEY = "gemma_tune"  # our entry in keras-hub's metadata.json (keras-hub writes that file, never reads it)
GEMMA_BACKBONE = "GemmaBackbone"
GEMMA3_BACKBONE = "Gemma3Backbone"
PALIGEMMA_BACKBONE = "PaliGemmaBackbone"
GEMMA3_VISION_ENCODER = "Gemma3VisionEncoder"
# keras-hub constants the presets cannot change (keras-hub 0.32 sources, see the module docstring).
KERAS_HUB_EPSILON = 1e-6  # decoder-block norms are built without the config's layer_norm_epsilon
VIT_EPSILON = 1e-6  # PaliGemma's ViT LayerNorms, and Gemma 3's encoder-block LayerNorms
VIT_INTERMEDIATE_DEFAULT = 4304  # PaliGemmaBackbone: vit_intermediate_dim=None means 4304
GEMMA_ROPE_THETA = 10_000.0
GEMMA3_LOCAL_ROPE_THETA = 10_000.0
GEMMA3_GLOBAL_ROPE_THETA = 1_000_000.0
GEMMA_SLIDING_PATTERN = 2
GEMMA3_SLIDING_PATTERN = 6
GEMMA_MAX_POSITIONS = 8192
GEMMA3_BASE_MAX_POSITIONS = 32_768
# Gemma3Tokenizer needs these pieces unless built with has_vision_tokens=False.
GEMMA3_VISION_TOKENS = ("<img>", "<start_of_image>", "<end_of_image>")
GEMMA3_IMAGE_PLACEHOLDER = "<img>"
GEMMA3_IMAGE_TOKEN_ID = 262144  # transformers' <image_soft_token>, when the tokenizer has no <img>
# The image converter of an exported vision preset: pixels [0, 255] -> [-1, 1], as our models expect.
IMAGE_SCALE, IMAGE_OFFSET = 1 / 127.5, -1.0


@dataclass(frozen=True)
class Tensor:
    """One weight: our path, keras-hub's variable path (`{i}`: decoder layer index, `{j}`: vision encoder
    layer index), layout, when it exists."""

    ours: str
    theirs: str
    layout: str = "same"  # "same" | "heads_in" | "heads_out"
    present: Callable[[Architecture], bool] = lambda arch: True


NAME_MAP: tuple[Tensor, ...] = (
    Tensor("token_embedding.embeddings", "token_embedding/embeddings"),
    Tensor("blocks.{i}.pre_attention_norm.scale", "decoder_block_{i}/pre_attention_norm/scale"),
    Tensor("blocks.{i}.post_attention_norm.scale", "decoder_block_{i}/post_attention_norm/scale",
           present=lambda arch: arch.use_post_attention_norm),
    Tensor("blocks.{i}.attention.q_proj.kernel", "decoder_block_{i}/attention/query/kernel", "heads_in"),
    Tensor("blocks.{i}.attention.k_proj.kernel", "decoder_block_{i}/attention/key/kernel", "heads_in"),
    Tensor("blocks.{i}.attention.v_proj.kernel", "decoder_block_{i}/attention/value/kernel", "heads_in"),
    Tensor("blocks.{i}.attention.q_norm.scale", "decoder_block_{i}/attention/query_norm/scale",
           present=lambda arch: arch.use_qk_norm),
    Tensor("blocks.{i}.attention.k_norm.scale", "decoder_block_{i}/attention/key_norm/scale",
           present=lambda arch: arch.use_qk_norm),
    Tensor("blocks.{i}.attention.o_proj.kernel", "decoder_block_{i}/attention/attention_output/kernel",
           "heads_out"),
    Tensor("blocks.{i}.pre_ffw_norm.scale", "decoder_block_{i}/pre_ffw_norm/scale"),
    Tensor("blocks.{i}.post_ffw_norm.scale", "decoder_block_{i}/post_ffw_norm/scale",
           present=lambda arch: arch.use_post_ffw_norm),
    Tensor("blocks.{i}.mlp.gate_proj.kernel", "decoder_block_{i}/ffw_gating/kernel"),
    Tensor("blocks.{i}.mlp.up_proj.kernel", "decoder_block_{i}/ffw_gating_2/kernel"),
    Tensor("blocks.{i}.mlp.down_proj.kernel", "decoder_block_{i}/ffw_linear/kernel"),
    Tensor("final_norm.scale", "final_normalization/scale"),
)


def _paligemma(arch: Architecture) -> bool:
    return arch.family != "gemma3"


def _vision_tables() -> tuple[Tensor, ...]:
    """The SigLIP tower (the same variable paths in PaliGemmaVit and Gemma3VisionEncoder) and the projectors."""
    encoder, block = "vision.encoder", "vision.encoder.layers.{j}"
    theirs_block = "image_encoder/encoder_block_{j}"
    table = [
        Tensor(f"{encoder}.patch_embedding.kernel", "image_encoder/encoder_embeddings/embedding_conv/kernel"),
        Tensor(f"{encoder}.patch_embedding.bias", "image_encoder/encoder_embeddings/embedding_conv/bias"),
        Tensor(f"{encoder}.position_embedding.embeddings",
               "image_encoder/encoder_embeddings/position_embedding/embeddings"),
    ]
    for ours, theirs in (("layer_norm1", "layer_norm_1"), ("layer_norm2", "layer_norm_2")):
        table += [Tensor(f"{block}.{ours}.{w}", f"{theirs_block}/{theirs}/{w}") for w in ("gamma", "beta")]
    for ours, theirs in (("attention.q_proj", "multi_head_attention/query_proj"),
                         ("attention.k_proj", "multi_head_attention/key_proj"),
                         ("attention.v_proj", "multi_head_attention/value_proj"),
                         ("attention.o_proj", "multi_head_attention/out_proj"),
                         ("fc1", "mlp_dense_1"), ("fc2", "mlp_dense_2")):
        table += [Tensor(f"{block}.{ours}.{w}", f"{theirs_block}/{theirs}/{w}") for w in ("kernel", "bias")]
    table += [Tensor(f"{encoder}.post_layernorm.{w}", f"image_encoder/encoder_layer_norm/{w}")
              for w in ("gamma", "beta")]
    table += [
        Tensor("vision.projector.kernel", "image_classifier/kernel", present=_paligemma),
        Tensor("vision.projector.bias", "image_classifier/bias", present=_paligemma),
        Tensor("vision.soft_embedding_norm.scale", "vision_output_encoder/vision_soft_embedding_norm/scale",
               present=lambda arch: not _paligemma(arch)),
        Tensor("vision.projector.kernel", "vision_output_encoder/vision_input_projection/kernel",
               present=lambda arch: not _paligemma(arch)),
    ]
    return tuple(table)


VISION_NAME_MAP: tuple[Tensor, ...] = _vision_tables()


def tensors(arch: Architecture) -> list[tuple[str, str, str]]:
    """(our path, keras-hub path, layout) of every weight of a model with architecture `arch`: the decoder,
    and the vision tower and projector of a vision model."""
    out = []
    table = NAME_MAP + (VISION_NAME_MAP if arch.vision is not None else ())
    for t in table:
        if not t.present(arch):
            continue
        if "{i}" in t.ours:
            out += [(t.ours.format(i=i), t.theirs.format(i=i), t.layout) for i in range(arch.num_layers)]
        elif "{j}" in t.ours:
            out += [(t.ours.format(j=j), t.theirs.format(j=j), t.layout) for j in range(arch.vision.num_layers)]
        else:
            out.append((t.ours, t.theirs, t.layout))
    return out


def to_ours(value: np.ndarray, layout: str) -> np.ndarray:
    """A keras-hub array in our layout (see the module docstring)."""
    if layout == "heads_in":  # [N, hidden, D] -> [hidden, N·D]
        heads, hidden, dim = value.shape
        return np.transpose(value, (1, 0, 2)).reshape(hidden, heads * dim)
    if layout == "heads_out":  # [N, D, hidden] -> [N·D, hidden]
        heads, dim, hidden = value.shape
        return value.reshape(heads * dim, hidden)
    return value


def to_theirs(value: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    """Our array in keras-hub's layout; `shape` is the keras-hub variable's shape."""
    if layout == "heads_in":  # [hidden, N·D] -> [N, hidden, D]
        heads, hidden, dim = shape
        return np.transpose(value.reshape(hidden, heads, dim), (1, 0, 2))
    if layout == "heads_out":  # [N·D, hidden] -> [N, D, hidden]
        return value.reshape(shape)
    return value


# --------------------------------------------------------------------------------------------- config


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_config(path: Path) -> dict | None:
    return _read_json(path / CONFIG_FILE)


def is_keras_hub_preset(path) -> bool:
    """Whether `path` is a local keras-hub preset directory (its config.json names a keras-hub class)."""
    path = Path(str(path))
    if not path.is_dir():
        return False
    config = _read_config(path)
    if config is None:
        return False
    registered = str(config.get("registered_name", ""))
    module = str(config.get("module", ""))
    return "class_name" in config and (registered.startswith("keras_hub>") or module.startswith("keras_hub"))


def architecture_from_keras_hub(class_name: str, config: dict, where: str = CONFIG_FILE,
                                image_token_id: int | None = None) -> Architecture:
    """The `Architecture` of a keras-hub GemmaBackbone / Gemma3Backbone / PaliGemmaBackbone constructor config.

    A Gemma 3 vision encoder and PaliGemma's ViT give `vision`; `image_token_id` None takes the default of the
    module docstring (Gemma 3: 262144, PaliGemma: vocabulary_size; `read_keras_hub_architecture` also reads the
    preset's metadata and tokenizer). CheckpointError for another backbone or a configuration our model does
    not reproduce exactly (embedding model, bidirectional attention, local RoPE scaling, ε ≠ 1e-6, ViT pooling).
    """
    if class_name not in (GEMMA_BACKBONE, GEMMA3_BACKBONE, PALIGEMMA_BACKBONE):
        raise CheckpointError(f"unsupported keras-hub backbone {class_name!r}; expected {GEMMA_BACKBONE} "
                              f"(Gemma 1 and 2), {GEMMA3_BACKBONE} (Gemma 3) or {PALIGEMMA_BACKBONE} "
                              "(PaliGemma 1 and 2)", where=where)
    try:
        return _architecture(class_name, config, where, image_token_id)
    except KeyError as e:
        raise CheckpointError(f"{class_name} config has no {e.args[0]!r}", where=where) from e
    except ValueError as e:  # pydantic validation of the resulting Architecture
        raise CheckpointError(f"{class_name} config does not describe a valid model: {e}", where=where) from e


def _paligemma_vision(c: dict, image_token_id: int | None, where: str) -> dict:
    pooling, activation = c.get("vit_pooling"), c.get("vit_classifier_activation")
    refused = [name for name, bad in (
        (f"vit_pooling={pooling!r}", pooling is not None),
        (f"vit_classifier_activation={activation!r}", activation not in (None, "linear")),
    ) if bad]
    if refused:
        raise CheckpointError(f"{PALIGEMMA_BACKBONE} with {', '.join(refused)} is not a PaliGemma model: the ViT "
                              "must give every patch, linearly projected", where=where)
    image, patch = int(c["image_size"]), int(c["vit_patch_size"])
    if image % patch:
        raise CheckpointError(f"image_size={image} is not a multiple of vit_patch_size={patch}", where=where)
    return dict(image_size=image, patch_size=patch, num_layers=int(c["vit_num_layers"]),
                hidden_size=int(c["vit_hidden_dim"]), num_heads=int(c["vit_num_heads"]),
                intermediate_size=int(c.get("vit_intermediate_dim") or VIT_INTERMEDIATE_DEFAULT),
                layer_norm_eps=VIT_EPSILON, tokens_per_image=(image // patch) ** 2,
                image_token_id=int(c["vocabulary_size"]) if image_token_id is None else image_token_id)


def _gemma3_vision(c: dict, image_token_id: int | None, where: str) -> dict | None:
    encoder = c.get("vision_encoder")
    if encoder is None:
        return None
    name = encoder.get("class_name") if isinstance(encoder, dict) else None
    if name != GEMMA3_VISION_ENCODER:
        raise CheckpointError(f"{GEMMA3_BACKBONE} vision_encoder {name!r} is not a {GEMMA3_VISION_ENCODER}",
                              where=where)
    v = encoder.get("config", {})
    eps = float(v.get("layer_norm_epsilon", VIT_EPSILON))
    if eps != VIT_EPSILON:
        raise CheckpointError(f"vision_encoder layer_norm_epsilon={eps}: keras-hub builds the encoder blocks' "
                              f"LayerNorms with {VIT_EPSILON} whatever it says, so only {VIT_EPSILON} describes one "
                              "consistent model", where=where)
    image, patch, pool = int(v["image_size"]), int(v["patch_size"]), int(v.get("pool_size", 14))
    if image % patch or (image // patch) % pool:
        raise CheckpointError(f"vision_encoder image_size={image}, patch_size={patch}, pool_size={pool}: the "
                              "patches per side must be a multiple of pool_size", where=where)
    if int(v["output_dim"]) != int(c["hidden_dim"]):
        raise CheckpointError(f"vision_encoder output_dim={v['output_dim']} differs from hidden_dim="
                              f"{c['hidden_dim']}", where=where)
    return dict(image_size=image, patch_size=patch, num_layers=int(v["num_layers"]),
                hidden_size=int(v["hidden_dim"]), num_heads=int(v["num_heads"]),
                intermediate_size=int(v["intermediate_dim"]), layer_norm_eps=eps,
                tokens_per_image=(image // patch // pool) ** 2,
                image_token_id=GEMMA3_IMAGE_TOKEN_ID if image_token_id is None else image_token_id)


def _architecture(class_name: str, c: dict, where: str, image_token_id: int | None) -> Architecture:
    eps = float(c.get("layer_norm_epsilon", KERAS_HUB_EPSILON))
    if eps != KERAS_HUB_EPSILON:
        raise CheckpointError(f"layer_norm_epsilon={eps}: keras-hub builds its decoder-block norms with "
                              f"{KERAS_HUB_EPSILON} whatever the config says, so only {KERAS_HUB_EPSILON} "
                              "describes one consistent model", where=where)
    heads, hidden, head_dim = int(c["num_query_heads"]), int(c["hidden_dim"]), int(c["head_dim"])
    scalar = head_dim if c.get("query_head_dim_normalize", True) else hidden // heads
    sliding = bool(c.get("use_sliding_window_attention", False))
    common = dict(
        vocab_size=int(c["vocabulary_size"]), hidden_size=hidden, num_layers=int(c["num_layers"]),
        num_heads=heads, num_kv_heads=int(c["num_key_value_heads"]), head_dim=head_dim,
        query_pre_attn_scalar=None if scalar == head_dim else float(scalar), rms_norm_eps=eps,
        sliding_window=int(c["sliding_window_size"]) if sliding else None,
        attn_logit_softcap=c.get("attention_logit_soft_cap"), final_logit_softcap=c.get("final_logit_soft_cap"),
        use_post_attention_norm=bool(c.get("use_post_attention_norm", False)),
        use_post_ffw_norm=bool(c.get("use_post_ffw_norm", False)),
    )
    if class_name in (GEMMA_BACKBONE, PALIGEMMA_BACKBONE):
        intermediate = int(c["intermediate_dim"])
        if intermediate % 2:
            raise CheckpointError(f"intermediate_dim={intermediate} must be even (keras-hub splits it "
                                  "into the two GeGLU halves)", where=where)
        gemma2 = (sliding or common["use_post_attention_norm"] or common["use_post_ffw_norm"]
                  or common["attn_logit_softcap"] is not None or common["final_logit_softcap"] is not None)
        vision = _paligemma_vision(c, image_token_id, where) if class_name == PALIGEMMA_BACKBONE else None
        return Architecture(
            family="gemma2" if gemma2 else "gemma", intermediate_size=intermediate // 2,
            rope_theta=GEMMA_ROPE_THETA, sliding_window_pattern=GEMMA_SLIDING_PATTERN if sliding else None,
            max_position_embeddings=GEMMA_MAX_POSITIONS, vision=vision, **common)
    refused = [name for name, bad in (
        ("is_embedding_model=True", bool(c.get("is_embedding_model", False))),
        ("use_bidirectional_attention=True", bool(c.get("use_bidirectional_attention", False))),
        ("local_rope_scaling_factor≠1", float(c.get("local_rope_scaling_factor", 1.0)) != 1.0),
    ) if bad]
    if refused:
        raise CheckpointError(f"{GEMMA3_BACKBONE} with {', '.join(refused)} is not a decoder gemma_tune "
                              "reproduces", where=where)
    factor = float(c.get("global_rope_scaling_factor", 1.0))
    return Architecture(
        family="gemma3", intermediate_size=int(c["intermediate_dim"]),
        rope_theta=GEMMA3_GLOBAL_ROPE_THETA, rope_local_theta=GEMMA3_LOCAL_ROPE_THETA,
        rope_scaling_factor=factor, sliding_window_pattern=GEMMA3_SLIDING_PATTERN if sliding else None,
        use_qk_norm=bool(c.get("use_query_key_norm", True)),
        max_position_embeddings=int(GEMMA3_BASE_MAX_POSITIONS * factor),
        vision=_gemma3_vision(c, image_token_id, where), **common)


def _tokenizer_piece_id(path: Path, piece: str) -> int | None:
    """The id of `piece` in the preset's SentencePiece vocabulary, None without one or without that piece."""
    import sentencepiece as spm

    from gemma_tune.tokenizer import KERAS_HUB_FILE

    spm_file = path / KERAS_HUB_FILE
    if not spm_file.is_file():
        return None

    try:
        processor = spm.SentencePieceProcessor(model_file=str(spm_file))
    except (OSError, RuntimeError):
        return None
    index = int(processor.piece_to_id(piece))
    return None if processor.IsUnknown(index) else index


def preset_image_token_id(path, class_name: str) -> int | None:
    """The image token of a vision preset when the preset says it (module docstring): our metadata.json entry,
    else for Gemma 3 the tokenizer's `<img>`; None leaves the default to `architecture_from_keras_hub`."""
    path = Path(str(path))
    recorded = ((_read_json(path / METADATA_FILE) or {}).get(METADATA_KEY) or {}).get("image_token_id")
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 0:
        return recorded
    if class_name == GEMMA3_BACKBONE:
        return _tokenizer_piece_id(path, GEMMA3_IMAGE_PLACEHOLDER)
    return None


def read_keras_hub_architecture(path) -> Architecture:
    """The `Architecture` of a local keras-hub preset directory from its files (config.json, metadata.json,
    the tokenizer's `<img>`), without reading weights."""
    path = Path(str(path))
    if not is_keras_hub_preset(path):
        raise CheckpointError(f"not a keras-hub preset directory: expected {CONFIG_FILE} naming a keras-hub "
                              "backbone class", where=str(path))
    config = _read_config(path)
    class_name = config["class_name"]
    return architecture_from_keras_hub(class_name, config.get("config", {}), where=str(path / CONFIG_FILE),
                                       image_token_id=preset_image_token_id(path, class_name))


def keras_hub_backbone_config(arch: Architecture) -> tuple[str, dict, float]:
    """(backbone class name, constructor config, query fold factor) describing `arch` in keras-hub.

    A Gemma 3 vision encoder appears in the config serialised (`{"class_name": "Gemma3VisionEncoder",
    "config": {...}}`), as in config.json. The fold factor √(head_dim / query_pre_attn_scalar) multiplies the
    queries (see the module docstring). CheckpointError naming every feature keras-hub cannot express.
    """
    gemma3 = arch.family == "gemma3"
    vision = arch.vision
    pattern = GEMMA3_SLIDING_PATTERN if gemma3 else GEMMA_SLIDING_PATTERN
    sliding = arch.sliding_window is not None
    any_local = any(arch.is_sliding(i) for i in range(arch.num_layers))
    problems = []
    if arch.rms_norm_eps != KERAS_HUB_EPSILON:
        problems.append(f"rms_norm_eps={arch.rms_norm_eps} (keras-hub: {KERAS_HUB_EPSILON})")
    if sliding and arch.sliding_window_pattern != pattern:
        problems.append(f"sliding_window_pattern={arch.sliding_window_pattern} (keras-hub: {pattern})")
    if vision is not None and vision.layer_norm_eps != VIT_EPSILON:
        problems.append(f"vision layer_norm_eps={vision.layer_norm_eps} (keras-hub's ViT: {VIT_EPSILON})")
    if gemma3:
        if arch.rope_theta != GEMMA3_GLOBAL_ROPE_THETA:
            problems.append(f"rope_theta={arch.rope_theta} (keras-hub: {GEMMA3_GLOBAL_ROPE_THETA:g})")
        local = arch.rope_local_theta or arch.rope_theta
        if any_local and local != GEMMA3_LOCAL_ROPE_THETA:
            problems.append(f"rope_local_theta={local} (keras-hub: {GEMMA3_LOCAL_ROPE_THETA:g})")
    else:
        thetas = {arch.rope_for_layer(i)[0] for i in range(arch.num_layers)}
        if thetas != {GEMMA_ROPE_THETA}:
            problems.append(f"RoPE θ {sorted(thetas)} (keras-hub {'PaliGemma' if vision else 'Gemma'}Backbone: "
                            f"{GEMMA_ROPE_THETA:g})")
        if arch.rope_scaling_factor != 1.0:
            problems.append(f"rope_scaling_factor={arch.rope_scaling_factor} (keras-hub has none for Gemma 1/2)")
        if arch.use_qk_norm:
            problems.append("use_qk_norm (keras-hub's Gemma 1/2 decoder has no QK-norm)")
    if problems:
        raise CheckpointError("keras-hub cannot express this model exactly: " + "; ".join(problems),
                              where=f"architecture family {arch.family}")
    config = {
        "vocabulary_size": arch.vocab_size, "num_layers": arch.num_layers, "num_query_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads, "hidden_dim": arch.hidden_size, "head_dim": arch.head_dim,
        "query_head_dim_normalize": True, "use_post_ffw_norm": arch.use_post_ffw_norm,
        "use_post_attention_norm": arch.use_post_attention_norm,
        "attention_logit_soft_cap": arch.attn_logit_softcap, "final_logit_soft_cap": arch.final_logit_softcap,
        "use_sliding_window_attention": sliding, "layer_norm_epsilon": arch.rms_norm_eps, "dropout": 0,
    }
    if sliding:
        config["sliding_window_size"] = arch.sliding_window
    fold = math.sqrt(arch.head_dim / (arch.query_pre_attn_scalar or arch.head_dim))
    if not gemma3:
        config["intermediate_dim"] = 2 * arch.intermediate_size
        if vision is None:
            return GEMMA_BACKBONE, config, fold
        config.update(image_size=vision.image_size, vit_patch_size=vision.patch_size, vit_num_heads=vision.num_heads,
                      vit_hidden_dim=vision.hidden_size, vit_num_layers=vision.num_layers,
                      vit_intermediate_dim=vision.intermediate_size, vit_pooling=None,
                      vit_classifier_activation=None)
        return PALIGEMMA_BACKBONE, config, fold
    encoder = None
    if vision is not None:
        encoder = {"class_name": GEMMA3_VISION_ENCODER, "config": dict(
            image_size=vision.image_size, patch_size=vision.patch_size, num_heads=vision.num_heads,
            hidden_dim=vision.hidden_size, num_layers=vision.num_layers, intermediate_dim=vision.intermediate_size,
            output_dim=arch.hidden_size, pool_size=vision.pool_size, layer_norm_epsilon=vision.layer_norm_eps)}
    config.update(intermediate_dim=arch.intermediate_size, image_size=vision.image_size if vision else None,
                  use_query_key_norm=arch.use_qk_norm, local_rope_scaling_factor=1.0,
                  global_rope_scaling_factor=arch.rope_scaling_factor, vision_encoder=encoder)
    return GEMMA3_BACKBONE, config, fold


# --------------------------------------------------------------------------------------------- import


def load_keras_hub_preset(path, dtype: str = "float32", text_only: bool = False):
    """(GemmaCausalLM, GemmaTokenizer or None) from a local keras-hub preset directory.

    `dtype` is our model's Keras dtype policy; the keras-hub backbone is read with its variable dtype.
    The tokenizer is `assets/tokenizer/vocabulary.spm` when the preset has one. A PaliGemma preset, or a
    Gemma 3 preset with a vision encoder, gives a vision model (`model.vision`); `text_only=True` reads its
    decoder alone and leaves the vision variables unused.
    """
    import keras
    import keras_hub

    from gemma_tune.models import build_model, get_variable
    from gemma_tune.tokenizer import KERAS_HUB_FILE, GemmaTokenizer

    path = Path(str(path))
    where = str(path)
    arch = read_keras_hub_architecture(path)
    if text_only:
        arch = arch.model_copy(update={"vision": None})
    variable_dtype = keras.DTypePolicy(dtype).variable_dtype
    try:
        backbone = keras_hub.models.Backbone.from_preset(str(path), dtype=variable_dtype)
    except Exception as e:  # missing/corrupt weight files surface as many exception types
        raise CheckpointError(f"keras-hub could not load this preset ({type(e).__name__}: {e})",
                              where=where) from e
    aside = set()
    if text_only:
        for tower in (getattr(backbone, "vision_encoder", None), getattr(backbone, "vit_encoder", None)):
            if tower is not None:
                aside |= {v.path for v in tower.weights}
    theirs = {v.path: v for v in backbone.weights if v.path not in aside}
    model = build_model(arch, dtype=dtype, random_init=False)
    used = set()
    for ours_path, their_path, layout in tensors(arch):
        if their_path not in theirs:
            raise CheckpointError(f"the preset has no variable {their_path!r} (for {ours_path})", where=where)
        value = to_ours(keras.ops.convert_to_numpy(theirs[their_path]), layout)
        target = get_variable(model, ours_path)
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"{their_path} has shape {tuple(value.shape)} in our layout; {ours_path} "
                                  f"expects {tuple(target.shape)}", where=where)
        target.assign(keras.ops.cast(value, target.dtype))
        used.add(their_path)
    unused = sorted(set(theirs) - used)
    if unused:
        raise CheckpointError(f"{len(unused)} preset variables have no place in the model: "
                              f"{', '.join(unused[:8])}{' …' if len(unused) > 8 else ''}", where=where)
    del backbone, theirs
    spm = path / KERAS_HUB_FILE
    return model, (GemmaTokenizer(spm) if spm.is_file() else None)


# --------------------------------------------------------------------------------------------- export


def _our_arrays(model) -> dict[str, np.ndarray]:
    """Every weight of `model` as float32 NumPy in our layout; projections dequantised and LoRA-merged
    (`float_weight`)."""
    from gemma_tune.models import float_weight

    return {ours_path: float_weight(model, ours_path) for ours_path, _, _ in tensors(model.architecture)}


def _fold_query_scale(arrays: dict[str, np.ndarray], arch: Architecture, fold: float) -> None:
    """Multiply every query by `fold`: the q kernel, or (1 + w) of the query norm that follows it."""
    if fold == 1.0:
        return
    for i in range(arch.num_layers):
        if arch.use_qk_norm:
            key = f"blocks.{i}.attention.q_norm.scale"
            arrays[key] = ((1.0 + arrays[key].astype(np.float64)) * fold - 1.0).astype(np.float32)
        else:
            key = f"blocks.{i}.attention.q_proj.kernel"
            arrays[key] = (arrays[key].astype(np.float64) * fold).astype(np.float32)


def has_lora(model) -> bool:
    """Whether any projection of `model` has LoRA enabled."""
    from gemma_tune.models import lora_projections

    return any(True for _ in lora_projections(model))


def _has_gemma3_vision_tokens(tokenizer) -> bool:
    unknown = tokenizer.token_to_id("<unk>")
    return all(tokenizer.token_to_id(piece) != unknown for piece in GEMMA3_VISION_TOKENS)


def _keras_hub_tokenizer(class_name: str, tokenizer):
    """keras-hub's tokenizer for our SentencePiece file; Gemma 3's vision tokens only when all exist."""
    import keras_hub

    proto = str(tokenizer.model_path)
    if class_name == GEMMA_BACKBONE:
        return keras_hub.models.GemmaTokenizer(proto=proto)
    if class_name == PALIGEMMA_BACKBONE:
        return keras_hub.models.PaliGemmaTokenizer(proto=proto)
    return keras_hub.models.Gemma3Tokenizer(proto=proto, has_vision_tokens=_has_gemma3_vision_tokens(tokenizer))


def _keras_hub_task(class_name: str, config: dict, dtype: str, arch: Architecture, kh_tokenizer):
    """The keras-hub CausalLM (backbone with random weights, preprocessor) for `config`."""
    import keras_hub

    models = keras_hub.models
    vision = arch.vision
    if class_name == GEMMA_BACKBONE:
        backbone = models.GemmaBackbone(**config, dtype=dtype)
        return models.GemmaCausalLM(backbone=backbone,
                                    preprocessor=models.GemmaCausalLMPreprocessor(tokenizer=kh_tokenizer))
    if class_name == PALIGEMMA_BACKBONE:
        backbone = models.PaliGemmaBackbone(**config, dtype=dtype)
        converter = keras_hub.layers.PaliGemmaImageConverter(
            image_size=(vision.image_size, vision.image_size), scale=IMAGE_SCALE, offset=IMAGE_OFFSET)
        preprocessor = models.PaliGemmaCausalLMPreprocessor(tokenizer=kh_tokenizer, image_converter=converter)
        return models.PaliGemmaCausalLM(backbone=backbone, preprocessor=preprocessor)
    encoder = config["vision_encoder"]
    if encoder is not None:
        config = {**config, "vision_encoder": models.Gemma3VisionEncoder(**encoder["config"], dtype=dtype)}
    backbone = models.Gemma3Backbone(**config, dtype=dtype)
    options = {}
    if vision is not None and kh_tokenizer.has_vision_tokens:  # keras-hub's image prompts need <img> & co.
        options = dict(image_converter=keras_hub.layers.Gemma3ImageConverter(
            image_size=(vision.image_size, vision.image_size), scale=IMAGE_SCALE, offset=IMAGE_OFFSET),
            num_vision_tokens_per_image=vision.tokens_per_image,
            sequence_length=max(1024, 2 * vision.tokens_per_image + 1))
    preprocessor = models.Gemma3CausalLMPreprocessor(tokenizer=kh_tokenizer, **options)
    return models.Gemma3CausalLM(backbone=backbone, preprocessor=preprocessor)


def _record_image_token(out_dir: Path, image_token_id: int) -> None:
    """Our image token into keras-hub's metadata.json (module docstring)."""
    metadata = _read_json(out_dir / METADATA_FILE) or {}
    metadata[METADATA_KEY] = {**(metadata.get(METADATA_KEY) or {}), "image_token_id": image_token_id}
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=4))


def write_keras_hub_preset(model, tokenizer, out_dir, merge_lora: bool = True, dtype: str | None = None) -> Path:
    """Write `model` and `tokenizer` into `out_dir` as a keras-hub CausalLM preset: GemmaCausalLM (Gemma 1/2),
    Gemma3CausalLM (Gemma 3, with its vision encoder when the model has `vision`) or PaliGemmaCausalLM
    (PaliGemma 1/2), whose `from_preset(out_dir)` (or the backbone's) then gives our logits, up to the
    sliding-window differences of the module docstring.

    LoRA is merged exactly in float32, then cast to `dtype` (None: the model's variable dtype); keras-hub's
    LoRA factors each head separately ([heads, hidden, r]·[r, head_dim]) and cannot hold our adapters, so
    `merge_lora=False` on a model with LoRA is refused. The caller makes the write atomic (see
    `gemma_tune.export`).
    """
    import keras

    arch = model.architecture
    if not merge_lora and has_lora(model):
        raise CheckpointError("a keras-hub preset cannot hold unmerged LoRA adapters (keras-hub's LoRA is "
                              "per attention head); export with merge_lora=True", where=str(out_dir))
    if tokenizer.vocab_size > arch.vocab_size:
        raise CheckpointError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model only "
                              f"{arch.vocab_size} embeddings", where=str(tokenizer.model_path))
    class_name, config, fold = keras_hub_backbone_config(arch)
    dtype = dtype or model.dtype_policy.variable_dtype
    arrays = _our_arrays(model)
    _fold_query_scale(arrays, arch, fold)
    try:
        kh_tokenizer = _keras_hub_tokenizer(class_name, tokenizer)
    except ValueError as e:  # keras-hub's check for <bos>/<eos>/<pad>
        raise CheckpointError(f"keras-hub rejects this tokenizer: {e}", where=str(tokenizer.model_path)) from e
    task = _keras_hub_task(class_name, config, dtype, arch, kh_tokenizer)
    theirs = {v.path: v for v in task.backbone.weights}
    mapped = tensors(arch)
    if {p for _, p, _ in mapped} != set(theirs):
        raise RuntimeError(f"the name maps are out of step with keras-hub's {class_name}: "
                           f"{sorted(set(theirs) ^ {p for _, p, _ in mapped})}")
    for ours_path, their_path, layout in mapped:
        variable = theirs[their_path]
        value = to_theirs(arrays[ours_path], layout, tuple(variable.shape))
        variable.assign(keras.ops.cast(value, variable.dtype))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task.save_to_preset(str(out_dir))
    if arch.vision is not None:
        _record_image_token(out_dir, arch.vision.image_token_id)
    return out_dir
