"""Parity with keras-hub: tiny random GemmaBackbone (Gemma 1, Gemma 2) and Gemma3Backbone (text) presets,
saved by keras-hub with the bundled SentencePiece vocabulary, load through `load_model` with the same logits
(float32, max abs diff <= 1e-4 on real tokens of padded batches, sequences longer than the window).

keras-hub's Gemma 2 backbone agrees with ours (and transformers) except where it ignores
query_head_dim_normalize=False; that case is asserted as a disagreement below."""

import json

import keras
import keras_hub
import numpy as np
import pytest

from gemma_tune.checkpoints import keras_hub as kh
from gemma_tune.checkpoints.keras_hub import architecture_from_keras_hub, is_keras_hub_preset, load_keras_hub_preset
from gemma_tune.errors import CheckpointError
from gemma_tune.loading import load_model_and_tokenizer
from gemma_tune.models import build_model, get_variable
from gemma_tune.tokenizer import GemmaTokenizer

TOKENIZER = "data/tiny/tokenizer.model"
TOLERANCE = 1e-4
LENGTH = 12  # longer than the sliding window (4) below

COMMON = dict(vocabulary_size=512, num_query_heads=4, hidden_dim=32, head_dim=8)
GEMMA1 = dict(COMMON, num_layers=2, num_key_value_heads=1, intermediate_dim=128)
GEMMA2 = dict(COMMON, num_layers=4, num_key_value_heads=2, intermediate_dim=128, use_post_ffw_norm=True,
              use_post_attention_norm=True, attention_logit_soft_cap=50.0, final_logit_soft_cap=30.0,
              use_sliding_window_attention=True, sliding_window_size=4)
# Six layers: five sliding-window layers and one global layer (i % 6 == 5).
GEMMA3 = dict(COMMON, image_size=None, num_layers=6, num_key_value_heads=2, intermediate_dim=64,
              use_query_key_norm=True, use_post_ffw_norm=True, use_post_attention_norm=True,
              use_sliding_window_attention=True, sliding_window_size=4, global_rope_scaling_factor=8.0)


def _randomise(backbone, seed):
    """Every variable (norm scales included) drawn from N(0, 0.2²)."""
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        variable.assign(rng.normal(0.0, 0.2, variable.shape).astype("float32"))


def _save_preset(backbone, directory):
    """A keras-hub CausalLM preset (backbone, tokenizer, preprocessor) as keras-hub writes it."""
    if isinstance(backbone, keras_hub.models.Gemma3Backbone):
        tokenizer = keras_hub.models.Gemma3Tokenizer(proto=TOKENIZER, has_vision_tokens=False)
        task = keras_hub.models.Gemma3CausalLM(
            backbone=backbone, preprocessor=keras_hub.models.Gemma3CausalLMPreprocessor(tokenizer=tokenizer))
    else:
        tokenizer = keras_hub.models.GemmaTokenizer(proto=TOKENIZER)
        task = keras_hub.models.GemmaCausalLM(
            backbone=backbone, preprocessor=keras_hub.models.GemmaCausalLMPreprocessor(tokenizer=tokenizer))
    task.save_to_preset(str(directory))
    return task


def _batch(seed):
    """Three rows: full, right-padded and left-padded."""
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(13, 512, (3, LENGTH)).astype("int32")
    padding_mask = np.ones((3, LENGTH), "int32")
    padding_mask[1, 7:] = 0
    padding_mask[2, :4] = 0
    return {"token_ids": token_ids * padding_mask, "padding_mask": padding_mask}


def _logits(model, batch):
    return keras.ops.convert_to_numpy(model(batch)).astype(np.float64)


def _real_diff(a, b, batch):
    return float(np.abs(a - b)[batch["padding_mask"].astype(bool)].max())


@pytest.fixture(scope="module", params=["gemma1", "gemma2", "gemma3"])
def preset(request, tmp_path_factory):
    """(name, keras-hub CausalLM, preset directory)."""
    cls, config = {"gemma1": (keras_hub.models.GemmaBackbone, GEMMA1),
                   "gemma2": (keras_hub.models.GemmaBackbone, GEMMA2),
                   "gemma3": (keras_hub.models.Gemma3Backbone, GEMMA3)}[request.param]
    backbone = cls(**config, dtype="float32")
    _randomise(backbone, seed=len(request.param) + config["num_layers"])
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, _save_preset(backbone, directory), directory


def test_same_logits_as_keras_hub(preset):
    name, task, directory = preset
    model, tokenizer = load_model_and_tokenizer(directory)  # dispatches to load_keras_hub_preset
    assert model.architecture.family == {"gemma1": "gemma", "gemma2": "gemma2", "gemma3": "gemma3"}[name]
    batch = _batch(seed=1)
    reference = _logits(task, batch)
    assert np.abs(reference).max() > 1.0  # logits of a size where a wrong weight would show
    assert _real_diff(_logits(model, batch), reference, batch) <= TOLERANCE
    assert isinstance(tokenizer, GemmaTokenizer)
    text = "the sky is blue and the grass is green"
    assert tokenizer.encode(text) == keras.ops.convert_to_numpy(task.preprocessor.tokenizer(text)).tolist()


def test_every_weight_lands_where_keras_hub_keeps_it(preset):
    _, task, directory = preset
    model, _ = load_keras_hub_preset(directory)
    theirs = {v.path: keras.ops.convert_to_numpy(v) for v in task.backbone.weights}
    mapped = kh.tensors(model.architecture)
    assert {p for _, p, _ in mapped} == set(theirs)
    for ours, their_path, layout in mapped:
        value = keras.ops.convert_to_numpy(get_variable(model, ours))
        np.testing.assert_array_equal(value, kh.to_ours(theirs[their_path], layout))
        np.testing.assert_array_equal(kh.to_theirs(value, layout, theirs[their_path].shape), theirs[their_path])


def test_query_head_dim_normalize_false_means_hidden_over_heads(tmp_path):
    """keras-hub 0.32 ignores query_head_dim_normalize=False (its blocks pass True down); the real scale is
    1/sqrt(hidden/heads) (Gemma 2 27B: 144), which we use. keras-hub's own logits are those of head_dim."""
    config = dict(GEMMA2, hidden_dim=48, num_layers=1, query_head_dim_normalize=False)
    backbone = keras_hub.models.GemmaBackbone(**config, dtype="float32")
    _randomise(backbone, seed=7)
    task = _save_preset(backbone, tmp_path)
    model, _ = load_keras_hub_preset(tmp_path)
    assert model.architecture.query_pre_attn_scalar == 48 / 4
    batch = _batch(seed=2)
    reference = _logits(task, batch)
    assert _real_diff(_logits(model, batch), reference, batch) > 0.05
    as_keras_hub = build_model(model.architecture.model_copy(update={"query_pre_attn_scalar": None}))
    for ours, _, _ in kh.tensors(model.architecture):
        get_variable(as_keras_hub, ours).assign(get_variable(model, ours))
    assert _real_diff(_logits(as_keras_hub, batch), reference, batch) <= TOLERANCE


def test_architecture_mapping():
    g1 = architecture_from_keras_hub("GemmaBackbone", GEMMA1)
    assert (g1.family, g1.intermediate_size, g1.num_kv_heads, g1.sliding_window) == ("gemma", 64, 1, None)
    assert g1.rope_for_layer(0) == (10_000.0, 1.0) and g1.query_scale == 8 ** -0.5
    g2 = architecture_from_keras_hub("GemmaBackbone", GEMMA2)
    assert (g2.family, g2.attn_logit_softcap, g2.final_logit_softcap) == ("gemma2", 50.0, 30.0)
    assert [g2.is_sliding(i) for i in range(4)] == [True, False, True, False]
    g3 = architecture_from_keras_hub("Gemma3Backbone", GEMMA3)
    assert (g3.family, g3.intermediate_size, g3.use_qk_norm) == ("gemma3", 64, True)
    assert [g3.is_sliding(i) for i in range(6)] == [True] * 5 + [False]
    assert g3.rope_for_layer(0) == (10_000.0, 1.0) and g3.rope_for_layer(5) == (1_000_000.0, 8.0)
    assert g3.max_position_embeddings == 8 * 32_768
    full = architecture_from_keras_hub("Gemma3Backbone", dict(GEMMA3, use_sliding_window_attention=False))
    assert [full.rope_for_layer(i) for i in range(6)] == [(1_000_000.0, 8.0)] * 6


@pytest.mark.parametrize("class_name, config, message", [
    ("LlamaBackbone", {}, "unsupported keras-hub backbone 'LlamaBackbone'"),
    ("Gemma3Backbone", dict(GEMMA3, is_embedding_model=True), "is_embedding_model=True"),
    ("Gemma3Backbone", dict(GEMMA3, local_rope_scaling_factor=2.0), "local_rope_scaling_factor"),
    ("GemmaBackbone", dict(GEMMA1, layer_norm_epsilon=1e-5), "layer_norm_epsilon=1e-05"),
    ("GemmaBackbone", dict(GEMMA1, intermediate_dim=129), "must be even"),
    ("GemmaBackbone", {k: v for k, v in GEMMA1.items() if k != "head_dim"}, "no 'head_dim'"),
])
def test_configs_we_cannot_reproduce_are_refused(class_name, config, message):
    with pytest.raises(CheckpointError, match=message) as e:
        architecture_from_keras_hub(class_name, config, where="p/config.json")
    assert e.value.where == "p/config.json"


@pytest.mark.parametrize("preset", ["gemma3"], indirect=True)
def test_detection(tmp_path, preset):
    _, _, directory = preset
    assert is_keras_hub_preset(directory)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gemma", "hidden_size": 32}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    for path in (hf, tmp_path / "broken", tmp_path / "missing", tmp_path, "hf://google/gemma-2b"):
        assert not is_keras_hub_preset(path)
    with pytest.raises(CheckpointError, match="not a keras-hub preset") as e:
        load_keras_hub_preset(hf)
    assert e.value.where == str(hf)


@pytest.mark.parametrize("preset", ["gemma1"], indirect=True)
def test_missing_weights_and_unmapped_variables(tmp_path, preset, monkeypatch):
    _, task, _ = preset
    task.save_to_preset(str(tmp_path))
    monkeypatch.setattr(kh, "NAME_MAP", tuple(t for t in kh.NAME_MAP if t.ours != "final_norm.scale"))
    with pytest.raises(CheckpointError, match="no place in the model: final_normalization/scale"):
        load_keras_hub_preset(tmp_path)
    monkeypatch.undo()
    wrong = architecture_from_keras_hub(type(task.backbone).__name__, task.backbone.get_config())
    monkeypatch.setattr(kh, "architecture_from_keras_hub",
                        lambda *a, **k: wrong.model_copy(update={"intermediate_size": 48}))
    with pytest.raises(CheckpointError, match=r"ffw_gating/kernel has shape .* expects \(32, 48\)"):
        load_keras_hub_preset(tmp_path)
    monkeypatch.undo()
    (tmp_path / "model.weights.h5").unlink()
    with pytest.raises(CheckpointError, match="keras-hub could not load this preset") as e:
        load_keras_hub_preset(tmp_path)
    assert e.value.where == str(tmp_path)


def test_multimodal_gemma3_preset_loads_its_text_decoder_when_asked(tmp_path):
    """text_only=True reads a multimodal preset's decoder alone (the vision model: test_parity_vision_keras_hub.py)."""
    encoder = keras_hub.models.Gemma3VisionEncoder(image_size=28, patch_size=14, num_heads=2, hidden_dim=8,
                                                   num_layers=1, intermediate_dim=16, output_dim=32, pool_size=2)
    backbone = keras_hub.models.Gemma3Backbone(**dict(GEMMA3, image_size=28, num_layers=1), vision_encoder=encoder,
                                               dtype="float32")
    _randomise(backbone, seed=3)
    backbone.save_to_preset(str(tmp_path))
    model, tokenizer = load_keras_hub_preset(tmp_path, text_only=True)
    assert tokenizer is None and model.architecture.vision is None and model.architecture.num_layers == 1
    vision = {v.path for v in encoder.weights}
    theirs = {v.path: keras.ops.convert_to_numpy(v) for v in backbone.weights if v.path not in vision}
    assert vision and {p for _, p, _ in kh.tensors(model.architecture)} == set(theirs)
    for ours, their_path, layout in kh.tensors(model.architecture):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(get_variable(model, ours)),
                                      kh.to_ours(theirs[their_path], layout))


def test_every_text_preset_maps_to_keras_hub_and_back():
    """configs/models: each preset is a keras-hub config that maps back to the same model (the query scale folded
    where query_pre_attn_scalar != head_dim): Gemma 1/2 GemmaBackbone, Gemma 3 Gemma3Backbone (with its vision
    encoder for 4B+), PaliGemma 1/2 PaliGemmaBackbone. keras-hub does not record the image token: given back."""
    from gemma_tune.config.presets import preset_architecture, preset_names

    checked = set()
    for name in preset_names():
        arch = preset_architecture(name)
        class_name, config, fold = kh.keras_hub_backbone_config(arch)
        back = architecture_from_keras_hub(class_name, config,
                                           image_token_id=arch.vision.image_token_id if arch.vision else None)
        ignore = {"query_pre_attn_scalar", "max_position_embeddings"}
        assert back.model_dump(exclude=ignore) == arch.model_dump(exclude=ignore), name
        assert back.query_scale * fold == pytest.approx(arch.query_scale, rel=1e-12), name
        checked.add(class_name)
    assert checked == {"GemmaBackbone", "Gemma3Backbone", "PaliGemmaBackbone"}

