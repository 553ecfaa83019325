"""Parity with keras-hub's vision models: tiny random PaliGemmaBackbone (PaliGemma 1 with a Gemma decoder,
PaliGemma 2 with Gemma 2 features) and Gemma3Backbone with a Gemma3VisionEncoder, every variable randomised
(norms and biases included), saved by keras-hub with the bundled SentencePiece vocabulary, load through
`load_model` with the same float32 logits (max abs diff <= 1e-4 over the real text positions), export back to
presets that keras-hub loads with our logits (LoRA merged), and load back equal.

keras-hub feeds PaliGemma's text apart from the image ([image, text] inside its backbone, `response_mask` the
suffix); we put the image token at every image slot and `prefix_mask` over image + prefix. Gemma 3 takes
`vision_indices` / `vision_mask` in keras-hub, the image token at the slots here.

keras-hub 0.32 bounds its sliding windows by a symmetric band, transformers (our reference) only the past and
never PaliGemma's prefix: the two disagreement tests pin where (gemma_tune.checkpoints.keras_hub, "Where keras-hub
0.32 differs"); the parity tests use windows where they agree.
"""

import json
import shutil

import keras
import keras_hub
import numpy as np
import pytest

from gemma_tune.checkpoints import keras_hub as kh
from gemma_tune.checkpoints.keras_hub import (architecture_from_keras_hub, keras_hub_backbone_config,
                                              load_keras_hub_preset, read_keras_hub_architecture,
                                              write_keras_hub_preset)
from gemma_tune.errors import CheckpointError
from gemma_tune.loading import load_model_and_tokenizer, source_architecture
from gemma_tune.models import build_model, enable_lora, get_variable, lora_projections
from gemma_tune.tokenizer import GemmaTokenizer

TOKENIZER = "data/tiny/tokenizer.model"  # 512 pieces, no <img>
TOLERANCE = 1e-4
VOCAB = 512
BATCH, IMAGE, PATCH = 2, 28, 7  # 4×4 patches
PALI_TOKENS = (IMAGE // PATCH) ** 2  # 16: PaliGemma projects every patch
TEXT = 12  # PaliGemma text after the image
PREFIX_TEXT = 3  # <bos>, two prompt tokens (the prefix), then the suffix

DECODER = dict(vocabulary_size=VOCAB, num_query_heads=4, hidden_dim=32, head_dim=8, num_key_value_heads=2)
VIT = dict(vit_patch_size=PATCH, vit_num_heads=2, vit_hidden_dim=16, vit_num_layers=2, vit_intermediate_dim=24)
PALIGEMMA1 = dict(DECODER, **VIT, image_size=IMAGE, num_layers=2, intermediate_dim=128)
# Window 20 > image + prefix (19) < sequence (28): the window bounds the suffix, where keras-hub agrees.
PALIGEMMA2 = dict(PALIGEMMA1, use_post_ffw_norm=True, use_post_attention_norm=True, attention_logit_soft_cap=50.0,
                  final_logit_soft_cap=30.0, use_sliding_window_attention=True, sliding_window_size=20)
GEMMA3_VISION = dict(image_size=IMAGE, patch_size=PATCH, num_heads=2, hidden_dim=16, num_layers=2,
                     intermediate_dim=24, output_dim=32, pool_size=2)  # 2×2 pooling: 4 soft tokens per image
# Six layers (five sliding, one global); window 4 = tokens per image: keras-hub agrees with transformers.
GEMMA3 = dict(DECODER, image_size=IMAGE, num_layers=6, intermediate_dim=64, use_query_key_norm=True,
              use_post_ffw_norm=True, use_post_attention_norm=True, use_sliding_window_attention=True,
              sliding_window_size=4, global_rope_scaling_factor=8.0)
# One Gemma 3 row: text, two images between <start_of_image> (6) and <end_of_image> (7), text; -1 = image slot.
GEMMA3_ROW = [2, 20, 21, 6, -1, -1, -1, -1, 7, 30, 31, 32, 33, 6, -1, -1, -1, -1, 7, 40, 41, 42, 43, 44, 45, 46, 47, 48]


def _randomise(backbone, seed):
    """Every variable (norm scales, LayerNorm gammas/betas and biases included) drawn from N(0, 0.2²)."""
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        variable.assign(rng.normal(0.0, 0.2, variable.shape).astype("float32"))


def _numpy(x):
    return keras.ops.convert_to_numpy(x).astype(np.float64)


def _paligemma_backbone(config):
    return keras_hub.models.PaliGemmaBackbone(**config, dtype="float32")


def _gemma3_backbone(config, window=None):
    encoder = keras_hub.models.Gemma3VisionEncoder(**GEMMA3_VISION, dtype="float32")
    config = dict(config, sliding_window_size=window or config["sliding_window_size"])
    return keras_hub.models.Gemma3Backbone(**config, vision_encoder=encoder, dtype="float32")


def _save_preset(backbone, directory):
    """A keras-hub CausalLM preset (backbone, tokenizer, preprocessor) as keras-hub writes it."""
    models = keras_hub.models
    if isinstance(backbone, models.PaliGemmaBackbone):
        preprocessor = models.PaliGemmaCausalLMPreprocessor(tokenizer=models.PaliGemmaTokenizer(proto=TOKENIZER))
        task = models.PaliGemmaCausalLM(backbone=backbone, preprocessor=preprocessor)
    else:
        tokenizer = models.Gemma3Tokenizer(proto=TOKENIZER, has_vision_tokens=False)
        task = models.Gemma3CausalLM(backbone=backbone,
                                     preprocessor=models.Gemma3CausalLMPreprocessor(tokenizer=tokenizer))
    task.save_to_preset(str(directory))


# ------------------------------------------------------------------------------------------ inputs


def _paligemma_batch(seed):
    """(keras-hub inputs, our inputs, real text positions [B, TEXT]): row 1 right-padded."""
    rng = np.random.default_rng(seed)
    text = rng.integers(13, VOCAB, (BATCH, TEXT)).astype("int32")
    padding = np.ones((BATCH, TEXT), "int32")
    padding[1, 9:] = 0
    text *= padding
    response = np.zeros((BATCH, TEXT), "int32")
    response[:, PREFIX_TEXT:] = 1
    response *= padding
    images = rng.uniform(-1, 1, (BATCH, IMAGE, IMAGE, 3)).astype("float32")
    theirs = {"images": images, "token_ids": text, "padding_mask": padding, "response_mask": response}
    image = np.ones((BATCH, PALI_TOKENS), "int32")
    ours = {"token_ids": np.concatenate([image * VOCAB, text], 1), "images": images[:, None],
            "padding_mask": np.concatenate([image, padding], 1),
            "prefix_mask": np.concatenate([image, padding * (1 - response)], 1)}
    return theirs, ours, padding.astype(bool)


def _paligemma_reference(backbone, theirs):
    """keras-hub's PaliGemmaCausalLM logits (the tied embedding's reverse, soft-capped) over the text."""
    hidden = backbone(theirs)
    return _numpy(backbone.token_embedding(hidden, reverse=True))[:, PALI_TOKENS:]


def _gemma3_batch(seed, image_token_id):
    """(keras-hub inputs, our inputs): two rows of GEMMA3_ROW, two images each."""
    rng = np.random.default_rng(seed)
    ids = np.array([GEMMA3_ROW, GEMMA3_ROW], "int32")
    ids[1, 1:3] = [50, 51]
    slots = ids == -1
    images = rng.uniform(-1, 1, (BATCH, 2, IMAGE, IMAGE, 3)).astype("float32")
    padding = np.ones_like(ids)
    theirs = {"token_ids": np.where(slots, 0, ids).astype("int32"), "padding_mask": padding, "images": images,
              "vision_indices": np.stack([np.flatnonzero(row) for row in slots]).astype("int32"),
              "vision_mask": slots.astype("int32")}
    ours = {"token_ids": np.where(slots, image_token_id, ids).astype("int32"), "images": images,
            "padding_mask": padding}
    return theirs, ours


def _gemma3_reference(backbone, theirs):
    return _numpy(backbone.token_embedding(backbone(theirs), reverse=True))


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_jax_matmul_precision():
    """On JAX, conftest's exact_float32_matmuls for the whole module, fixtures included: the matmul precision is
    part of every compiled op's cache key, so one setting compiles each op once (half this module's time)."""
    if keras.backend.backend() != "jax":
        yield
        return
    import jax

    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module", params=["paligemma1", "paligemma2", "gemma3"])
def preset(request, tmp_path_factory):
    """(name, keras-hub backbone, preset directory, our model loaded from it, its tokenizer)."""
    name = request.param
    if name == "gemma3":
        backbone = _gemma3_backbone(GEMMA3)
    else:
        backbone = _paligemma_backbone(PALIGEMMA1 if name == "paligemma1" else PALIGEMMA2)
    _randomise(backbone, seed=len(name))
    directory = tmp_path_factory.mktemp(name)
    _save_preset(backbone, directory)
    model, tokenizer = load_model_and_tokenizer(directory)  # dispatches to load_keras_hub_preset
    return name, backbone, directory, model, tokenizer


def _batch_and_reference(name, backbone, model, seed=1):
    """(our inputs, keras-hub's logits [B, T, V] on our positions, mask of the positions compared [B, T])."""
    if name == "gemma3":
        theirs, ours = _gemma3_batch(seed, model.architecture.vision.image_token_id)
        return ours, _gemma3_reference(backbone, theirs), np.ones(ours["token_ids"].shape, bool)
    theirs, ours, text = _paligemma_batch(seed)
    compared = np.concatenate([np.zeros((BATCH, PALI_TOKENS), bool), text], 1)
    reference = np.zeros((*compared.shape, VOCAB))
    reference[:, PALI_TOKENS:] = _paligemma_reference(backbone, theirs)
    return ours, reference, compared


def _diff(a, b, where):
    return float(np.abs(a - b)[where].max())


# ------------------------------------------------------------------------------------------ tests


def test_same_logits_as_keras_hub(preset, exact_float32_matmuls):
    name, backbone, _, model, tokenizer = preset
    arch = model.architecture
    assert arch.family == {"paligemma1": "gemma", "paligemma2": "gemma2", "gemma3": "gemma3"}[name]
    vision = arch.vision
    assert (vision.image_size, vision.patch_size, vision.num_layers, vision.hidden_size, vision.num_heads,
            vision.intermediate_size, vision.layer_norm_eps) == (IMAGE, PATCH, 2, 16, 2, 24, 1e-6)
    # The HF conventions: PaliGemma's <image> = vocabulary_size (outside the embedding, looked up as 0);
    # Gemma 3's <image_soft_token> 262144 (this tokenizer has no <img>).
    assert (vision.tokens_per_image, vision.image_token_id) == (
        (4, 262144) if name == "gemma3" else (PALI_TOKENS, VOCAB))
    assert isinstance(tokenizer, GemmaTokenizer) and tokenizer.vocab_size == VOCAB
    ours_inputs, reference, compared = _batch_and_reference(name, backbone, model)
    assert np.abs(reference[compared]).max() > 1.0  # logits of a size where a wrong weight would show
    logits = _numpy(model(ours_inputs))
    assert _diff(logits, reference, compared) <= TOLERANCE
    hidden = model(ours_inputs, return_hidden_states=True)  # the chunked loss's path: the same logits
    assert _diff(_numpy(model.logits_from_hidden_states(hidden)), reference, compared) <= TOLERANCE


def test_every_weight_lands_where_keras_hub_keeps_it(preset):
    _, backbone, _, model, _ = preset
    theirs = {v.path: keras.ops.convert_to_numpy(v) for v in backbone.weights}
    mapped = kh.tensors(model.architecture)
    assert {p for _, p, _ in mapped} == set(theirs)
    assert sum(1 for ours, _, _ in mapped if ours.startswith("vision.")) == sum(
        1 for p in theirs if not p.startswith(("token_embedding", "decoder_block", "final_normalization")))
    for ours, their_path, layout in mapped:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(get_variable(model, ours)),
                                      kh.to_ours(theirs[their_path], layout))


def test_export_round_trip(preset, tmp_path, exact_float32_matmuls):
    """ours -> keras-hub preset: keras-hub's variables are the original ones (bit-exact); with LoRA on every
    projection the export is merged and keras-hub's backbone computes our logits; loading it back gives the same
    architecture (image token included, recorded in metadata.json) and the same logits."""
    name, backbone, directory, _, _ = preset
    model, tokenizer = load_keras_hub_preset(directory)  # a copy of our own to put LoRA on
    plain = tmp_path / "plain"
    write_keras_hub_preset(model, tokenizer, plain)
    config = json.loads((plain / "config.json").read_text())
    assert config["class_name"] == type(backbone).__name__
    assert json.loads((plain / "metadata.json").read_text())["gemma_tune"]["image_token_id"] == (
        model.architecture.vision.image_token_id)
    again = keras_hub.models.Backbone.from_preset(str(plain))
    original = {v.path: keras.ops.convert_to_numpy(v) for v in backbone.weights}
    exported = {v.path: keras.ops.convert_to_numpy(v) for v in again.weights}
    assert set(exported) == set(original)
    for path, value in original.items():
        np.testing.assert_array_equal(exported[path], value, err_msg=path)
    del again

    enable_lora(model, rank=2, alpha=4.0)
    rng = np.random.default_rng(5)
    for _, layer in lora_projections(model):
        layer.lora_kernel_b.assign(rng.normal(0, 0.3, layer.lora_kernel_b.shape).astype("float32"))
    merged = tmp_path / "merged"
    write_keras_hub_preset(model, tokenizer, merged)
    theirs_model = keras_hub.models.Backbone.from_preset(str(merged))
    ours_inputs, reference, compared = _batch_and_reference(name, theirs_model, model, seed=2)
    logits = _numpy(model(ours_inputs))
    _, before, _ = _batch_and_reference(name, backbone, model, seed=2)
    assert _diff(reference, before, compared) > 1e-2  # the adapters changed the model
    assert _diff(logits, reference, compared) <= TOLERANCE
    assert GemmaTokenizer(merged / "assets/tokenizer/vocabulary.spm").encode("the sky is blue") == tokenizer.encode("the sky is blue")

    back, _ = load_model_and_tokenizer(merged)
    assert back.architecture == model.architecture
    assert source_architecture(merged) == model.architecture  # recipe validation reads the same
    assert _diff(_numpy(back(ours_inputs)), logits, compared) <= TOLERANCE


@pytest.mark.parametrize("preset", ["gemma3"], indirect=True)
def test_gemma3_window_shorter_than_an_image_differs_from_transformers(preset, exact_float32_matmuls):
    """keras-hub ANDs the band |i - j| < window onto its mask, so an image token does not see the tokens of its
    own image >= window ahead; transformers (and we) bound only the past: AND(j > i - window, OR(causal, image)).
    Text before the first image is unaffected; the image tokens and everything after them differ."""
    _, backbone, _, model, _ = preset
    narrow = _gemma3_backbone(GEMMA3, window=2)
    for target, source in zip(narrow.weights, backbone.weights):
        target.assign(source)
    arch = model.architecture.model_copy(update={"sliding_window": 2})
    ours = build_model(arch)
    for path, _, _ in kh.tensors(arch):
        get_variable(ours, path).assign(get_variable(model, path))
    theirs_inputs, ours_inputs = _gemma3_batch(3, arch.vision.image_token_id)
    diff = np.abs(_numpy(ours(ours_inputs)) - _gemma3_reference(narrow, theirs_inputs)).max(axis=(0, 2))
    first_image = GEMMA3_ROW.index(-1)
    assert diff[:first_image].max() <= TOLERANCE
    assert diff[first_image] > 0.05  # its image's tokens 2 and 3 ahead are masked in keras-hub


@pytest.mark.parametrize("preset", ["paligemma2"], indirect=True)
def test_paligemma2_prefix_longer_than_the_window_differs_from_transformers(preset, exact_float32_matmuls):
    """keras-hub's band also cuts PaliGemma 2's prefix (image + prompt) on sliding layers; transformers ORs the
    prefix block onto the sliding causal mask, so the whole prefix sees itself (896 px: 4096 image tokens = the
    window)."""
    _, backbone, _, model, _ = preset
    narrow = _paligemma_backbone(dict(PALIGEMMA2, sliding_window_size=8))
    for target, source in zip(narrow.weights, backbone.weights):
        target.assign(source)
    arch = model.architecture.model_copy(update={"sliding_window": 8})
    ours = build_model(arch)
    for path, _, _ in kh.tensors(arch):
        get_variable(ours, path).assign(get_variable(model, path))
    theirs_inputs, ours_inputs, text = _paligemma_batch(4)
    diff = _diff(_numpy(ours(ours_inputs))[:, PALI_TOKENS:], _paligemma_reference(narrow, theirs_inputs), text)
    assert diff > 0.05


# ------------------------------------------------------------------------------------------ configuration


def _spm_with_image_placeholder(directory):
    """A tiny SentencePiece model that has Gemma 3's <img> piece."""
    import sentencepiece as spm

    text = directory / "text.txt"
    text.write_text("\n".join(["the sky is blue", "the grass is green", "an image of a cat"] * 20))
    prefix = directory / "spm"
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(prefix), vocab_size=20, model_type="word", hard_vocab_limit=False,
                                   user_defined_symbols=["<img>", "<start_of_image>", "<end_of_image>"],
                                   pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2)
    processor = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    return f"{prefix}.model", int(processor.piece_to_id("<img>"))


def test_image_token_comes_from_metadata_then_the_tokenizer_then_the_default(tmp_path):
    config = {"class_name": "Gemma3Backbone", "registered_name": "keras_hub>Gemma3Backbone",
              "config": dict(GEMMA3, vision_encoder={"class_name": "Gemma3VisionEncoder", "config": GEMMA3_VISION})}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_keras_hub_architecture(tmp_path).vision.image_token_id == 262144
    model_file, img = _spm_with_image_placeholder(tmp_path)
    (tmp_path / "assets/tokenizer").mkdir(parents=True)
    shutil.copyfile(model_file, tmp_path / "assets/tokenizer/vocabulary.spm")
    assert read_keras_hub_architecture(tmp_path).vision.image_token_id == img
    (tmp_path / "metadata.json").write_text(json.dumps({"keras_version": "3", "gemma_tune": {"image_token_id": 77}}))
    assert read_keras_hub_architecture(tmp_path).vision.image_token_id == 77
    pali = {"class_name": "PaliGemmaBackbone", "registered_name": "keras_hub>PaliGemmaBackbone",
            "config": dict(PALIGEMMA1, vocabulary_size=257152)}
    other = tmp_path / "pali"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(pali))
    arch = read_keras_hub_architecture(other)
    assert (arch.vocab_size, arch.vision.image_token_id, arch.prefix_lm) == (257152, 257152, True)


def test_architecture_mapping_and_back():
    pali = architecture_from_keras_hub("PaliGemmaBackbone", dict(PALIGEMMA2, vit_intermediate_dim=None))
    assert (pali.family, pali.intermediate_size, pali.sliding_window, pali.vision.intermediate_size) == (
        "gemma2", 64, 20, 4304)  # keras-hub's default ViT MLP width
    g3 = architecture_from_keras_hub("Gemma3Backbone", dict(GEMMA3, vision_encoder={
        "class_name": "Gemma3VisionEncoder", "config": dict(GEMMA3_VISION, pool_size=4)}))
    assert (g3.vision.tokens_per_image, g3.vision.pool_size) == (1, 4)
    for arch in (pali, g3):
        class_name, config, fold = keras_hub_backbone_config(arch)
        assert fold == 1.0
        assert architecture_from_keras_hub(class_name, config, image_token_id=arch.vision.image_token_id) == arch


@pytest.mark.parametrize("class_name, config, message", [
    ("PaliGemmaBackbone", dict(PALIGEMMA1, vit_pooling="map"), "vit_pooling='map'"),
    ("PaliGemmaBackbone", dict(PALIGEMMA1, vit_classifier_activation="softmax"), "vit_classifier_activation"),
    ("PaliGemmaBackbone", dict(PALIGEMMA1, image_size=30), "not a multiple of vit_patch_size"),
    ("PaliGemmaBackbone", {k: v for k, v in PALIGEMMA1.items() if k != "vit_num_layers"}, "no 'vit_num_layers'"),
    ("Gemma3Backbone", dict(GEMMA3, vision_encoder={"class_name": "Gemma3VisionEncoder", "config": dict(
        GEMMA3_VISION, layer_norm_epsilon=1e-5)}), "layer_norm_epsilon=1e-05"),
    ("Gemma3Backbone", dict(GEMMA3, vision_encoder={"class_name": "Gemma3VisionEncoder", "config": dict(
        GEMMA3_VISION, pool_size=3)}), "multiple of pool_size"),
    ("Gemma3Backbone", dict(GEMMA3, vision_encoder={"class_name": "Gemma3VisionEncoder", "config": dict(
        GEMMA3_VISION, output_dim=16)}), "output_dim=16 differs"),
    ("Gemma3Backbone", dict(GEMMA3, vision_encoder={"class_name": "SigLIP", "config": {}}), "is not a Gemma3Vision"),
])
def test_vision_configs_we_cannot_reproduce_are_refused(class_name, config, message):
    with pytest.raises(CheckpointError, match=message) as e:
        architecture_from_keras_hub(class_name, config, where="p/config.json")
    assert e.value.where == "p/config.json"


def test_export_refuses_a_vision_epsilon_keras_hub_hard_codes():
    arch = architecture_from_keras_hub("PaliGemmaBackbone", PALIGEMMA1)
    arch = arch.model_copy(update={"vision": arch.vision.model_copy(update={"layer_norm_eps": 1e-5})})
    with pytest.raises(CheckpointError, match="vision layer_norm_eps=1e-05"):
        keras_hub_backbone_config(arch)
