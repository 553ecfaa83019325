"""HF config.json <-> Architecture: every preset round-trips through transformers' own config classes,
hub configs of both transformers generations read to the presets, unsupported configs are refused."""

import json

import pytest
import transformers

from gemma_tune.checkpoints.hf_config import (architecture_from_hf, hf_config, read_config_file,
                                              read_hf_architecture)
from gemma_tune.config.presets import preset_architecture, preset_names
from gemma_tune.errors import CheckpointError

HF_CLASSES = {"gemma": transformers.GemmaConfig, "gemma2": transformers.Gemma2Config,
              "gemma3_text": transformers.Gemma3TextConfig, "gemma3": transformers.Gemma3Config,
              "paligemma": transformers.PaliGemmaConfig}  # vision presets: their text_config is the decoder


def behaviour(arch):
    """What the decoder computes from an architecture (fields that mean the same compare equal)."""
    layers = range(arch.num_layers)
    sliding = [arch.is_sliding(i) for i in layers]
    return dict(
        family=arch.family, sizes=(arch.vocab_size, arch.hidden_size, arch.intermediate_size, arch.num_layers,
                                   arch.num_heads, arch.num_kv_heads, arch.head_dim),
        query_scale=arch.query_scale, eps=arch.rms_norm_eps, sliding=sliding,
        window=arch.sliding_window if any(sliding) else None, rope=[arch.rope_for_layer(i) for i in layers],
        softcaps=(arch.attn_logit_softcap, arch.final_logit_softcap),
        norms=(arch.use_post_attention_norm, arch.use_post_ffw_norm, arch.use_qk_norm),
        max_positions=arch.max_position_embeddings)


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_round_trips_through_transformers(preset):
    arch = preset_architecture(preset)
    config = hf_config(arch)
    whole = HF_CLASSES[config["model_type"]].from_dict(json.loads(json.dumps(config)))
    hf = whole.get_text_config()
    # transformers reads our file to the same decoder ...
    assert hf.num_hidden_layers == arch.num_layers and hf.head_dim == arch.head_dim
    if arch.family != "gemma":
        assert hf.layer_types == ["sliding_attention" if s else "full_attention" for s in behaviour(arch)["sliding"]]
        assert hf.query_pre_attn_scalar ** -0.5 == pytest.approx(arch.query_scale)
        assert (hf.attn_logit_softcapping, hf.final_logit_softcapping) == (arch.attn_logit_softcap,
                                                                           arch.final_logit_softcap)
    if arch.family == "gemma3":
        full, local = hf.rope_parameters["full_attention"], hf.rope_parameters["sliding_attention"]
        assert full["rope_theta"] == arch.rope_theta and local["rope_theta"] == arch.rope_local_theta
        assert full.get("factor", 1.0) == arch.rope_scaling_factor and local["rope_type"] == "default"
    else:
        assert hf.rope_parameters["rope_theta"] == arch.rope_theta
    # ... and what transformers writes back reads to the same architecture.
    assert behaviour(architecture_from_hf(whole.to_dict())) == behaviour(arch)
    assert behaviour(architecture_from_hf(config)) == behaviour(arch)


def test_tiny_transformers_5_configs():
    g3 = transformers.Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, sliding_window_pattern=2, query_pre_attn_scalar=24,
        rope_scaling={"rope_type": "linear", "factor": 4.0}, final_logit_softcapping=5.0, rms_norm_eps=1e-5,
        max_position_embeddings=512)
    arch = architecture_from_hf(g3.to_dict())
    assert arch.family == "gemma3" and arch.use_qk_norm and arch.use_post_ffw_norm
    assert [arch.is_sliding(i) for i in range(4)] == [True, False, True, False]
    assert arch.rope_for_layer(1) == (1_000_000.0, 4.0) and arch.rope_for_layer(0) == (10_000.0, 1.0)
    assert (arch.sliding_window, arch.query_pre_attn_scalar, arch.final_logit_softcap) == (8, 24, 5.0)
    assert (arch.rms_norm_eps, arch.max_position_embeddings, arch.vocab_size) == (1e-5, 512, 256)

    g2 = transformers.Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=6,
                                   query_pre_attn_scalar=32, attn_logit_softcapping=20.0)
    arch = architecture_from_hf(g2.to_dict())
    assert (arch.family, arch.num_kv_heads, arch.attn_logit_softcap, arch.final_logit_softcap) == ("gemma2", 1, 20.0, 30.0)
    assert [arch.is_sliding(i) for i in range(3)] == [True, False, True] and not arch.use_qk_norm

    g1 = transformers.GemmaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                  rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    arch = architecture_from_hf(g1.to_dict())
    assert (arch.family, arch.rope_theta, arch.query_scale) == ("gemma", 500.0, 16 ** -0.5)
    assert not (arch.use_post_attention_norm or arch.use_qk_norm or arch.sliding_window)


# Hub configs as transformers 4 wrote them (abridged to the keys that matter; values from the hub).
GEMMA3_4B_IT = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "mm_tokens_per_image": 256,
    "eos_token_id": [1, 106], "image_token_index": 262144,
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14},
}
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attn_logit_softcapping": None,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
    "intermediate_size": 6912, "max_position_embeddings": 32768, "num_attention_heads": 4, "num_hidden_layers": 26,
    "num_key_value_heads": 1, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
    "vocab_size": 262144, "cache_implementation": "hybrid",
}
GEMMA2_27B = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0, "head_dim": 128, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 4608, "intermediate_size": 36864,
    "max_position_embeddings": 8192, "num_attention_heads": 32, "num_hidden_layers": 46, "num_key_value_heads": 16,
    "query_pre_attn_scalar": 144, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
    "vocab_size": 256000, "cache_implementation": "hybrid",
}
GEMMA_7B = {
    "architectures": ["GemmaForCausalLM"], "model_type": "gemma", "head_dim": 256, "hidden_act": "gelu",
    "hidden_size": 3072, "intermediate_size": 24576, "max_position_embeddings": 8192, "num_attention_heads": 16,
    "num_hidden_layers": 28, "num_key_value_heads": 16, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
    "vocab_size": 256000,
}


@pytest.mark.parametrize("config,preset", [(GEMMA3_4B_IT, "gemma3_4b"), (GEMMA3_1B, "gemma3_1b"),
                                           (GEMMA2_27B, "gemma2_27b"), (GEMMA_7B, "gemma_7b")])
def test_hub_configs_read_to_the_presets(config, preset):
    assert behaviour(architecture_from_hf(config)) == behaviour(preset_architecture(preset))


def test_read_hf_architecture_from_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GEMMA3_1B))
    assert behaviour(read_hf_architecture(tmp_path)) == behaviour(preset_architecture("gemma3_1b"))


@pytest.mark.parametrize("change,expected", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "rope_type 'yarn'"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_activation": "relu"}, "gelu_pytorch_tanh"),
    ({"use_bidirectional_attention": True}, "causal language model"),
    ({"layer_types": ["full_attention"] + ["sliding_attention"] * 25}, "every p-th layer"),
    ({"layer_types": ["sliding_attention"] * 3}, "26 entries"),
    ({"model_type": "llama"}, "not a Gemma decoder"),
    ({"num_key_value_heads": 3}, "valid Gemma architecture"),
])
def test_unsupported_configs_are_refused_naming_the_file(change, expected):
    with pytest.raises(CheckpointError, match=expected) as e:
        architecture_from_hf({**GEMMA3_1B, **change}, where="ckpt/config.json")
    assert e.value.where.startswith("ckpt/config.json")


def test_unreadable_config_files(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        read_config_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        read_config_file(tmp_path / "config.json")


@pytest.mark.parametrize("overrides,expected", [
    (dict(family="gemma2", rope_local_theta=1000.0), "one RoPE"),
    (dict(family="gemma2", use_qk_norm=True), "no QK-norm"),
    (dict(family="gemma", use_qk_norm=False, attn_logit_softcap=None, final_logit_softcap=None,
          sliding_window=None, sliding_window_pattern=None, rope_local_theta=None, rope_scaling_factor=1.0), "post"),
])
def test_architectures_transformers_cannot_compute_are_not_written(overrides, expected):
    arch = preset_architecture("gemma3_tiny", **overrides)
    with pytest.raises(CheckpointError, match=expected):
        hf_config(arch)
