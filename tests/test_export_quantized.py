"""Quantised keras and safetensors exports, and exports without a tokenizer.

keras int8 / int4: `model.keras` loads with `keras.saving.load_model(..., safe_mode=True)` as a GemmaCausalLM
whose projections are quantised, computing what the quantised model computed before saving, near the float
model. safetensors int8 / int4: transformers loads the files with its built-in Gemma quantisation
(QuantizedLinear, no other package) and computes the float model with the dequantised weights. Without a
tokenizer, keras / safetensors / peft write the weights with a warning."""

import json
import logging

import keras
import numpy as np
import pytest
import torch
import transformers

from gemma_tune.config.presets import preset_architecture
from gemma_tune.errors import UserError
from gemma_tune.export import export_model
from gemma_tune.export.keras import archive_architecture, load_keras_archive, quantized_model
from gemma_tune.export.safetensors import dequantize_rows, quantize_rows
from gemma_tune.models import build_model, enable_lora, lora_projections, projections

IDS = np.random.RandomState(0).randint(3, 512, (2, 20)).astype(np.int32)
DRIFT = {"int8": 0.5, "int4": 0.8}


def random_model(seed=0, lora=False, **overrides):
    model = build_model(preset_architecture("gemma3_tiny", num_layers=2, sliding_window=8, **overrides))
    rng = np.random.RandomState(seed)
    for v in model.weights:
        v.assign(rng.normal(0.0, 0.3 if len(v.shape) == 1 else 0.08, v.shape).astype(np.float32))
    if lora:
        enable_lora(model, rank=4, alpha=8.0)
        for _, layer in lora_projections(model):
            for v in (layer.lora_kernel_a, layer.lora_kernel_b):
                v.assign(rng.normal(0.0, 0.2, v.shape).astype(np.float32))
    return model


def ours(model):
    return keras.ops.convert_to_numpy(model({"token_ids": IDS, "padding_mask": np.ones_like(IDS)})).astype(np.float32)


def hf_logits(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(IDS)).logits.numpy(), model


@pytest.fixture(scope="module")
def model():
    return random_model(lora=True)


@pytest.fixture(scope="module")
def float_logits(model):
    return ours(model)


@pytest.fixture(scope="module")
def keras_exports(model, tok, tmp_path_factory):
    """{mode: (export directory, logits of the quantised model before saving)}."""
    root = tmp_path_factory.mktemp("keras")
    return {mode: (export_model(model, tok, root / mode, "keras", quantize=mode), ours(quantized_model(model, mode)))
            for mode in ("int8", "int4")}


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantised_keras_export_loads_in_safe_mode(mode, keras_exports, float_logits):
    out, expected = keras_exports[mode]
    assert sorted(p.name for p in out.iterdir()) == ["model.keras", "tokenizer.model"]
    loaded = keras.saving.load_model(str(out / "model.keras"), safe_mode=True)
    assert {layer.quantization_mode for _, layer in projections(loaded)} == {mode}
    assert loaded.token_embedding.quantization_mode is None  # the tied head stays float
    np.testing.assert_allclose(ours(loaded), expected, atol=1e-5)
    np.testing.assert_allclose(ours(load_keras_archive(out)), expected, atol=1e-5)
    assert archive_architecture(out) == loaded.architecture
    drift = np.abs(expected - float_logits).max() / np.abs(float_logits).max()
    assert 0 < drift < DRIFT[mode]


def test_int4_archive_is_smaller_than_int8(keras_exports):
    size = {mode: (out / "model.keras").stat().st_size for mode, (out, _) in keras_exports.items()}
    assert size["int4"] < size["int8"]


@pytest.mark.parametrize("bits", [8, 4])
def test_row_quantisation_round_trips(bits):
    weight = np.random.RandomState(bits).normal(0, 0.1, (6, 9)).astype(np.float32)
    integers, scale = quantize_rows(weight, bits)
    assert integers.dtype == (np.int8 if bits == 8 else np.uint8)
    assert integers.shape == ((6, 9) if bits == 8 else (6, 5))
    back = dequantize_rows(integers, scale, bits, 9)
    assert np.abs(back - weight).max() <= scale.max() / 2 + 1e-7
    assert np.allclose(np.abs(back).max(axis=1), np.abs(weight).max(axis=1))  # each row's extreme is exact


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantised_safetensors_load_in_transformers(mode, model, tok, tmp_path):
    out = export_model(model, tok, tmp_path / mode, "safetensors", quantize=mode)
    config = json.loads((out / "config.json").read_text())
    bits = {"int8": 8, "int4": 4}[mode]
    assert config["quantization_config"] == {"quant_method": "gemma", "num_bits": bits, "quantize_embeddings": False,
                                             "modules_to_not_convert": ["lm_head"]}
    got, hf = hf_logits(out)
    q_proj = hf.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "QuantizedLinear" and q_proj.num_bits == bits
    assert type(hf.lm_head).__name__ == "Linear"
    float_dir = export_model(model, tok, tmp_path / "float", "safetensors")
    reference, dense = hf_logits(float_dir)  # the float model with each projection dequantised
    with torch.no_grad():
        for name, module in dense.named_modules():
            if name.endswith("_proj"):
                integers, scale = quantize_rows(module.weight.numpy(), bits)
                module.weight.copy_(torch.tensor(dequantize_rows(integers, scale, bits, module.in_features)))
        dequantised = dense(input_ids=torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(got, dequantised, atol=1e-4)
    drift = np.abs(got - reference).max() / np.abs(reference).max()
    assert 0 < drift < DRIFT[mode]


def test_quantised_exports_of_other_kinds_are_refused(model, tok, tmp_path):
    from gemma_tune.models import RewardModel

    with pytest.raises(UserError, match="reward model"):
        export_model(RewardModel(random_model()), tok, tmp_path / "r", "safetensors", quantize="int8")
    with pytest.raises(UserError, match="not a peft quantisation"):
        export_model(model, tok, tmp_path / "p", "peft", quantize="int8")
    assert not any(tmp_path.iterdir())


def test_exports_without_a_tokenizer_write_the_weights_with_a_warning(model, float_logits, tmp_path, caplog):
    expected = float_logits
    with caplog.at_level(logging.WARNING, logger="gemma_tune"):
        keras_dir = export_model(model, None, tmp_path / "keras", "keras")
        hf_dir = export_model(model, None, tmp_path / "hf", "safetensors")
        peft_dir = export_model(model, None, tmp_path / "peft", "peft")
    assert caplog.text.count("no tokenizer was found") == 3
    assert [p.name for p in keras_dir.iterdir()] == ["model.keras"]
    # LoRA merged into the kernels: float32 round-off of W + BA·s (1e-5 seen on torch), within the parity bound
    np.testing.assert_allclose(ours(load_keras_archive(keras_dir)), expected, atol=1e-4)
    assert sorted(p.name for p in hf_dir.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 1, 0)
    assert np.abs(hf_logits(hf_dir)[0] - expected).max() <= 1e-4
    assert sorted(p.name for p in peft_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
