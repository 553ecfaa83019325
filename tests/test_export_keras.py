"""The keras export: model.keras (safe_mode load, bit-exact), the keras-hub preset beside it
(GemmaCausalLM / Gemma3CausalLM.from_preset give our logits), the tokenizer, LoRA, quantised bases."""

import json
from pathlib import Path

import keras
import keras_hub
import numpy as np
import pytest

from gemma_tune.checkpoints.keras_hub import load_keras_hub_preset, write_keras_hub_preset
from gemma_tune.errors import CheckpointError, UserError
from gemma_tune.export import export_model
from gemma_tune.export.keras import MODEL_FILE, TOKENIZER_FILE, write_keras_export
from gemma_tune.generate import generate
from gemma_tune.models import (Architecture, build_model, enable_lora, float_kernel, lora_projections, merge_lora,
                               projections, quantize_base)
from gemma_tune.tokenizer import load_tokenizer

TOKENIZER = "data/tiny/tokenizer.model"
TOLERANCE = 1e-4
PRESET_FILES = ("config.json", "model.weights.h5", "metadata.json", "task.json", "preprocessor.json",
                "tokenizer.json", "assets/tokenizer/vocabulary.spm")
SMALL = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_heads=4, head_dim=8)
ARCHITECTURES = {
    "gemma": Architecture(family="gemma", num_layers=2, num_kv_heads=1, **SMALL),
    # query_pre_attn_scalar != head_dim: folded into the q kernel (Gemma 2) / query-norm scale (Gemma 3).
    "gemma2": Architecture(family="gemma2", num_layers=2, num_kv_heads=2, query_pre_attn_scalar=12.0,
                           sliding_window=4, sliding_window_pattern=2, attn_logit_softcap=50.0,
                           final_logit_softcap=30.0, use_post_attention_norm=True, use_post_ffw_norm=True,
                           **SMALL),
    "gemma3": Architecture(family="gemma3", num_layers=6, num_kv_heads=2, query_pre_attn_scalar=12.0,
                           rope_theta=1e6, rope_local_theta=1e4, rope_scaling_factor=8.0, sliding_window=4,
                           sliding_window_pattern=6, use_qk_norm=True, use_post_attention_norm=True,
                           use_post_ffw_norm=True, **SMALL),
}
KERAS_HUB_TASK = {"gemma": keras_hub.models.GemmaCausalLM, "gemma2": keras_hub.models.GemmaCausalLM,
                  "gemma3": keras_hub.models.Gemma3CausalLM}


def _model(family, seed=0, lora=True, quantize=None, **changes):
    """A tiny model with every weight (norms included) random, and random LoRA adapters (B != 0)."""
    rng = np.random.default_rng(seed)
    model = build_model(ARCHITECTURES[family].model_copy(update=changes))
    for variable in model.weights:
        variable.assign(rng.normal(0.0, 0.2, variable.shape).astype("float32"))
    if quantize:
        quantize_base(model, quantize)
    if lora:
        enable_lora(model, rank=2, alpha=4.0)
        for _, layer in lora_projections(model):
            layer.lora_kernel_a.assign(rng.normal(0.0, 0.2, layer.lora_kernel_a.shape).astype("float32"))
            layer.lora_kernel_b.assign(rng.normal(0.0, 0.2, layer.lora_kernel_b.shape).astype("float32"))
    return model


def _batch():
    """A full row, a right-padded row and a left-padded row, 12 tokens (longer than the window)."""
    rng = np.random.default_rng(5)
    padding_mask = np.ones((3, 12), "int32")
    padding_mask[1, 7:] = 0
    padding_mask[2, :3] = 0
    return {"token_ids": rng.integers(13, 512, (3, 12)).astype("int32") * padding_mask,
            "padding_mask": padding_mask}


def _logits(model, batch):
    return keras.ops.convert_to_numpy(model(batch)).astype(np.float64)


def _real_diff(a, b, batch):
    return float(np.abs(a - b)[batch["padding_mask"].astype(bool)].max())


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_lora_merged_export_loads_in_keras_and_keras_hub(family, tokenizer, tmp_path):
    model = _model(family)
    batch = _batch()
    with_adapters = _logits(model, batch)
    write_keras_export(model, tokenizer, tmp_path, merge_lora=True)
    for name in (MODEL_FILE, TOKENIZER_FILE, *PRESET_FILES):
        assert (tmp_path / name).is_file(), name

    loaded = keras.saving.load_model(tmp_path / MODEL_FILE, safe_mode=True)
    assert loaded.architecture == model.architecture and not list(lora_projections(loaded))
    merge_lora(model)  # in memory: W + (alpha/r)·A·B in float32, B zeroed
    np.testing.assert_array_equal(_logits(loaded, batch), _logits(model, batch))
    assert np.abs(with_adapters).max() > 1.0
    assert _real_diff(_logits(loaded, batch), with_adapters, batch) <= TOLERANCE

    task = KERAS_HUB_TASK[family].from_preset(str(tmp_path))
    assert _real_diff(_logits(task, batch), with_adapters, batch) <= TOLERANCE


def test_tokenizer_and_greedy_generation_round_trip(tokenizer, tmp_path):
    model = _model("gemma3", lora=False)
    write_keras_export(model, tokenizer, tmp_path)
    assert (tmp_path / TOKENIZER_FILE).read_bytes() == Path(TOKENIZER).read_bytes()
    assert (tmp_path / "assets/tokenizer/vocabulary.spm").read_bytes() == Path(TOKENIZER).read_bytes()
    theirs = keras_hub.models.Gemma3Tokenizer.from_preset(str(tmp_path))
    assert not theirs.has_vision_tokens  # the tiny vocabulary has no <img> piece
    text = "<start_of_turn>user\nWhat colour is the sky?<end_of_turn>\n"
    ids = tokenizer.encode(text)
    assert np.asarray(theirs(text)).tolist() == ids
    assert theirs.detokenize(np.asarray(ids)) == tokenizer.decode(ids)
    assert load_tokenizer(tmp_path).encode(text) == ids

    prompt, total = "the sky is", 12  # keras-hub's max_length counts <bos> and the prompt
    task = keras_hub.models.Gemma3CausalLM.from_preset(str(tmp_path))
    new_tokens = total - 1 - len(tokenizer.encode(prompt))
    ours = generate(model, tokenizer, [prompt], max_new_tokens=new_tokens, chat=False)[0]
    assert task.generate([prompt], max_length=total)[0] == prompt + ours


def test_our_loader_reads_the_preset_back(tokenizer, tmp_path):
    model = _model("gemma", lora=False)
    write_keras_hub_preset(model, tokenizer, tmp_path)
    again, again_tokenizer = load_keras_hub_preset(tmp_path)
    batch = _batch()
    np.testing.assert_array_equal(_logits(again, batch), _logits(model, batch))  # no fold: bit-exact
    assert again.architecture.model_dump(exclude={"max_position_embeddings"}) == \
        model.architecture.model_dump(exclude={"max_position_embeddings"})
    assert again_tokenizer.encode("blue sky") == tokenizer.encode("blue sky")


def test_quantised_base_is_dequantised(tokenizer, tmp_path):
    """An int8 base with LoRA exports float kernels, dequantised then merged (Keras' int8 forward also
    quantises activations, so the quantised model itself is not the reference)."""
    model = _model("gemma3", quantize="int8", num_layers=1)  # Keras' quantize() takes ~1 s per projection
    write_keras_export(model, tokenizer, tmp_path)
    loaded = keras.saving.load_model(tmp_path / MODEL_FILE, safe_mode=True)
    for (path, ours), (_, theirs) in zip(projections(model), projections(loaded)):
        assert ours.quantization_mode == "int8" and theirs.quantization_mode is None, path
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(theirs.kernel), float_kernel(ours))
    batch = _batch()
    task = keras_hub.models.Gemma3CausalLM.from_preset(str(tmp_path))
    assert _real_diff(_logits(task, batch), _logits(loaded, batch), batch) <= TOLERANCE


def test_bfloat16_export(tokenizer, tmp_path):
    model = _model("gemma", lora=False)
    write_keras_export(model, tokenizer, tmp_path, dtype="bfloat16")
    rounded = keras.ops.convert_to_numpy(
        keras.ops.cast(keras.ops.cast(model.token_embedding.embeddings, "bfloat16"), "float32"))
    loaded = keras.saving.load_model(tmp_path / MODEL_FILE, safe_mode=True)
    assert json.loads((tmp_path / "config.json").read_text())["config"]["dtype"]["config"]["name"] == "bfloat16"
    backbone = keras_hub.models.GemmaBackbone.from_preset(str(tmp_path), dtype="bfloat16")
    read_back, _ = load_keras_hub_preset(tmp_path, dtype="bfloat16")
    assert read_back.dtype_policy.name == "bfloat16"
    for exported in (loaded.token_embedding.embeddings, backbone.token_embedding.embeddings,
                     read_back.token_embedding.embeddings):
        assert keras.backend.standardize_dtype(exported.dtype) == "bfloat16"
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(keras.ops.cast(exported, "float32")), rounded)


def test_unmerged_lora_and_inexpressible_models_are_refused(tokenizer, tmp_path):
    with pytest.raises(CheckpointError, match="cannot keep LoRA adapters unmerged"):
        write_keras_export(_model("gemma"), tokenizer, tmp_path, merge_lora=False)
    with pytest.raises(CheckpointError, match="cannot hold unmerged LoRA"):
        write_keras_hub_preset(_model("gemma"), tokenizer, tmp_path, merge_lora=False)
    odd = build_model(ARCHITECTURES["gemma3"].model_copy(update={"rope_theta": 5e5, "rms_norm_eps": 1e-5}))
    out = tmp_path / "odd"
    with pytest.raises(CheckpointError, match=r"rms_norm_eps=1e-05 .*; rope_theta=500000.0"):
        export_model(odd, tokenizer, out, "keras")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".odd")]
    with pytest.raises(UserError, match="does not exist"):
        write_keras_export(odd, tokenizer, tmp_path / "missing")


def test_export_model_writes_the_keras_format_atomically(tokenizer, tmp_path):
    out = export_model(_model("gemma"), tokenizer, tmp_path / "export", "keras")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        {MODEL_FILE, TOKENIZER_FILE, "assets", *(f.split("/")[0] for f in PRESET_FILES)})
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    with pytest.raises(UserError, match="not empty"):
        export_model(_model("gemma"), tokenizer, out, "keras")
