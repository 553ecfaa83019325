"""Hugging Face `config.json` <-> `Architecture` for Gemma 1 (`gemma`), Gemma 2 (`gemma2`), Gemma 3 text
(`gemma3_text`) and the vision-language models PaliGemma 1/2 (`paligemma`: a `gemma` or `gemma2`
`text_config` and a SigLIP `vision_config`) and Gemma 3 multimodal (`gemma3`: `text_config` and
`vision_config`).

Reading follows transformers (5.x) exactly, including its defaults for keys a config leaves out
(hub configs of Gemma 3 multimodal models list only a few text fields) and both spellings of RoPE:
  * transformers 5: `rope_parameters` — Gemma 1/2 one dict `{rope_type, rope_theta, factor?}`,
    Gemma 3 one per layer type `{"full_attention": {...}, "sliding_attention": {...}}`;
  * transformers 4: `rope_theta`, `rope_scaling = {rope_type|type, factor}` (global layers) and, for
    Gemma 3, `rope_local_base_freq` (sliding layers).
Only `default` and `linear` RoPE exist in Gemma. The layer pattern comes from `layer_types` when given
(transformers 5), else from `sliding_window_pattern` (Gemma 3, default 6; Gemma 2 always 2); layer i is
sliding iff (i + 1) % pattern != 0. Anything transformers would compute differently from gemma_tune's
decoder (untied embeddings, attention bias, another activation, bidirectional attention, a layer order
that no pattern gives) is a CheckpointError rather than a silently different model.

Writing gives a config that transformers 5 reads to the same model and that older readers (transformers
4, vLLM, conversion scripts) understand: both `layer_types` and `sliding_window_pattern` (Gemma 3), and
both `rope_parameters` and the legacy `rope_theta` / `rope_scaling` / `rope_local_base_freq`.

Vision-language models (`architecture_from_hf` gives the decoder and its `VisionArchitecture`): an absent
sub-config is transformers' default one (PaliGemma's: So400m/14 at 224 px with MLP 4096 and a Gemma 2B
text model; Gemma 3's text: `Gemma3TextConfig()`), a given one is completed with its class's defaults
(`SiglipVisionConfig`: width 768, 12 layers, patch 16, 224 px; `GemmaConfig` / `Gemma2Config`), as
transformers 5.24 does. tokens_per_image is (image_size / patch_size)² for PaliGemma and
`mm_tokens_per_image` (256) for Gemma 3; image_token_id is `image_token_index` (PaliGemma 256000,
Gemma 3 262144 when absent). A `gemma3` config without `vision_config` is read as its text decoder alone (its
vision tensors, if any, are left aside). PaliGemma's `text_config.use_bidirectional_attention: true` is
transformers' flag for its prefix-LM and accepted there. Writing a vision model gives the hub's layout:
`architectures` [PaliGemmaForConditionalGeneration | Gemma3ForConditionalGeneration], `text_config` (as the
text model's config, plus PaliGemma's `num_image_tokens` and `use_bidirectional_attention: true`),
`vision_config` (`siglip_vision_model`, `vision_use_head: false`), `image_token_index`, and PaliGemma's
`projection_dim` / Gemma 3's `mm_tokens_per_image`, `boi_token_index`, `eoi_token_index`.

A reward model is transformers' `*ForSequenceClassification` of the same decoder (`SEQUENCE_CLASSIFIERS`)
with one label: `architectures` names it and `num_labels`, `id2label`, `label2id` say one label; reading,
`is_sequence_classifier` tells it from a causal LM by its `architectures`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from gemma_tune.errors import CheckpointError
from gemma_tune.models.config import Architecture

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3", "paligemma")
MULTIMODAL_TYPES = ("gemma3", "paligemma")
MULTIMODAL_ARCHITECTURES = {"paligemma": "PaliGemmaForConditionalGeneration",
                            "gemma3": "Gemma3ForConditionalGeneration"}
ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
# transformers' sequence classifiers of the text decoders: a reward model (one label) is one of them
SEQUENCE_CLASSIFIERS = {"gemma": "GemmaForSequenceClassification", "gemma2": "Gemma2ForSequenceClassification",
                        "gemma3": "Gemma3TextForSequenceClassification"}
CLASSIFIER_SUFFIX = "ForSequenceClassification"
HF_MODEL_TYPE = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}
ROPE_TYPES = ("default", "linear")
SLIDING, FULL = "sliding_attention", "full_attention"
TANH_GELU = "gelu_pytorch_tanh"

# transformers 5.24's defaults for keys a config.json may leave out (configuration_gemma*.py).
_COMMON_DEFAULTS = dict(num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
                        tie_word_embeddings=True, attention_bias=False, hidden_size=2304,
                        intermediate_size=9216, num_hidden_layers=26)
DEFAULTS = {
    "gemma": dict(_COMMON_DEFAULTS, vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                  max_position_embeddings=8192, rope_theta=10_000.0),
    "gemma2": dict(_COMMON_DEFAULTS, vocab_size=256000, max_position_embeddings=8192, rope_theta=10_000.0,
                   query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=2,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(_COMMON_DEFAULTS, vocab_size=262_208, max_position_embeddings=131_072,
                        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, query_pre_attn_scalar=256,
                        sliding_window=4096, sliding_window_pattern=6, final_logit_softcapping=None,
                        attn_logit_softcapping=None),
}
FAMILY = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}

SIGLIP = "siglip_vision_model"
# SiglipVisionConfig's defaults (configuration_siglip.py), for keys a given vision_config leaves out
SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_channels=3, image_size=224, patch_size=16, hidden_act=TANH_GELU, layer_norm_eps=1e-6)
# PaliGemmaConfig's sub-configs when config.json has none (configuration_paligemma.py, sub_configs_defaults)
PALIGEMMA_VISION = dict(SIGLIP_DEFAULTS, intermediate_size=4096, hidden_size=1152, patch_size=14, image_size=224,
                        num_hidden_layers=27, num_attention_heads=16, vision_use_head=False)
PALIGEMMA_TEXT = dict(model_type="gemma", hidden_size=2048, num_hidden_layers=18, intermediate_size=16384,
                      num_attention_heads=8, num_key_value_heads=1, vocab_size=257152)
# PaliGemmaConfig / Gemma3Config top-level defaults
MULTIMODAL_DEFAULTS = {"paligemma": dict(image_token_index=256000, projection_dim=2048),
                       "gemma3": dict(image_token_index=262_144, mm_tokens_per_image=256, boi_token_index=255_999,
                                      eoi_token_index=256_000)}


def read_config_file(path: str | Path) -> dict:
    """The parsed JSON object of `path`; CheckpointError when missing or not a JSON object."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError("no config.json: expected a Hugging Face checkpoint directory", where=str(path)) from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"not a readable JSON file ({e})", where=str(path)) from e
    if not isinstance(config, dict):
        raise CheckpointError("expected a JSON object", where=str(path))
    return config


def _rope(spec: dict | None, where: str, key: str) -> tuple[float | None, float]:
    """(theta or None, linear factor) of one RoPE dict."""
    if spec is None:
        return None, 1.0
    if not isinstance(spec, dict):
        raise CheckpointError(f"{key} must be an object, got {spec!r}", where=where)
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise CheckpointError(f"{key}: rope_type {kind!r} is not used by Gemma; expected one of {ROPE_TYPES}",
                              where=where)
    factor = float(spec.get("factor", 1.0)) if kind == "linear" else 1.0
    theta = spec.get("rope_theta")
    return (float(theta) if theta is not None else None), factor


def _rope_fields(config: dict, family: str, where: str) -> dict:
    """rope_theta, rope_local_theta and rope_scaling_factor of an HF config: `rope_parameters` when
    present (transformers 5), else the legacy keys."""
    defaults = DEFAULTS[config["model_type"]]
    params = config.get("rope_parameters")
    local_theta, local_factor = None, 1.0
    if params is None:
        global_theta, factor = _rope(config.get("rope_scaling"), where, "rope_scaling")
    elif family == "gemma3" and isinstance(params, dict) and (FULL in params or SLIDING in params):
        global_theta, factor = _rope(params.get(FULL), where, f"rope_parameters.{FULL}")
        local_theta, local_factor = _rope(params.get(SLIDING), where, f"rope_parameters.{SLIDING}")
    else:
        global_theta, factor = _rope(params, where, "rope_parameters")
    if local_factor != 1.0:
        raise CheckpointError("RoPE scaling on sliding-window layers is not supported (Gemma 3 scales only "
                              f"{FULL} layers)", where=f"{where}: rope_parameters.{SLIDING}")
    theta = global_theta or config.get("rope_theta") or defaults["rope_theta"]
    fields = {"rope_theta": float(theta), "rope_scaling_factor": float(factor)}
    if family == "gemma3":
        local = local_theta or config.get("rope_local_base_freq") or defaults["rope_local_base_freq"]
        fields["rope_local_theta"] = float(local)
    return fields


def _layer_pattern(config: dict, num_layers: int, where: str) -> int | None:
    """`sliding_window_pattern` giving `layer_types` (None: every layer global, Gemma 1)."""
    model_type = config["model_type"]
    if model_type == "gemma":
        if config.get("layer_types") and any(t != FULL for t in config["layer_types"]):
            raise CheckpointError("Gemma 1 has only full-attention layers", where=f"{where}: layer_types")
        return None
    stated = config.get("sliding_window_pattern") or config.get("_sliding_window_pattern")
    pattern = int(stated) if model_type == "gemma3_text" and stated else DEFAULTS[model_type]["sliding_window_pattern"]
    types = config.get("layer_types")
    if types is None:
        return pattern
    if len(types) != num_layers or any(t not in (SLIDING, FULL) for t in types):
        raise CheckpointError(f"layer_types must list {num_layers} entries of {SLIDING!r} / {FULL!r}",
                              where=f"{where}: layer_types")

    def gives(p: int) -> bool:
        return all((t == SLIDING) == bool((i + 1) % p) for i, t in enumerate(types))

    for candidate in (pattern, *range(1, num_layers + 2)):
        if gives(candidate):
            return candidate
    raise CheckpointError("this order of sliding and full layers is not 'every p-th layer global'; "
                          "gemma_tune's decoder cannot express it", where=f"{where}: layer_types")


def _check_supported(config: dict, where: str, prefix_lm: bool = False) -> None:
    """`prefix_lm`: PaliGemma's text config, whose use_bidirectional_attention means its prefix-LM."""
    model_type = config["model_type"]
    if not config.get("tie_word_embeddings", True):
        raise CheckpointError("tie_word_embeddings is false; Gemma ties its output projection to the "
                              "embedding", where=where)
    if config.get("attention_bias"):
        raise CheckpointError("attention_bias is true; Gemma projections have no bias", where=where)
    if config.get("use_bidirectional_attention") and not prefix_lm:
        raise CheckpointError("use_bidirectional_attention is true (an encoder such as EmbeddingGemma); "
                              "expected a causal language model", where=where)
    act_key = "hidden_act" if model_type == "gemma" else "hidden_activation"
    activation = config.get(act_key) or config.get("hidden_activation") or TANH_GELU
    allowed = (TANH_GELU, "gelu") if model_type == "gemma" else (TANH_GELU,)  # transformers maps Gemma 1 "gelu"
    if activation not in allowed:
        raise CheckpointError(f"{act_key} {activation!r}: Gemma's MLP uses {TANH_GELU}", where=where)


def is_multimodal(config: dict) -> bool:
    """Whether an HF config is a vision-language model's (`paligemma`, `gemma3`): its tensors are laid out by part."""
    return config.get("model_type") in MULTIMODAL_TYPES


def _sub_config(config: dict, key: str, where: str) -> dict | None:
    value = config.get(key)
    if value is not None and not isinstance(value, dict):
        raise CheckpointError(f"{key} must be an object, got {value!r}", where=where)
    return None if value is None else dict(value)


def architecture_from_hf(config: dict, where: str = "config.json") -> Architecture:
    """The `Architecture` of a parsed HF config: a Gemma decoder, or a PaliGemma / Gemma 3 vision-language
    model (decoder and `vision`; a `gemma3` config without `vision_config`: its text decoder)."""
    model_type = config.get("model_type")
    if model_type not in MULTIMODAL_TYPES:
        fields = _decoder_fields(config, where)
        return _architecture(fields, where)
    if not config.get("tie_word_embeddings", True):
        raise CheckpointError("tie_word_embeddings is false; Gemma ties its output projection to the embedding",
                              where=where)
    text_where = f"{where}: text_config"
    text = _sub_config(config, "text_config", where)
    vision = _sub_config(config, "vision_config", where)
    if model_type == "gemma3":
        text = dict(text or {}, model_type="gemma3_text")  # Gemma3Config's text_config is always Gemma3TextConfig
        fields = _decoder_fields(text, text_where)
        if vision is None:
            return _architecture(fields, where)
    else:
        text = dict(PALIGEMMA_TEXT) if text is None else {"model_type": "gemma", **text}
        if text["model_type"] not in ("gemma", "gemma2"):
            raise CheckpointError(f"model_type {text['model_type']!r}: PaliGemma's text model is gemma or gemma2",
                                  where=f"{text_where}: model_type")
        fields = _decoder_fields(text, text_where, prefix_lm=True)
        vision = dict(PALIGEMMA_VISION) if vision is None else vision
    fields["vision"] = _vision_fields(config, vision, fields["hidden_size"], where)
    return _architecture(fields, where)


def _architecture(fields: dict, where: str) -> Architecture:
    try:
        return Architecture(**fields)
    except ValidationError as e:
        raise CheckpointError(f"does not describe a valid Gemma architecture: {e}", where=where) from e


def _vision_fields(config: dict, vision: dict, text_hidden: int, where: str) -> dict:
    """The `VisionArchitecture` fields of a multimodal config (`vision`: its vision_config, not yet defaulted)."""
    model_type = config["model_type"]
    top = {**MULTIMODAL_DEFAULTS[model_type], **config}
    vision_where = f"{where}: vision_config"
    if vision.get("model_type", SIGLIP) != SIGLIP:
        raise CheckpointError(f"model_type {vision['model_type']!r}: the vision tower is SigLIP ({SIGLIP!r})",
                              where=f"{vision_where}: model_type")

    def get(key):
        return vision.get(key, SIGLIP_DEFAULTS[key])

    if get("hidden_act") != TANH_GELU:
        raise CheckpointError(f"hidden_act {get('hidden_act')!r}: SigLIP's MLP uses {TANH_GELU}", where=vision_where)
    if get("num_channels") != 3:
        raise CheckpointError(f"num_channels {get('num_channels')}: the vision tower reads RGB images (3)",
                              where=vision_where)
    sizes = {}
    for key in ("image_size", "patch_size"):
        value = get(key)
        if isinstance(value, (list, tuple)):
            if len(value) != 2 or value[0] != value[1]:
                raise CheckpointError(f"{key} {value!r}: expected a square size", where=vision_where)
            value = value[0]
        sizes[key] = value
    if model_type == "paligemma":
        if top["projection_dim"] != text_hidden:
            raise CheckpointError(f"projection_dim {top['projection_dim']} differs from the text model's hidden_size "
                                  f"{text_hidden}: PaliGemma projects images to the text width", where=where)
        patches = sizes["image_size"] // sizes["patch_size"] if sizes["patch_size"] else 0
        tokens = patches ** 2
    else:
        tokens = top["mm_tokens_per_image"]
    return dict(image_size=sizes["image_size"], patch_size=sizes["patch_size"], num_layers=get("num_hidden_layers"),
                hidden_size=get("hidden_size"), num_heads=get("num_attention_heads"),
                intermediate_size=get("intermediate_size"), layer_norm_eps=get("layer_norm_eps"),
                tokens_per_image=tokens, image_token_id=top.get("image_token_id", top["image_token_index"]))


def _decoder_fields(config: dict, where: str, prefix_lm: bool = False) -> dict:
    """The decoder fields of a text model's config (model_type gemma, gemma2 or gemma3_text)."""
    model_type = config.get("model_type")
    if model_type not in DEFAULTS:
        raise CheckpointError(f"model_type {model_type!r} is not a Gemma decoder; expected one of {MODEL_TYPES}",
                              where=where)
    _check_supported(config, where, prefix_lm)
    defaults = DEFAULTS[model_type]

    def get(key):
        return config.get(key, defaults.get(key))

    family = FAMILY[model_type]
    num_layers = int(get("num_hidden_layers"))
    fields = dict(
        family=family, vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
        intermediate_size=get("intermediate_size"), num_layers=num_layers,
        num_heads=get("num_attention_heads"), num_kv_heads=get("num_key_value_heads"), head_dim=get("head_dim"),
        rms_norm_eps=get("rms_norm_eps"), max_position_embeddings=get("max_position_embeddings"),
        **_rope_fields(config, family, where))
    if family != "gemma":
        fields.update(query_pre_attn_scalar=get("query_pre_attn_scalar"),
                      attn_logit_softcap=get("attn_logit_softcapping"),
                      final_logit_softcap=get("final_logit_softcapping"),
                      use_post_attention_norm=True, use_post_ffw_norm=True, use_qk_norm=family == "gemma3")
        window = get("sliding_window")
        if window is not None:
            fields.update(sliding_window=window, sliding_window_pattern=_layer_pattern(config, num_layers, where))
    else:
        _layer_pattern(config, num_layers, where)
    return fields


def read_hf_architecture(checkpoint_dir: str | Path) -> Architecture:
    """The `Architecture` in `checkpoint_dir/config.json`."""
    path = Path(checkpoint_dir) / "config.json"
    return architecture_from_hf(read_config_file(path), where=str(path))


def is_sequence_classifier(config: dict, where: str = "config.json") -> bool:
    """Whether an HF config is a `*ForSequenceClassification` (its `architectures`); one with other than a
    single label (`num_labels`, else `id2label`'s size, else transformers' default of 2) is a CheckpointError:
    a reward model scores a sequence with one number."""
    if not any(str(name).endswith(CLASSIFIER_SUFFIX) for name in config.get("architectures") or ()):
        return False
    labels = config.get("num_labels", len(config.get("id2label") or {}) or 2)
    if labels != 1:
        raise CheckpointError(f"a sequence classifier with {labels} labels; expected a reward model (num_labels: 1, "
                              "one score per sequence)", where=where)
    return True


def _layer_types(arch: Architecture) -> list[str]:
    return [SLIDING if arch.is_sliding(i) else FULL for i in range(arch.num_layers)]


def _check_expressible(arch: Architecture) -> None:
    """Raise CheckpointError when transformers' class for `arch.family` cannot compute `arch`."""
    problems = []
    post_norms = arch.use_post_attention_norm and arch.use_post_ffw_norm
    if arch.family == "gemma":
        if arch.use_post_attention_norm or arch.use_post_ffw_norm or arch.use_qk_norm:
            problems.append("Gemma 1 has no post-attention/post-FFN norms or QK-norm")
        if arch.attn_logit_softcap or arch.final_logit_softcap:
            problems.append("Gemma 1 has no soft-capping")
        if arch.query_pre_attn_scalar not in (None, arch.head_dim):
            problems.append("Gemma 1 scales queries by 1/sqrt(head_dim)")
        if any(arch.is_sliding(i) for i in range(arch.num_layers)):
            problems.append("Gemma 1 has no sliding-window layers")
    elif not post_norms or arch.use_qk_norm != (arch.family == "gemma3"):
        problems.append(f"{arch.family} has post-attention and post-FFN norms"
                        + (" and QK-norm" if arch.family == "gemma3" else " and no QK-norm"))
    if arch.query_pre_attn_scalar is not None and not float(arch.query_pre_attn_scalar).is_integer():
        problems.append("transformers' query_pre_attn_scalar is an integer")
    if arch.family != "gemma3":
        local = arch.rope_local_theta not in (None, arch.rope_theta)
        sliding = any(arch.is_sliding(i) for i in range(arch.num_layers))
        if local or (sliding and arch.rope_scaling_factor != 1.0):
            problems.append(f"transformers' {arch.family} uses one RoPE for every layer")
    if problems:
        raise CheckpointError("this architecture cannot be written as a transformers checkpoint: "
                              + "; ".join(problems), where=f"family {arch.family}")


def _rope_dict(theta: float, factor: float) -> dict:
    if factor == 1.0:
        return {"rope_type": "default", "rope_theta": theta}
    return {"rope_type": "linear", "factor": factor, "rope_theta": theta}


def hf_config(arch: Architecture, *, bos_id: int = 2, eos_id: int = 1, pad_id: int = 0,
              dtype: str = "float32", sequence_classifier: bool = False, boi_id: int | None = None,
              eoi_id: int | None = None) -> dict:
    """config.json contents for `arch` (see the module docstring); `dtype` is the tensors' dtype.
    `sequence_classifier`: a reward model, transformers' `*ForSequenceClassification` with one label
    (`pad_token_id` is how it finds each sequence's last real token). A vision model's config is its
    `*ForConditionalGeneration`'s; `boi_id` / `eoi_id` are Gemma 3's `<start_of_image>` / `<end_of_image>` ids
    (None: transformers' defaults)."""
    if arch.vision is not None:
        if sequence_classifier:
            raise CheckpointError("a reward model with a vision tower cannot be written as a transformers "
                                  "checkpoint", where=f"family {arch.family}")
        return _multimodal_config(arch, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, dtype=dtype, boi_id=boi_id,
                                  eoi_id=eoi_id)
    _check_expressible(arch)
    config = {
        "architectures": [(SEQUENCE_CLASSIFIERS if sequence_classifier else ARCHITECTURES)[arch.family]],
        "model_type": HF_MODEL_TYPE[arch.family],
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "hidden_act" if arch.family == "gemma" else "hidden_activation": TANH_GELU,
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.rms_norm_eps,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "dtype": dtype,
        "torch_dtype": dtype,
        "rope_theta": arch.rope_theta,
    }
    if arch.rope_scaling_factor != 1.0:
        config["rope_scaling"] = {"rope_type": "linear", "factor": arch.rope_scaling_factor}
    if arch.family == "gemma3":
        local_theta = arch.rope_local_theta or arch.rope_theta
        config["rope_local_base_freq"] = local_theta
        config["rope_parameters"] = {FULL: _rope_dict(arch.rope_theta, arch.rope_scaling_factor),
                                     SLIDING: _rope_dict(local_theta, 1.0)}
    else:
        config["rope_parameters"] = _rope_dict(arch.rope_theta, arch.rope_scaling_factor)
    if arch.family != "gemma":
        config.update({
            "query_pre_attn_scalar": int(arch.query_pre_attn_scalar or arch.head_dim),
            "attn_logit_softcapping": arch.attn_logit_softcap,
            "final_logit_softcapping": arch.final_logit_softcap,
            "sliding_window": arch.sliding_window,
            "layer_types": _layer_types(arch),
            "use_bidirectional_attention": False,
        })
        if arch.family == "gemma3":
            config["sliding_window_pattern"] = arch.sliding_window_pattern if arch.sliding_window else 1
    if sequence_classifier:
        config.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return config


def _multimodal_config(arch: Architecture, *, bos_id: int, eos_id: int, pad_id: int, dtype: str,
                       boi_id: int | None, eoi_id: int | None) -> dict:
    """config.json of a PaliGemma / Gemma 3 vision-language model, in the hub's layout (module docstring)."""
    vision = arch.vision
    model_type = "gemma3" if arch.family == "gemma3" else "paligemma"
    text = hf_config(arch.model_copy(update={"vision": None}), bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                     dtype=dtype)
    del text["architectures"]
    vision_config = {
        "model_type": SIGLIP, "hidden_size": vision.hidden_size, "intermediate_size": vision.intermediate_size,
        "num_hidden_layers": vision.num_layers, "num_attention_heads": vision.num_heads, "num_channels": 3,
        "image_size": vision.image_size, "patch_size": vision.patch_size, "hidden_act": TANH_GELU,
        "layer_norm_eps": vision.layer_norm_eps, "attention_dropout": 0.0, "vision_use_head": False,
        "dtype": dtype, "torch_dtype": dtype,
    }
    config = {"architectures": [MULTIMODAL_ARCHITECTURES[model_type]], "model_type": model_type,
              "image_token_index": vision.image_token_id}
    if model_type == "paligemma":
        text.update(num_image_tokens=vision.tokens_per_image, use_bidirectional_attention=True)
        vision_config.update(projection_dim=arch.hidden_size, num_image_tokens=vision.tokens_per_image)
        config.update(hidden_size=arch.hidden_size, projection_dim=arch.hidden_size, vocab_size=arch.vocab_size)
    else:
        defaults = MULTIMODAL_DEFAULTS["gemma3"]
        config.update(mm_tokens_per_image=vision.tokens_per_image,
                      boi_token_index=defaults["boi_token_index"] if boi_id is None else boi_id,
                      eoi_token_index=defaults["eoi_token_index"] if eoi_id is None else eoi_id,
                      initializer_range=0.02)
    config.update(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, tie_word_embeddings=True,
                  text_config=text, vision_config=vision_config, dtype=dtype, torch_dtype=dtype)
    return config
