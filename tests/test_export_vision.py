"""Export of the vision models (PaliGemma 1, PaliGemma 2, Gemma 3) to transformers and PEFT, checked against the
real thing: `AutoProcessor.from_pretrained(export)` turns PIL images and prompts into inputs on which
`AutoModelForImageTextToText.from_pretrained(export)` gives our float32 logits (<= 1e-4), LoRA merged; a PEFT
adapter applied by `peft.PeftModel.from_pretrained` gives ours too; load_model reads both back; every preset's
config.json reads back to its architecture; presets match vision checkpoints field by field."""

import json

import keras
import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from safetensors import safe_open

from gemma_tune import load_model
from gemma_tune.checkpoints import hf_names
from gemma_tune.checkpoints.hf_config import architecture_from_hf, hf_config
from gemma_tune.config.presets import preset_architecture, preset_names
from gemma_tune.data.images import FAMILY_RESAMPLE, preprocess
from gemma_tune.errors import CheckpointError
from gemma_tune.export import export_model
from gemma_tune.loading import architecture_mismatch, matching_presets
from gemma_tune.models import build_model, enable_lora, float_weight, get_variable, lora_projections
from gemma_tune.models.config import Architecture
from gemma_tune.tokenizer import load_tokenizer

TOL = 1e-4
IMAGE = 512  # the tiny tokenizer has 512 pieces: the image token is the first added one
FAMILIES = ("paligemma", "paligemma2", "gemma3")
CLASSES = {"paligemma": "PaliGemmaForConditionalGeneration", "paligemma2": "PaliGemmaForConditionalGeneration",
           "gemma3": "Gemma3ForConditionalGeneration"}


def tiny_arch(family: str) -> Architecture:
    fields = dict(family={"paligemma": "gemma", "paligemma2": "gemma2", "gemma3": "gemma3"}[family], vocab_size=520,
                  hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  max_position_embeddings=256,
                  vision=dict(image_size=28, patch_size=14, num_layers=2, hidden_size=16, num_heads=2,
                              intermediate_size=24, tokens_per_image=4, image_token_id=IMAGE))
    if family == "paligemma2":
        fields.update(sliding_window=4, sliding_window_pattern=2, attn_logit_softcap=5.0, final_logit_softcap=3.0,
                      use_post_attention_norm=True, use_post_ffw_norm=True, query_pre_attn_scalar=12)
    if family == "gemma3":
        fields.update(sliding_window=3, sliding_window_pattern=2, use_post_attention_norm=True, use_post_ffw_norm=True,
                      use_qk_norm=True, query_pre_attn_scalar=12, rope_theta=1000.0, rope_local_theta=100.0,
                      rope_scaling_factor=2.0)
        fields["vision"] = dict(fields["vision"], image_size=56)  # 4x4 patches pooled 2x2 into 4 soft tokens
    return Architecture(**fields)


def random_model(family: str, seed: int = 0):
    model = build_model(tiny_arch(family))
    rng = np.random.RandomState(seed)
    for v in model.weights:
        v.assign(rng.normal(0.0, 0.1 if len(v.shape) == 1 else 0.2, v.shape).astype(np.float32))
    return model


def add_lora(model, seed: int = 1, targets=("q", "k", "v", "o", "gate", "up", "down")):
    enable_lora(model, rank=4, alpha=8.0, targets=targets)
    rng = np.random.RandomState(seed)
    for _, layer in lora_projections(model):
        for v in (layer.lora_kernel_a, layer.lora_kernel_b):
            v.assign(rng.normal(0.0, 0.2, v.shape).astype(np.float32))
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("data/tiny/tokenizer.model")


def pictures():
    rng = np.random.default_rng(5)
    return [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 52), (33, 30),
                                                                                              (61, 45))]


def processed(family: str, processor):
    """The processor's inputs for two rows (the second with two images for Gemma 3; PaliGemma with suffixes) and
    the images in our layout [B, N, S, S, 3], preprocessed by gemma_tune.data.images."""
    a, b, c = pictures()
    if family == "gemma3":
        texts = ["<start_of_image> describe this", "one <start_of_image> two <start_of_image> same?"]
        per_row = [[a], [b, c]]
        out = processor(images=per_row, text=texts, return_tensors="np", padding="longest")
    else:
        per_row = [[a], [b]]
        out = processor(images=[a, b], text=["caption en", "answer en what is it"], suffix=["a cat", "two"],
                        return_tensors="np", padding="longest")
    size = processor.image_processor.size["height"]
    resample = FAMILY_RESAMPLE["gemma3" if family == "gemma3" else "paligemma"]
    images = np.zeros((2, max(map(len, per_row)), size, size, 3), np.float32)
    for r, row in enumerate(per_row):
        for k, picture in enumerate(row):
            images[r, k] = preprocess(picture, size, resample)
    real = np.concatenate([images[r, :len(row)] for r, row in enumerate(per_row)])
    if processor.image_processor.backend == "pil":  # torchvision resizes a little differently
        assert np.abs(real - out["pixel_values"].transpose(0, 2, 3, 1)).max() <= 1e-6
    return out, images


def transformers_logits(model, inputs):
    with torch.no_grad():
        return model(input_ids=torch.tensor(inputs["input_ids"], dtype=torch.long),
                     attention_mask=torch.tensor(inputs["attention_mask"]),
                     pixel_values=torch.tensor(inputs["pixel_values"]),
                     token_type_ids=torch.tensor(inputs["token_type_ids"])).logits.float().numpy()


def our_logits(model, family, inputs, images):
    mask = inputs["attention_mask"].astype(np.int32)
    ours = {"token_ids": inputs["input_ids"].astype(np.int32), "padding_mask": mask, "images": images}
    if family != "gemma3":  # the prefix: every real token before the suffix
        ours["prefix_mask"] = mask * (1 - inputs["token_type_ids"].astype(np.int32))
    return np.asarray(keras.ops.convert_to_numpy(model.predict_on_batch(ours)), np.float32)


def hf_model(path):
    model, info = transformers.AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_export_runs_in_transformers_with_its_processor(family, tokenizer, tmp_path):
    model = add_lora(random_model(family))
    out = export_model(model, tokenizer, tmp_path / "hf", "safetensors")
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == ("Gemma3Processor" if family == "gemma3" else "PaliGemmaProcessor")
    inputs, images = processed(family, processor)
    ids = inputs["input_ids"]
    assert (ids == IMAGE).sum(axis=1).tolist() == ([4, 8] if family == "gemma3" else [4, 4])
    if family == "gemma3":  # each image between <start_of_image> and <end_of_image>
        boi, eoi = tokenizer.token_to_id("<start_of_image>"), tokenizer.token_to_id("<end_of_image>")
        assert (ids == boi).sum() == (ids == eoi).sum() == 3
    reference = hf_model(out)
    assert type(reference).__name__ == CLASSES[family]
    expected = transformers_logits(reference, inputs)
    real = inputs["attention_mask"].astype(bool)
    assert np.abs(expected[real]).max() > 0.5
    diff = np.abs(our_logits(model, family, inputs, images)[real] - expected[real]).max()
    assert diff <= TOL, diff


def test_config_and_files_are_the_hubs_layout(tokenizer, tmp_path):
    paligemma = export_model(random_model("paligemma2"), tokenizer, tmp_path / "pg", "safetensors")
    config = json.loads((paligemma / "config.json").read_text())
    assert config["architectures"] == ["PaliGemmaForConditionalGeneration"] and config["model_type"] == "paligemma"
    assert (config["image_token_index"], config["projection_dim"], config["hidden_size"]) == (IMAGE, 32, 32)
    assert config["text_config"]["model_type"] == "gemma2" and config["text_config"]["num_image_tokens"] == 4
    assert config["text_config"]["use_bidirectional_attention"] is True  # what transformers 5 sets for PaliGemma
    vision = config["vision_config"]
    assert (vision["model_type"], vision["vision_use_head"], vision["image_size"], vision["patch_size"]) == (
        "siglip_vision_model", False, 28, 14)
    with safe_open(paligemma / "model.safetensors", "np") as f:
        names = set(f.keys())
        kernel = f.get_tensor("vision_tower.vision_model.embeddings.patch_embedding.weight")
    assert kernel.shape == (16, 3, 14, 14)
    assert {n.split(".")[0] for n in names} == {"language_model", "vision_tower", "multi_modal_projector"}
    assert all(n.startswith(("language_model.model.", "vision_tower.vision_model.", "multi_modal_projector.linear."))
               for n in names)
    assert "language_model.model.layers.1.self_attn.q_proj.weight" in names
    preprocessor = json.loads((paligemma / "preprocessor_config.json").read_text())
    assert (preprocessor["image_processor_type"], preprocessor["resample"], preprocessor["image_seq_length"],
            preprocessor["size"], preprocessor["image_mean"]) == ("SiglipImageProcessor", 3, 4,
                                                                  {"height": 28, "width": 28}, [0.5] * 3)
    assert json.loads((paligemma / "processor_config.json").read_text()) == {"image_seq_length": 4,
                                                                             "processor_class": "PaliGemmaProcessor"}
    tokens = json.loads((paligemma / "tokenizer_config.json").read_text())
    assert tokens["added_tokens_decoder"][str(IMAGE)]["content"] == "<image>"
    assert tokens["extra_special_tokens"] == {"image_token": "<image>"}

    gemma3 = export_model(random_model("gemma3"), tokenizer, tmp_path / "g3", "safetensors")
    config = json.loads((gemma3 / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForConditionalGeneration"] and config["model_type"] == "gemma3"
    assert (config["boi_token_index"], config["eoi_token_index"], config["image_token_index"],
            config["mm_tokens_per_image"]) == (tokenizer.token_to_id("<start_of_image>"),
                                               tokenizer.token_to_id("<end_of_image>"), IMAGE, 4)
    assert config["text_config"]["model_type"] == "gemma3_text" and config["vision_config"]["image_size"] == 56
    with safe_open(gemma3 / "model.safetensors", "np") as f:
        assert f.get_tensor("multi_modal_projector.mm_input_projection_weight").shape == (16, 32)
        assert f.get_tensor("multi_modal_projector.mm_soft_emb_norm.weight").shape == (16,)
    preprocessor = json.loads((gemma3 / "preprocessor_config.json").read_text())
    assert (preprocessor["image_processor_type"], preprocessor["resample"]) == ("Gemma3ImageProcessor", 2)
    assert "chat_template" in json.loads((gemma3 / "chat_template.json").read_text())
    assert json.loads((gemma3 / "tokenizer_config.json").read_text())["extra_special_tokens"] == {
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    processor = transformers.AutoProcessor.from_pretrained(gemma3)
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                         {"type": "text", "text": "hi"}]}],
                                           tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos><start_of_turn>user\n<start_of_image>hi<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize("family", ["paligemma", "gemma3"])
def test_round_trip_is_bit_exact(family, tokenizer, tmp_path):
    model = add_lora(random_model(family))
    for shard_size, name in ((None, "single"), (20_000, "sharded")):
        out = export_model(model, tokenizer, tmp_path / name, "safetensors", max_shard_size=shard_size)
        back = load_model(out)
        assert back.vision is not None and back.architecture == model.architecture
        for tensor in hf_names.checkpoint_map(model.architecture):
            assert np.array_equal(keras.ops.convert_to_numpy(get_variable(back, tensor.ours)),
                                  float_weight(model, tensor.ours)), tensor.ours
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert len(index["weight_map"]) == len(hf_names.checkpoint_map(model.architecture))


@pytest.mark.parametrize("family", ["paligemma2", "gemma3"])
def test_peft_adapter_of_a_vision_model(family, tokenizer, tmp_path):
    import peft

    model = random_model(family)
    base_dir = export_model(model, tokenizer, tmp_path / "base", "safetensors")
    model.checkpoint_source = str(base_dir)  # as load_model records it
    add_lora(model, targets=("q", "v", "down"))
    adapter = export_model(model, tokenizer, tmp_path / "adapter", "peft")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert config["exclude_modules"] == ".*vision_tower.*" and config["task_type"] == "CAUSAL_LM"
    with safe_open(adapter / "adapter_model.safetensors", "np") as f:
        names = set(f.keys())
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert len(names) == 2 * 3 * 2

    base = hf_model(base_dir)
    wrapped = peft.get_peft_model(hf_model(base_dir), peft.LoraConfig(  # what PEFT itself names them
        r=4, target_modules=["q_proj", "v_proj", "down_proj"], exclude_modules=".*vision_tower.*"))
    assert {k.replace(".default", "") for k in wrapped.state_dict() if "lora_" in k} == names
    applied = peft.PeftModel.from_pretrained(base, adapter).eval()
    processor = transformers.AutoProcessor.from_pretrained(base_dir)
    inputs, images = processed(family, processor)
    expected = transformers_logits(applied, inputs)
    real = inputs["attention_mask"].astype(bool)
    assert np.abs(our_logits(model, family, inputs, images)[real] - expected[real]).max() <= TOL
    reloaded = load_model(adapter)  # the base it names (a vision checkpoint), then the adapter
    assert reloaded.vision is not None and len(list(lora_projections(reloaded))) == 3 * 2
    assert np.abs(our_logits(reloaded, family, inputs, images)[real] - expected[real]).max() <= TOL


def test_adapters_written_by_peft_on_a_vision_model(tokenizer, tmp_path):
    import peft

    base_dir = export_model(random_model("gemma3"), tokenizer, tmp_path / "base", "safetensors")
    for name, exclude in (("decoder", ".*vision_tower.*"), ("everywhere", None)):
        config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["k_proj", "up_proj"], exclude_modules=exclude)
        applied = peft.get_peft_model(hf_model(base_dir), config).eval()
        torch.manual_seed(0)
        with torch.no_grad():
            for key, p in applied.named_parameters():
                if "lora_" in key:
                    p.normal_(0.0, 0.2)
        applied.save_pretrained(tmp_path / name)
        if exclude is None:  # target names that reach SigLIP's k_proj too
            with pytest.raises(CheckpointError, match="LoRA on the vision tower.*vision_tower.*is not supported"):
                load_model(tmp_path / name)
            continue
        loaded = load_model(tmp_path / name)
        inputs, images = processed("gemma3", transformers.AutoProcessor.from_pretrained(base_dir))
        real = inputs["attention_mask"].astype(bool)
        diff = np.abs(our_logits(loaded, "gemma3", inputs, images)[real] - transformers_logits(applied, inputs)[real])
        assert diff.max() <= TOL


def test_an_image_token_the_tokenizer_cannot_give_is_refused(tokenizer, tmp_path):
    arch = tiny_arch("paligemma")
    model = build_model(arch.model_copy(update={"vision": arch.vision.model_copy(update={"image_token_id": 515})}))
    with pytest.raises(CheckpointError, match="image_token_id is 515, but the tokenizer gives <image> 512"):
        export_model(model, tokenizer, tmp_path / "out", "safetensors")
    assert not (tmp_path / "out").exists()


VISION_PRESETS = [name for name in preset_names() if preset_architecture(name).vision is not None]


def test_vision_presets():
    assert {"paligemma_3b_224", "paligemma2_10b_896", "gemma3_4b", "gemma3_12b", "gemma3_27b"} <= set(VISION_PRESETS)
    for name in ("gemma3_4b", "gemma3_12b", "gemma3_27b"):
        vision = preset_architecture(name).vision
        assert (vision.image_size, vision.tokens_per_image, vision.image_token_id) == (896, 256, 262144), name


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_config_reads_back(name):
    """hf_config of each preset is read by transformers' config class to the same model, and back to the same
    Architecture (vision tower included), with no weights."""
    arch = preset_architecture(name)
    config = hf_config(arch)
    ours = architecture_from_hf(json.loads(json.dumps(config)))
    assert architecture_mismatch(ours, arch, "preset", recipe=False) is None, name
    assert ours.vision == arch.vision and ours.max_position_embeddings == arch.max_position_embeddings, name
    classes = {"paligemma": transformers.PaliGemmaConfig, "gemma3": transformers.Gemma3Config,
               "gemma3_text": transformers.Gemma3TextConfig, "gemma2": transformers.Gemma2Config,
               "gemma": transformers.GemmaConfig}
    theirs = classes[config["model_type"]].from_dict(json.loads(json.dumps(config))).to_dict()
    back = architecture_from_hf(theirs)
    assert architecture_mismatch(back, arch, "preset", recipe=False) is None, name
    assert back.vision == arch.vision, name
    assert name in matching_presets(back), name


def test_presets_and_vision_checkpoints():
    vision = preset_architecture("gemma3_4b")
    text = vision.model_copy(update={"vision": None})
    assert "gemma3_4b" in matching_presets(vision) and "gemma3_4b" not in matching_presets(text)
    assert "paligemma_3b_224" in matching_presets(preset_architecture("paligemma_3b_224"))
    # a recipe that asks for the text decoder of a vision checkpoint loads it
    assert architecture_mismatch(vision, text, "the recipe's model.architecture", recipe=True) is None
    # a vision tower the checkpoint does not have is a mismatch
    problem = architecture_mismatch(text, vision, "preset 'gemma3_4b'", recipe=False)
    assert "vision tower: the checkpoint has none, the preset states one" in problem
    other = preset_architecture("paligemma_3b_448")
    problem = architecture_mismatch(preset_architecture("paligemma_3b_224"), other, "preset 'paligemma_3b_448'",
                                    recipe=False)
    assert "vision.image_size: checkpoint 224 vs preset 448" in problem
    assert "it matches preset paligemma_3b_224" in problem
