"""The decoder on its own: presets, attention paths, packing, the KV cache, LoRA and quantisation.

Parity with transformers and keras-hub on the same weights lives in tests/test_parity_*.py.
"""

from __future__ import annotations

import glob
import os

import keras
import numpy as np
import pytest
from keras import ops

from gemma_tune.config.presets import preset_architecture
from gemma_tune.models import (Architecture, build_model, count_params, enable_lora, float_kernel, get_variable,
                               lora_projections, merge_lora, quantize_base, unmerge_lora)

PRESETS = sorted(os.path.basename(p)[:-5] for p in glob.glob(
    os.path.join(os.path.dirname(__file__), "..", "configs", "models", "*.yaml")))

# Published parameter counts of the official checkpoints (text decoder incl. the tied embedding).
OFFICIAL_PARAMS = {
    "gemma_2b": 2_506_172_416, "gemma_7b": 8_537_680_896, "codegemma_2b": 2_506_172_416,
    "codegemma_7b": 8_537_680_896, "gemma2_2b": 2_614_341_888, "gemma2_9b": 9_241_705_984,
    "gemma2_27b": 27_227_128_320, "gemma3_270m": 268_098_176, "gemma3_1b": 999_885_952,
}


def decoder_params(a: Architecture) -> int:
    """Weights of a decoder with architecture `a`, counted from its hyperparameters."""
    norms = 2 + a.use_post_attention_norm + a.use_post_ffw_norm
    per_layer = (2 * a.hidden_size * a.num_heads * a.head_dim + 2 * a.hidden_size * a.num_kv_heads * a.head_dim
                 + 3 * a.hidden_size * a.intermediate_size + norms * a.hidden_size + 2 * a.head_dim * a.use_qk_norm)
    return a.vocab_size * a.hidden_size + a.num_layers * per_layer + a.hidden_size


def tiny(family: str = "gemma3", **overrides) -> Architecture:
    fields = dict(family=family, vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=8)
    if family == "gemma2":
        fields.update(sliding_window=4, sliding_window_pattern=2, attn_logit_softcap=5.0, final_logit_softcap=3.0,
                      query_pre_attn_scalar=12, use_post_attention_norm=True, use_post_ffw_norm=True)
    if family == "gemma3":
        fields.update(sliding_window=4, sliding_window_pattern=3, rope_theta=1e6, rope_local_theta=1e4,
                      rope_scaling_factor=8.0, use_post_attention_norm=True, use_post_ffw_norm=True, use_qk_norm=True)
    fields.update(overrides)
    return Architecture(**fields)


def randomised(model, seed: int = 0):
    """Every weight random (norm scales too), so that a wrong wiring shows in the logits."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        if v.dtype in ("float32", "bfloat16", "float16"):
            v.assign(rng.normal(0.0, 0.3, v.shape).astype("float32"))
    return model


def numpy(x):
    return ops.convert_to_numpy(ops.cast(x, "float32"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_has_a_consistent_architecture(preset):
    arch = preset_architecture(preset)
    assert arch.num_heads % arch.num_kv_heads == 0
    if preset in OFFICIAL_PARAMS:
        assert decoder_params(arch) == OFFICIAL_PARAMS[preset]
    if arch.family == "gemma3":
        assert [arch.is_sliding(i) for i in range(6)] == [True] * 5 + [False]
        assert arch.rope_for_layer(5)[0] == 1_000_000.0 and arch.rope_for_layer(0) == (10_000.0, 1.0)
    if arch.family == "gemma2":
        assert [arch.is_sliding(i) for i in range(4)] == [True, False, True, False]
        assert arch.attn_logit_softcap == 50.0 and arch.final_logit_softcap == 30.0


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_built_model_has_the_counted_weights_and_layout(family):
    arch = tiny(family)
    model = build_model(arch)
    assert count_params(model) == {"total": decoder_params(arch), "trainable": decoder_params(arch)}
    assert len(model.blocks) == 3
    assert tuple(get_variable(model, "blocks.2.attention.k_proj.kernel").shape) == (32, 16)
    assert tuple(get_variable(model, "blocks.2.mlp.down_proj.kernel").shape) == (48, 32)
    windows = [block.attention.window for block in model.blocks]
    assert windows == {"gemma": [None] * 3, "gemma2": [4, None, 4], "gemma3": [4, 4, None]}[family]


def packed_batch():
    """Two rows: row 0 packs segments of 5, 7 and 3 tokens, row 1 one of 9 tokens then padding."""
    rng = np.random.default_rng(1)
    token_ids = rng.integers(1, 96, (2, 16)).astype("int32")
    segment_ids = np.array([[1] * 5 + [2] * 7 + [3] * 3 + [0], [1] * 9 + [0] * 7], "int32")
    positions = np.array([list(range(5)) + list(range(7)) + list(range(3)) + [0], list(range(9)) + [0] * 7],
                         "int32")
    token_ids[segment_ids == 0] = 0
    return {"token_ids": token_ids, "segment_ids": segment_ids, "positions": positions}


@pytest.mark.parametrize("family,kv_heads", [("gemma", 1), ("gemma3", 2)])  # MQA and GQA
def test_fused_and_plain_attention_agree(family, kv_heads):
    plain = randomised(build_model(tiny(family, num_kv_heads=kv_heads), attention_implementation="plain"))
    fused = build_model(tiny(family, num_kv_heads=kv_heads), attention_implementation="fused")
    fused.set_weights(plain.get_weights())
    batch = packed_batch()
    real = batch["segment_ids"] > 0
    np.testing.assert_allclose(numpy(fused(batch))[real], numpy(plain(batch))[real], atol=1e-4)


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_packed_segments_equal_each_segment_alone(family):
    model = randomised(build_model(tiny(family)))
    batch = packed_batch()
    packed = numpy(model(batch))
    for row in range(2):
        for seg in range(1, 4):
            where = batch["segment_ids"][row] == seg
            if not where.any():
                continue
            n = int(where.sum())  # the segment alone, right-padded to the same length (one compiled shape)
            ids = np.zeros((1, 16), "int32")
            ids[0, :n] = batch["token_ids"][row][where]
            alone = numpy(model({"token_ids": ids, "padding_mask": (np.arange(16) < n)[None].astype("int32")}))
            np.testing.assert_allclose(packed[row][where], alone[0, :n], atol=1e-4)


def test_padding_does_not_change_real_tokens():
    model = randomised(build_model(tiny("gemma3")))
    ids = np.random.default_rng(2).integers(1, 96, (1, 10)).astype("int32")
    alone = numpy(model({"token_ids": ids, "padding_mask": np.ones((1, 10), "int32")}))
    padded_ids = np.concatenate([ids, np.zeros((1, 4), "int32")], axis=1)
    right = numpy(model({"token_ids": padded_ids, "padding_mask": (padded_ids > 0).astype("int32")}))
    np.testing.assert_allclose(right[:, :10], alone, atol=1e-5)
    assert np.isfinite(right).all()


def test_hidden_states_and_logits_from_them():
    model = randomised(build_model(tiny("gemma2")))
    batch = packed_batch()
    hidden = model(batch, return_hidden_states=True)
    assert tuple(hidden.shape) == (2, 16, 32)
    np.testing.assert_allclose(numpy(model.logits_from_hidden_states(hidden)), numpy(model(batch)), atol=1e-6)
    assert np.abs(numpy(model(batch))).max() <= 3.0  # final soft-cap


def test_kv_cache_decoding_equals_the_full_forward():
    model = randomised(build_model(tiny("gemma3")))
    ids = np.random.default_rng(3).integers(1, 96, (2, 12)).astype("int32")
    full = numpy(model({"token_ids": ids, "padding_mask": np.ones_like(ids)}))
    cache = model.init_cache(2, 12)
    segments = np.ones((2, 12), "int32")
    positions = np.broadcast_to(np.arange(12, dtype="int32"), (2, 12))
    logits, cache = model.call_with_cache(ids[:, :7], positions[:, :7], segments, cache, 0)
    steps = [numpy(logits)]
    for t in range(7, 12):
        logits, cache = model.call_with_cache(ids[:, t:t + 1], positions[:, t:t + 1], segments, cache, t)
        steps.append(numpy(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4)


def test_remat_gives_the_same_outputs():
    model = randomised(build_model(tiny("gemma3")))
    batch = packed_batch()
    reference = numpy(model(batch, training=True))
    model.remat = True
    np.testing.assert_allclose(numpy(model(batch, training=True)), reference, atol=1e-6)


def test_lora_freezes_the_base_and_starts_as_the_identity():
    model = randomised(build_model(tiny("gemma3")))
    batch = packed_batch()
    before = numpy(model(batch))
    enable_lora(model, rank=4, alpha=8.0, targets=["q", "v", "down"])
    names = {v.path.rsplit("/", 1)[-1] for v in model.trainable_weights}
    assert names == {"lora_kernel_a", "lora_kernel_b"}
    assert len(model.trainable_weights) == 3 * 3 * 2
    assert count_params(model)["trainable"] == 3 * 4 * ((32 + 32) + (32 + 16) + (48 + 32))
    np.testing.assert_allclose(numpy(model(batch)), before, atol=1e-6)
    assert [p for p, _ in lora_projections(model)][:3] == [
        "blocks.0.attention.q_proj", "blocks.0.attention.v_proj", "blocks.0.mlp.down_proj"]


def test_lora_merge_and_unmerge_keep_the_function():
    model = randomised(build_model(tiny("gemma3")))
    enable_lora(model, rank=4, alpha=8.0)
    randomised(model, seed=5)  # adapters non-zero
    batch = packed_batch()
    real = batch["segment_ids"] > 0
    with_adapters = numpy(model(batch))[real]
    kernel = float_kernel(model.blocks[0].attention.q_proj)
    merge_lora(model)
    np.testing.assert_allclose(numpy(get_variable(model, "blocks.0.attention.q_proj.kernel")), kernel)
    np.testing.assert_allclose(numpy(model(batch))[real], with_adapters, atol=1e-4)
    unmerge_lora(model)
    np.testing.assert_allclose(numpy(model(batch))[real], with_adapters, atol=1e-4)
    assert np.any(numpy(model.blocks[0].attention.q_proj.lora_kernel_b))


def test_lora_dropout_acts_only_in_training():
    model = randomised(build_model(tiny("gemma")))
    enable_lora(model, rank=4, alpha=8.0, dropout=0.5)
    randomised(model, seed=6)
    batch = packed_batch()
    real = batch["segment_ids"] > 0
    inference = numpy(model(batch))[real]
    np.testing.assert_allclose(numpy(model(batch))[real], inference)
    assert np.abs(numpy(model(batch, training=True))[real] - inference).max() > 1e-3


@pytest.mark.parametrize("mode,tolerance", [("int8", 0.05), ("int4", 0.6)])
def test_quantised_base_with_float_adapters(mode, tolerance):
    model = randomised(build_model(tiny("gemma3", num_layers=2)))  # Keras' quantisation is slow per layer
    batch = packed_batch()
    real = batch["segment_ids"] > 0
    reference = numpy(model(batch))[real]
    kernel = numpy(get_variable(model, "blocks.1.mlp.up_proj.kernel"))
    quantize_base(model, mode)
    quantised = numpy(model(batch))[real]
    assert 0 < np.abs(quantised - reference).max() < tolerance * np.abs(reference).max()
    dequantised = float_kernel(model.blocks[1].mlp.up_proj)
    assert np.abs(dequantised - kernel).max() < (0.01 if mode == "int8" else 0.2) * np.abs(kernel).max()
    enable_lora(model, rank=2, alpha=4.0, dropout=0.1)
    assert all(v.dtype == "float32" for v in model.trainable_weights)
    assert {v.path.rsplit("/", 1)[-1] for v in model.trainable_weights} == {"lora_kernel_a", "lora_kernel_b"}
    np.testing.assert_allclose(numpy(model(batch))[real], quantised, atol=1e-5)
    with pytest.raises(ValueError, match="cannot merge"):
        randomised(model, seed=7)
        merge_lora(model)


def test_bfloat16_compute_with_float32_master_weights():
    model = build_model(tiny("gemma3"), dtype="mixed_bfloat16")
    batch = packed_batch()
    assert all(v.dtype == "float32" for v in model.weights)
    assert ops.dtype(model(batch, return_hidden_states=True)) == "bfloat16"


def test_serialisation_round_trip(tmp_path):
    model = randomised(build_model(tiny("gemma2")))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.architecture == model.architecture
    batch = packed_batch()
    np.testing.assert_array_equal(numpy(loaded(batch)), numpy(model(batch)))
    import subprocess
    import sys

    code = (f"import keras, gemma_tune; m = keras.saving.load_model({str(path)!r}, safe_mode=True); "
            "print(type(m).__name__, len(m.blocks))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split() == ["GemmaCausalLM", "3"], done.stderr[-2000:]


def test_validating_a_recipe_leaves_the_backend_unchosen():
    """Recipes import the Architecture schema; that must not import Keras (the backend is chosen later)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    code = ("import sys, gemma_tune; gemma_tune.load_recipe('recipes/quickstart.yaml'); "
            "assert 'keras' not in sys.modules; from gemma_tune.models import Architecture; "
            "assert 'keras' not in sys.modules; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_projection_config_keeps_lora_alpha_and_dropout():
    from gemma_tune.models import Projection

    layer = Projection(8, lora_rank=4, lora_alpha=16.0, lora_dropout=0.1)
    layer.build((None, 6))
    restored = Projection.from_config(layer.get_config())
    restored.build((None, 6))
    assert (restored.lora_rank, restored.lora_alpha, restored.lora_dropout) == (4, 16.0, 0.1)
    assert restored.lora_dropout_seed is not None
