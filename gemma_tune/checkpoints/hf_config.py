"""Hugging Face `config.json` <-> `Architecture` for Gemma 1 (`gemma`), Gemma 2 (`gemma2`) and Gemma 3
text (`gemma3_text`, and the `text_config` of multimodal `gemma3` configs).

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

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
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


def _check_supported(config: dict, where: str) -> None:
    model_type = config["model_type"]
    if not config.get("tie_word_embeddings", True):
        raise CheckpointError("tie_word_embeddings is false; Gemma ties its output projection to the "
                              "embedding", where=where)
    if config.get("attention_bias"):
        raise CheckpointError("attention_bias is true; Gemma projections have no bias", where=where)
    if config.get("use_bidirectional_attention"):
        raise CheckpointError("use_bidirectional_attention is true (an encoder such as EmbeddingGemma); "
                              "expected a causal language model", where=where)
    act_key = "hidden_act" if model_type == "gemma" else "hidden_activation"
    activation = config.get(act_key) or config.get("hidden_activation") or TANH_GELU
    allowed = (TANH_GELU, "gelu") if model_type == "gemma" else (TANH_GELU,)  # transformers maps Gemma 1 "gelu"
    if activation not in allowed:
        raise CheckpointError(f"{act_key} {activation!r}: Gemma's MLP uses {TANH_GELU}", where=where)


def architecture_from_hf(config: dict, where: str = "config.json") -> Architecture:
    """The `Architecture` of a parsed HF Gemma config (a multimodal `gemma3` one: of its text decoder)."""
    if config.get("model_type") == "gemma3":
        config = dict(config.get("text_config") or {})
        config.setdefault("model_type", "gemma3_text")
        where = f"{where}: text_config"
    model_type = config.get("model_type")
    if model_type not in DEFAULTS:
        raise CheckpointError(f"model_type {model_type!r} is not a Gemma decoder; expected one of {MODEL_TYPES}",
                              where=where)
    _check_supported(config, where)
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
    try:
        return Architecture(**fields)
    except ValidationError as e:
        raise CheckpointError(f"does not describe a valid Gemma architecture: {e}", where=where) from e


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
              dtype: str = "float32", sequence_classifier: bool = False) -> dict:
    """config.json contents for `arch` (see the module docstring); `dtype` is the tensors' dtype.
    `sequence_classifier`: a reward model, transformers' `*ForSequenceClassification` with one label
    (`pad_token_id` is how it finds each sequence's last real token)."""
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
