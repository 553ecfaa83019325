"""Parity with transformers' vision-language models: tiny random PaliGemma 1 (Gemma text), PaliGemma 2 (Gemma 2
text: sliding window shorter than the sequence, both soft-caps) and Gemma 3 multimodal (two images in one row,
sliding window shorter than an image) checkpoints load through `gemma_tune.load_model` in each key layout —
transformers 5's `save_pretrained` (`vision_tower.…`, with SigLIP's unused pooling head), the hub's
(`vision_tower.vision_model.…`) and the in-memory names (`model.language_model.…`, `lm_head.weight`) — and give
transformers' float32 logits (max abs diff <= 1e-4) on a right-padded batch of two with images; broken vision
checkpoints are refused with the tensor named; a text-only architecture loads the decoder alone; greedy generation
with images (`gemma_tune.generate.generate_ids`, batched, left-padded) gives transformers' `generate` tokens.

transformers runs with eager attention and `token_type_ids`: transformers 5.24 gives PaliGemma's text model
`use_bidirectional_attention: True`, so SDPA without a materialised mask would attend bidirectionally."""

import shutil

import keras
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from gemma_tune import load_model
from gemma_tune.checkpoints import hf_names
from gemma_tune.checkpoints.hf_config import read_hf_architecture
from gemma_tune.models import get_variable
from gemma_tune.errors import CheckpointError

TOL = 1e-4
VOCAB, IMAGE = 600, 512
FAMILIES = ("paligemma", "paligemma2", "gemma3")
LAYOUTS = ("transformers5", "hub", "in_memory")
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, vocab_size=VOCAB, max_position_embeddings=128)
VISION = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, patch_size=14)
BOI, EOI = 5, 6


def hf_config(family: str):
    if family == "paligemma":
        return transformers.PaliGemmaConfig(text_config=dict(TEXT, model_type="gemma"),
                                            vision_config=dict(VISION, image_size=28, vision_use_head=False),
                                            image_token_index=IMAGE, projection_dim=32)
    if family == "paligemma2":  # the pooling head is in the checkpoint and unused
        return transformers.PaliGemmaConfig(
            text_config=dict(TEXT, model_type="gemma2", sliding_window=4, query_pre_attn_scalar=12,
                             attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
            vision_config=dict(VISION, image_size=28, vision_use_head=True), image_token_index=IMAGE,
            projection_dim=32)
    return transformers.Gemma3Config(
        text_config=dict(TEXT, sliding_window=3, layer_types=["sliding_attention", "full_attention"],
                         query_pre_attn_scalar=12, rope_parameters={
                             "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
        vision_config=dict(VISION, image_size=56, vision_use_head=False), mm_tokens_per_image=4,
        image_token_index=IMAGE, boi_token_index=BOI, eoi_token_index=EOI)


def make_reference(family: str):
    torch.manual_seed(FAMILIES.index(family))
    config = hf_config(family)
    model = transformers.AutoModelForImageTextToText.from_config(config, attn_implementation="eager",
                                                                 dtype=torch.float32).eval()
    with torch.no_grad():  # every parameter random, norms and biases included, so a wrong mapping shows; a small
        for name, p in model.named_parameters():  # embedding, so that greedy decoding does not repeat one token
            p.normal_(0.0, 0.1 if p.ndim == 1 else 0.05 if "embed_tokens" in name else 0.2)
    return model


def rename(tensors: dict, old: str, new: str) -> dict:
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in tensors.items()}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """{family: (transformers model, {layout: checkpoint dir})}, made once per module."""
    made = {}
    for family in FAMILIES:
        model = make_reference(family)
        dirs = {layout: tmp_path_factory.mktemp(f"{family}_{layout}") for layout in LAYOUTS}
        model.save_pretrained(dirs["transformers5"])
        saved = load_file(dirs["transformers5"] / "model.safetensors")
        assert any(k.startswith("language_model.model.") for k in saved)
        assert any(k.startswith("vision_tower.embeddings.") for k in saved)
        assert any(k.startswith("vision_tower.head.") for k in saved) == (family == "paligemma2")
        for layout in ("hub", "in_memory"):
            shutil.copy(dirs["transformers5"] / "config.json", dirs[layout])
        save_file(rename(saved, "vision_tower.", "vision_tower.vision_model."), dirs["hub"] / "model.safetensors",
                  metadata={"format": "pt"})
        memory = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        assert "lm_head.weight" in memory and any(k.startswith("model.vision_tower.") for k in memory)
        save_file(memory, dirs["in_memory"] / "model.safetensors", metadata={"format": "pt"})
        made[family] = (model, dirs)
    return made


@pytest.fixture(scope="module")
def loaded(references):
    """{family: our model from the transformers5 layout}, loaded once for the tests that only run it."""
    return {family: load_model(dirs["transformers5"]) for family, (_, dirs) in references.items()}


def batch(family: str):
    """(token ids, padding mask, token_type_ids, images [B, N, S, S, 3], pixel_values of the real images):
    two rows, the second shorter and right-padded."""
    rng = np.random.default_rng(7)
    text = lambda n: list(rng.integers(10, 500, n))  # noqa: E731
    if family == "gemma3":  # row 0: two images; row 1: one
        rows = [[2, *text(2), BOI, *[IMAGE] * 4, EOI, *text(3), BOI, *[IMAGE] * 4, EOI, *text(4)],
                [2, *text(1), BOI, *[IMAGE] * 4, EOI, *text(5)]]
        size, per_row = 56, [2, 1]
    else:  # PaliGemma: image tokens, <bos>, prefix, "\n" (the prefix), then the suffix
        rows = [[*[IMAGE] * 4, 2, *text(4), 108, *text(9)], [*[IMAGE] * 4, 2, *text(2), 108, *text(4)]]
        size, per_row = 28, [1, 1]
    length = max(map(len, rows))
    ids = np.zeros((2, length), np.int32)
    mask = np.zeros((2, length), np.int32)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = row
        mask[r, :len(row)] = 1
    if family == "gemma3":
        types = (ids == IMAGE).astype(np.int32)
    else:  # 0 over the prefix (through the "\n"), 1 over the suffix; padding as the suffix
        types = np.ones_like(ids)
        for r, row in enumerate(rows):
            types[r, :row.index(108) + 1] = 0
    images = np.zeros((2, max(per_row), size, size, 3), np.float32)
    for r, count in enumerate(per_row):
        images[r, :count] = rng.uniform(-1, 1, (count, size, size, 3))
    pixel_values = np.concatenate([images[r, :count] for r, count in enumerate(per_row)]).transpose(0, 3, 1, 2)
    return ids, mask, types, images, np.ascontiguousarray(pixel_values)


def reference_logits(model, family):
    ids, mask, types, _, pixels = batch(family)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                     pixel_values=torch.tensor(pixels), token_type_ids=torch.tensor(types)).logits.numpy()


def our_inputs(family):
    ids, mask, types, images, _ = batch(family)
    inputs = {"token_ids": ids, "padding_mask": mask, "images": images}
    if family != "gemma3":
        inputs["prefix_mask"] = mask * (1 - types)
    return inputs


def our_logits(model, family, inputs=None):
    """The model's logits, through `predict_on_batch` (one XLA compilation on JAX instead of op-by-op dispatch)."""
    return np.asarray(keras.ops.convert_to_numpy(model.predict_on_batch(inputs or our_inputs(family))), np.float32)


@pytest.fixture(scope="module")
def expected(references):
    return {family: reference_logits(model, family) for family, (model, _) in references.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_architecture_is_read_from_config(references, family):
    model, dirs = references[family]
    arch = read_hf_architecture(dirs["hub"])
    assert arch.family == {"paligemma": "gemma", "paligemma2": "gemma2", "gemma3": "gemma3"}[family]
    vision = arch.vision
    assert (vision.image_size, vision.patch_size, vision.num_layers, vision.hidden_size, vision.num_heads,
            vision.intermediate_size, vision.image_token_id) == ((56 if family == "gemma3" else 28), 14, 2, 16, 2, 24,
                                                                 IMAGE)
    assert vision.tokens_per_image == 4 and arch.vocab_size == VOCAB
    if family == "paligemma2":
        assert (arch.sliding_window, arch.attn_logit_softcap, arch.final_logit_softcap) == (4, 5.0, 3.0)
    if family == "gemma3":
        assert arch.rope_for_layer(0) == (100.0, 1.0) and arch.rope_for_layer(1) == (1000.0, 2.0)


@pytest.mark.parametrize("layout", ["transformers5", "hub"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(references, expected, loaded, family, layout):
    _, dirs = references[family]
    ours = loaded[family] if layout == "transformers5" else load_model(dirs[layout])
    real = batch(family)[1].astype(bool)
    reference = expected[family]
    assert np.abs(reference[real]).max() > 0.5  # logits far from zero: the comparison is not vacuous
    diff = np.abs(our_logits(ours, family)[real] - reference[real]).max()
    assert diff <= TOL, diff


def weights(model, paths):
    return {path: keras.ops.convert_to_numpy(get_variable(model, path)) for path in paths}


@pytest.mark.parametrize("family", FAMILIES)
def test_in_memory_names_load_the_same_weights(references, loaded, family):
    """The in-memory layout (`model.language_model.…`, `model.vision_tower.…`, a tied `lm_head.weight`) gives the
    very weights of the saved layout, whose logits are transformers' (above)."""
    _, dirs = references[family]
    paths = [t.ours for t in hf_names.checkpoint_map(loaded[family].architecture)]
    ours, theirs = weights(load_model(dirs["in_memory"]), paths), weights(loaded[family], paths)
    for path in paths:
        np.testing.assert_array_equal(ours[path], theirs[path], err_msg=path)


def test_images_matter(references, expected, loaded):
    """The comparison sees the vision tower: other pixels give other logits after the first image token."""
    inputs = our_inputs("gemma3")
    other = {**inputs, "images": inputs["images"][:, ::-1]}
    changed = our_logits(loaded["gemma3"], "gemma3", other)
    assert np.abs(changed[0, 3:20] - expected["gemma3"][0, 3:20]).max() > 1e-2


@pytest.mark.parametrize("family", ["paligemma2", "gemma3"])
def test_a_text_only_architecture_loads_the_decoder_alone(references, loaded, family):
    """What a recipe that asks for the text decoder of a vision checkpoint gets: the decoder's weights, no tower."""
    _, dirs = references[family]
    vision_model = loaded[family]
    text_arch = vision_model.architecture.model_copy(update={"vision": None})
    text_model = load_model(dirs["hub"], architecture=text_arch)
    assert text_model.vision is None
    paths = [t.ours for t in hf_names.name_map(text_arch)]
    ours, theirs = weights(text_model, paths), weights(vision_model, paths)
    for path in paths:
        np.testing.assert_array_equal(ours[path], theirs[path], err_msg=path)
    if family == "gemma3":
        ids = np.random.default_rng(3).integers(10, 500, (2, 9)).astype(np.int32)
        inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
        np.testing.assert_array_equal(our_logits(text_model, family, inputs), our_logits(vision_model, family, inputs))



def test_broken_vision_checkpoints_name_the_tensor(references, tmp_path, edited_copy):
    _, dirs = references["paligemma"]
    path = dirs["hub"]
    fc1 = "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"
    with pytest.raises(CheckpointError, match=f"missing tensors.*{fc1}"):
        load_model(edited_copy(path, tmp_path / "missing", lambda t: t.pop(fc1)))

    def extra(t):
        t["vision_tower.vision_model.encoder.layers.5.mlp.fc1.weight"] = t[fc1]
    with pytest.raises(CheckpointError, match="unexpected tensors.*vision tower of 2 layers.*layers.5.mlp.fc1"):
        load_model(edited_copy(path, tmp_path / "extra", extra))

    def wrong_shape(t):
        name = "vision_tower.vision_model.embeddings.patch_embedding.weight"
        t[name] = t[name][:, :, :7]
    with pytest.raises(CheckpointError, match=r"patch_embedding.weight has shape \[16, 3, 7, 14\].*\[16, 3, 14, 14\]"):
        load_model(edited_copy(path, tmp_path / "shape", wrong_shape))

    def untied(t):
        t["language_model.lm_head.weight"] = t["language_model.model.embed_tokens.weight"] + 1.0
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        load_model(edited_copy(path, tmp_path / "untied", untied))


def test_a_vision_preset_is_compared_field_by_field(references):
    _, dirs = references["paligemma"]
    with pytest.raises(CheckpointError, match="vision.image_size: checkpoint 28 vs preset 56"):
        load_model(dirs["hub"], preset="paligemma_tiny")


def transformers_greedy(model, family, ids, pixels, new_tokens):
    """transformers' greedy continuation of one prompt with its images (batch of one)."""
    types = (np.array(ids) == IMAGE) if family == "gemma3" else np.zeros(len(ids), bool)  # PaliGemma: all prefix
    types = torch.tensor(types[None].astype(np.int64))
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             pixel_values=torch.tensor(pixels), token_type_ids=types, max_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_with_images_matches_transformers(references, loaded, family):
    """Two prompts of different lengths (left-padded together in ours), each with its images, decoded past the
    sliding window."""
    from gemma_tune.generate import generate_ids

    reference, _ = references[family]
    reference.generation_config.eos_token_id = None
    ids, mask, _, images, _ = batch(family)
    counts = [2, 1] if family == "gemma3" else [1, 1]
    prompts = [[int(t) for t, real in zip(row, keep) if real] for row, keep in zip(ids, mask)]
    prompts = [p[:-3] for p in prompts]  # PaliGemma: cut into the suffix, which generation continues
    rows = [list(images[r, :n]) for r, n in enumerate(counts)]
    new_tokens = 8
    ours = generate_ids(loaded[family], prompts, images=rows, max_new_tokens=new_tokens, temperature=0.0, stop_ids=())
    theirs = [transformers_greedy(reference, family, p, np.stack(r).transpose(0, 3, 1, 2), new_tokens)
              for p, r in zip(prompts, rows)]
    assert ours == theirs
    assert len({token for row in theirs for token in row}) > 4  # the continuations depend on their context
