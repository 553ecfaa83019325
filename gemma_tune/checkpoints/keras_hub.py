"""keras-hub presets <-> gemma_tune models: GemmaBackbone (Gemma 1 and 2) and Gemma3Backbone (text).

A keras-hub preset directory holds `config.json` (the backbone's `class_name` and constructor `config`),
`model.weights.h5` (or sharded weights) and `assets/tokenizer/vocabulary.spm`; `save_to_preset` of a
CausalLM adds `task.json`, `preprocessor.json`, `tokenizer.json` and `metadata.json`.

Configuration (keras-hub 0.32 constructor arguments -> `Architecture`):

    GemmaBackbone    family "gemma2" when it has post norms, soft-caps or sliding windows, else "gemma";
                     intermediate_size = intermediate_dim / 2 (keras-hub's `intermediate_dim` counts both
                     GeGLU halves); sliding layers i % 2 == 0; RoPE θ = 10 000 on every layer.
    Gemma3Backbone   family "gemma3"; intermediate_size = intermediate_dim; sliding layers i % 6 < 5;
                     RoPE θ = 10 000 on sliding layers, 1 000 000 (scaled by global_rope_scaling_factor) on
                     global ones; max_position_embeddings = 32 768 · global_rope_scaling_factor (1B: 32k,
                     4B and larger: 128k). A vision encoder is left aside (import reads the text decoder,
                     export writes text presets: our model holds no vision tower).
    query scale      query_head_dim_normalize=True -> 1/√head_dim; False -> 1/√(hidden_dim / num_heads), the
                     models' real scale (Gemma 2 27B: 144, Gemma 3 27B: 168). keras-hub 0.32 itself always
                     computes 1/√head_dim (its decoder blocks pass `query_head_dim_normalize=True` down), so
                     for those presets our logits follow transformers, not keras-hub.

Weights: `NAME_MAP` pairs each weight path of `GemmaCausalLM` (docs/CONTRACTS.md, "Weight layout") with its
keras-hub variable path and layout. keras-hub keeps attention kernels per head as einsum kernels:

    query/key/value  [heads, hidden, head_dim]   ours [hidden, heads·head_dim]   ("heads_in")
    attention_output [heads, head_dim, hidden]   ours [heads·head_dim, hidden]   ("heads_out")

The same table imports (`load_keras_hub_preset`) and exports (`write_keras_hub_preset`). Import builds the
keras-hub backbone with `Backbone.from_preset` and copies every variable by path; a variable left over,
missing or of the wrong shape is a CheckpointError.

Export writes a keras-hub CausalLM (backbone + tokenizer + preprocessor) with `save_to_preset`. LoRA is
merged in float32 (`float_kernel`) and the result cast to the export dtype; a quantised base is
dequantised. Where keras-hub cannot express a model exactly the export refuses with a CheckpointError,
except for the query scale: when query_pre_attn_scalar ≠ head_dim the factor √(head_dim / scalar) is folded
into the query (the q kernel, or the query-norm scale (1 + w) where QK-norm follows it) and the preset says
`query_head_dim_normalize=True`, so keras-hub's 1/√head_dim gives the model's logits.
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
GEMMA_BACKBONE = "GemmaBackbone"
GEMMA3_BACKBONE = "Gemma3Backbone"
# keras-hub constants the presets cannot change (keras-hub 0.32 sources, see the module docstring).
KERAS_HUB_EPSILON = 1e-6  # decoder-block norms are built without the config's layer_norm_epsilon
GEMMA_ROPE_THETA = 10_000.0
GEMMA3_LOCAL_ROPE_THETA = 10_000.0
GEMMA3_GLOBAL_ROPE_THETA = 1_000_000.0
GEMMA_SLIDING_PATTERN = 2
GEMMA3_SLIDING_PATTERN = 6
GEMMA_MAX_POSITIONS = 8192
GEMMA3_BASE_MAX_POSITIONS = 32_768
# Gemma3Tokenizer needs these pieces unless built with has_vision_tokens=False.
GEMMA3_VISION_TOKENS = ("<img>", "<start_of_image>", "<end_of_image>")


@dataclass(frozen=True)
class Tensor:
    """One weight: our path, keras-hub's variable path (`{i}`: layer index), layout, when it exists."""

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


def tensors(arch: Architecture) -> list[tuple[str, str, str]]:
    """(our path, keras-hub path, layout) of every weight of a decoder with architecture `arch`."""
    out = []
    for t in NAME_MAP:
        if not t.present(arch):
            continue
        if "{i}" in t.ours:
            out += [(t.ours.format(i=i), t.theirs.format(i=i), t.layout) for i in range(arch.num_layers)]
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


def _read_config(path: Path) -> dict | None:
    try:
        data = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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


def architecture_from_keras_hub(class_name: str, config: dict, where: str = CONFIG_FILE) -> Architecture:
    """The `Architecture` of a keras-hub GemmaBackbone / Gemma3Backbone constructor config.

    A Gemma 3 vision encoder is left aside: the architecture is the text decoder's (`vision` None).
    CheckpointError for another backbone or a configuration our decoder does not reproduce exactly
    (embedding model, bidirectional attention, local RoPE scaling, ε ≠ 1e-6).
    """
    if class_name not in (GEMMA_BACKBONE, GEMMA3_BACKBONE):
        raise CheckpointError(f"unsupported keras-hub backbone {class_name!r}; expected {GEMMA_BACKBONE} "
                              f"(Gemma 1 and 2) or {GEMMA3_BACKBONE} (Gemma 3 text)", where=where)
    try:
        return _architecture(class_name, config, where)
    except KeyError as e:
        raise CheckpointError(f"{class_name} config has no {e.args[0]!r}", where=where) from e
    except ValueError as e:  # pydantic validation of the resulting Architecture
        raise CheckpointError(f"{class_name} config does not describe a valid decoder: {e}", where=where) from e


def _architecture(class_name: str, c: dict, where: str) -> Architecture:
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
    if class_name == GEMMA_BACKBONE:
        intermediate = int(c["intermediate_dim"])
        if intermediate % 2:
            raise CheckpointError(f"intermediate_dim={intermediate} must be even (keras-hub splits it "
                                  "into the two GeGLU halves)", where=where)
        gemma2 = (sliding or common["use_post_attention_norm"] or common["use_post_ffw_norm"]
                  or common["attn_logit_softcap"] is not None or common["final_logit_softcap"] is not None)
        return Architecture(
            family="gemma2" if gemma2 else "gemma", intermediate_size=intermediate // 2,
            rope_theta=GEMMA_ROPE_THETA, sliding_window_pattern=GEMMA_SLIDING_PATTERN if sliding else None,
            max_position_embeddings=GEMMA_MAX_POSITIONS, **common)
    refused = [name for name, bad in (
        ("is_embedding_model=True", bool(c.get("is_embedding_model", False))),
        ("use_bidirectional_attention=True", bool(c.get("use_bidirectional_attention", False))),
        ("local_rope_scaling_factor≠1", float(c.get("local_rope_scaling_factor", 1.0)) != 1.0),
    ) if bad]
    if refused:
        raise CheckpointError(f"{GEMMA3_BACKBONE} with {', '.join(refused)} is not a text decoder gemma_tune "
                              "reproduces", where=where)
    factor = float(c.get("global_rope_scaling_factor", 1.0))
    return Architecture(
        family="gemma3", intermediate_size=int(c["intermediate_dim"]),
        rope_theta=GEMMA3_GLOBAL_ROPE_THETA, rope_local_theta=GEMMA3_LOCAL_ROPE_THETA,
        rope_scaling_factor=factor, sliding_window_pattern=GEMMA3_SLIDING_PATTERN if sliding else None,
        use_qk_norm=bool(c.get("use_query_key_norm", True)),
        max_position_embeddings=int(GEMMA3_BASE_MAX_POSITIONS * factor), **common)


def keras_hub_backbone_config(arch: Architecture) -> tuple[str, dict, float]:
    """(backbone class name, constructor config, query fold factor) describing `arch` in keras-hub.

    The fold factor √(head_dim / query_pre_attn_scalar) multiplies the queries (see the module docstring).
    CheckpointError naming every feature keras-hub cannot express.
    """
    gemma3 = arch.family == "gemma3"
    if arch.vision is not None and not gemma3:
        raise CheckpointError("a PaliGemma decoder is not a keras-hub GemmaBackbone (keras-hub has "
                              "PaliGemmaCausalLM for it)", where=f"architecture family {arch.family}")
    pattern = GEMMA3_SLIDING_PATTERN if gemma3 else GEMMA_SLIDING_PATTERN
    sliding = arch.sliding_window is not None
    any_local = any(arch.is_sliding(i) for i in range(arch.num_layers))
    problems = []
    if arch.rms_norm_eps != KERAS_HUB_EPSILON:
        problems.append(f"rms_norm_eps={arch.rms_norm_eps} (keras-hub: {KERAS_HUB_EPSILON})")
    if sliding and arch.sliding_window_pattern != pattern:
        problems.append(f"sliding_window_pattern={arch.sliding_window_pattern} (keras-hub: {pattern})")
    if gemma3:
        if arch.rope_theta != GEMMA3_GLOBAL_ROPE_THETA:
            problems.append(f"rope_theta={arch.rope_theta} (keras-hub: {GEMMA3_GLOBAL_ROPE_THETA:g})")
        local = arch.rope_local_theta or arch.rope_theta
        if any_local and local != GEMMA3_LOCAL_ROPE_THETA:
            problems.append(f"rope_local_theta={local} (keras-hub: {GEMMA3_LOCAL_ROPE_THETA:g})")
    else:
        thetas = {arch.rope_for_layer(i)[0] for i in range(arch.num_layers)}
        if thetas != {GEMMA_ROPE_THETA}:
            problems.append(f"RoPE θ {sorted(thetas)} (keras-hub GemmaBackbone: {GEMMA_ROPE_THETA:g})")
        if arch.rope_scaling_factor != 1.0:
            problems.append(f"rope_scaling_factor={arch.rope_scaling_factor} (GemmaBackbone has none)")
        if arch.use_qk_norm:
            problems.append("use_qk_norm (GemmaBackbone has no QK-norm)")
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
        return GEMMA_BACKBONE, {**config, "intermediate_dim": 2 * arch.intermediate_size}, fold
    config.update(intermediate_dim=arch.intermediate_size, image_size=None, use_query_key_norm=arch.use_qk_norm,
                  local_rope_scaling_factor=1.0, global_rope_scaling_factor=arch.rope_scaling_factor,
                  vision_encoder=None)
    return GEMMA3_BACKBONE, config, fold


# --------------------------------------------------------------------------------------------- import


def load_keras_hub_preset(path, dtype: str = "float32"):
    """(GemmaCausalLM, GemmaTokenizer or None) from a local keras-hub preset directory.

    `dtype` is our model's Keras dtype policy; the keras-hub backbone is read with its variable dtype.
    The tokenizer is `assets/tokenizer/vocabulary.spm` when the preset has one. A multimodal Gemma 3
    preset loads its text decoder; the vision encoder's variables are the only ones left unused.
    """
    import keras
    import keras_hub

    from gemma_tune.models import build_model, get_variable
    from gemma_tune.tokenizer import KERAS_HUB_FILE, GemmaTokenizer

    path = Path(str(path))
    where = str(path)
    if not is_keras_hub_preset(path):
        raise CheckpointError(f"not a keras-hub preset directory: expected {CONFIG_FILE} naming a keras-hub "
                              "backbone class", where=where)
    config = _read_config(path)
    arch = architecture_from_keras_hub(config["class_name"], config.get("config", {}),
                                       where=str(path / CONFIG_FILE))
    variable_dtype = keras.DTypePolicy(dtype).variable_dtype
    try:
        backbone = keras_hub.models.Backbone.from_preset(str(path), dtype=variable_dtype)
    except Exception as e:  # missing/corrupt weight files surface as many exception types
        raise CheckpointError(f"keras-hub could not load this preset ({type(e).__name__}: {e})",
                              where=where) from e
    encoder = getattr(backbone, "vision_encoder", None)
    vision = {v.path for v in encoder.weights} if encoder is not None else set()
    theirs = {v.path: v for v in backbone.weights if v.path not in vision}
    model = build_model(arch, dtype=dtype)
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


def _keras_hub_tokenizer(class_name: str, tokenizer):
    """keras-hub's tokenizer for our SentencePiece file; Gemma 3's vision tokens only when all exist."""
    import keras_hub

    proto = str(tokenizer.model_path)
    if class_name == GEMMA_BACKBONE:
        return keras_hub.models.GemmaTokenizer(proto=proto)
    unknown = tokenizer.token_to_id("<unk>")
    vision = all(tokenizer.token_to_id(piece) != unknown for piece in GEMMA3_VISION_TOKENS)
    return keras_hub.models.Gemma3Tokenizer(proto=proto, has_vision_tokens=vision)


def write_keras_hub_preset(model, tokenizer, out_dir, merge_lora: bool = True, dtype: str | None = None) -> Path:
    """Write `model` and `tokenizer` into `out_dir` as a keras-hub CausalLM preset (a text decoder: our
    model holds no vision tower, so Gemma 3 4B+ give a text preset like keras-hub's `*_text` ones).

    `keras_hub.models.GemmaCausalLM.from_preset(out_dir)` (Gemma 1/2) or `Gemma3CausalLM.from_preset`
    (Gemma 3) then gives our logits. LoRA is merged exactly in float32, then cast to `dtype` (None: the
    model's variable dtype); keras-hub's LoRA factors each head separately ([heads, hidden, r]·[r, head_dim])
    and cannot hold our adapters, so `merge_lora=False` on a model with LoRA is refused. The caller makes
    the write atomic (see `gemma_tune.export`).
    """
    import keras
    import keras_hub

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
    if class_name == GEMMA_BACKBONE:
        backbone = keras_hub.models.GemmaBackbone(**config, dtype=dtype)
        preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(tokenizer=kh_tokenizer)
        task_cls = keras_hub.models.GemmaCausalLM
    else:
        backbone = keras_hub.models.Gemma3Backbone(**config, dtype=dtype)
        preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(tokenizer=kh_tokenizer)
        task_cls = keras_hub.models.Gemma3CausalLM
    theirs = {v.path: v for v in backbone.weights}
    mapped = tensors(arch)
    if {p for _, p, _ in mapped} != set(theirs):
        raise RuntimeError(f"NAME_MAP is out of step with keras-hub's {class_name}: "
                           f"{sorted(set(theirs) ^ {p for _, p, _ in mapped})}")
    for ours_path, their_path, layout in mapped:
        variable = theirs[their_path]
        value = to_theirs(arrays[ours_path], layout, tuple(variable.shape))
        variable.assign(keras.ops.cast(value, variable.dtype))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task_cls(backbone=backbone, preprocessor=preprocessor).save_to_preset(str(out_dir))
    return out_dir
