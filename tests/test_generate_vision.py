"""Generation with images: the prompt layouts of transformers' processors, KV-cache decoding against a full
recomputation (images and attention blocks), left padding of rows with different image counts, the images'
forms, the errors, and `gemma-tune generate --image`."""

from __future__ import annotations

import json

import keras
import numpy as np
import PIL.Image
import pytest

from gemma_tune import vision_prompt
from gemma_tune.cli import main
from gemma_tune.data.images import ImageError, preprocess
from gemma_tune.generate import generate, generate_ids
from gemma_tune.models import build_model
from gemma_tune.models.config import Architecture
from gemma_tune.vision_prompt import VisionPromptError, prompt_ids

IMAGE = 512
TOKENIZER = "data/tiny/tokenizer.model"
NEVER = tuple(range(512, 520))  # ids beyond the tiny tokenizer (the image token among them): stop there



def random_model(arch: Architecture):
    model = build_model(arch)
    rng = np.random.default_rng(1)
    for v in model.weights:
        v.assign(rng.normal(0.0, 0.3 if len(v.shape) == 1 else 0.15, v.shape).astype("float32"))
    return model


@pytest.fixture(scope="module", params=["gemma", "gemma2", "gemma3"])
def vision_model(request, tiny_vision_arch):
    return random_model(tiny_vision_arch(request.param))


def pictures(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, (28, 28, 3)).astype("float32") for _ in range(count)]


def greedy_by_full_forward(model, prompt, images, steps, width=64, slots=2):
    """Greedy decoding without a cache: the whole sequence (right-padded to `width`) with its images (padded to
    `slots`) and attention blocks (PaliGemma: the prompt is the prefix) each step, stopping at an id in NEVER.
    One width and image count for every call: one compilation of the predict function."""
    seq = list(prompt)
    assert len(prompt) + steps <= width and len(images) <= slots
    pixels = np.zeros((1, slots, 28, 28, 3), "float32")
    if images:
        pixels[0, :len(images)] = images
    for _ in range(steps):
        ids = np.zeros((1, width), "int32")
        ids[0, :len(seq)] = seq
        inputs = {"token_ids": ids, "padding_mask": (np.arange(width) < len(seq))[None].astype("int32"),
                  "images": pixels}
        if model.architecture.prefix_lm:
            inputs["prefix_mask"] = (np.arange(width) < len(prompt))[None].astype("int32")
        # TensorFlow eagerly: its retraced predict function has no static length, which the plain (soft-capped)
        # attention path reshapes with
        logits = keras.ops.convert_to_numpy(model(inputs) if keras.backend.backend() == "tensorflow"
                                            else model.predict_on_batch(inputs))
        token = int(logits[0, len(seq) - 1].argmax())
        if token in NEVER:
            break
        seq.append(token)
    return seq[len(prompt):]


def test_prompt_ids_are_the_processors_layout(tok, tiny_vision_arch):
    pali = tiny_vision_arch("gemma")
    slots16 = [IMAGE] * 16
    assert prompt_ids(tok, pali, "caption en", 2, chat=False) == slots16 * 2 + [tok.bos_id] + tok.encode("caption en\n")
    assert prompt_ids(tok, pali, "caption en", 0, chat=False) == [tok.bos_id] + tok.encode("caption en\n")
    gemma3 = tiny_vision_arch("gemma3")
    slots4 = [IMAGE] * 4
    soi, eoi, nl = tok.special_ids["<start_of_image>"], tok.special_ids["<end_of_image>"], tok.encode("\n")
    # no marker: the images before the text, inside the user turn (HF's template for image parts, then text)
    got = prompt_ids(tok, gemma3, "Describe.", 2)
    expected = ([tok.bos_id] + tok.encode("<start_of_turn>user\n\n\n") + [soi] + slots4 + [eoi] + tok.encode("\n\n\n\n")
                + [soi] + slots4 + [eoi] + tok.encode("\n\nDescribe.<end_of_turn>\n<start_of_turn>model\n"))
    assert got == expected
    assert tok.encode("\n\n\n\n") == nl * 4
    # markers place the images; raw text keeps them where they are
    got = prompt_ids(tok, gemma3, "A<start_of_image>B", 1, chat=False)
    assert got == [tok.bos_id] + tok.encode("A\n\n") + [soi] + slots4 + [eoi] + tok.encode("\n\nB")
    # without images a vision model's prompt is the text model's
    assert prompt_ids(tok, gemma3, "hi", 0) == [tok.bos_id] + tok.encode(
        "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n")


def test_cache_decoding_and_left_padding_match_full_recomputation(vision_model, tok):
    """Prompts of different lengths and image counts (2, 1, 0) in one batch: each row gives what greedy decoding
    by a full forward pass (no cache) gives it alone."""
    arch = vision_model.architecture
    chat = not arch.prefix_lm
    rows = [pictures(2, 0), pictures(1, 1), []]
    texts = ["hi", "What is in the picture, and what colour is it?", "Say something."]
    prompts = [prompt_ids(tok, arch, t, len(r), chat=chat) for t, r in zip(texts, rows)]
    assert len({len(p) for p in prompts}) == 3
    steps = 5
    batched = generate_ids(vision_model, prompts, images=rows, max_new_tokens=steps, stop_ids=NEVER)
    alone = [greedy_by_full_forward(vision_model, p, r, steps) for p, r in zip(prompts, rows)]
    assert batched == alone
    assert [len(a) for a in alone] == [steps] * 3  # the comparison covers every step
    # the text API builds the same prompts
    texts_out = generate(vision_model, tok, texts, images=rows, max_new_tokens=steps, stop_ids=NEVER)
    assert texts_out == [tok.decode(ids) for ids in batched]


@pytest.mark.parametrize("family", ["gemma", "gemma3"])
def test_images_as_paths_pil_or_arrays(family, tok, tmp_path, tiny_vision_arch):
    model = random_model(tiny_vision_arch(family))
    picture = PIL.Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    picture.save(tmp_path / "p.png")
    array = preprocess(picture, 28, "bicubic" if family == "gemma" else "bilinear")
    outs = [generate(model, tok, ["x"], images=[[image]], max_new_tokens=3, stop_ids=NEVER)
            for image in (str(tmp_path / "p.png"), picture, array)]
    assert outs[0] == outs[1] == outs[2]
    assert generate(model, tok, ["x"], images=[str(tmp_path / "p.png")], max_new_tokens=3, stop_ids=NEVER) == outs[0]


def test_errors_name_the_problem(tok, tmp_path, tiny_vision_arch):
    gemma3 = random_model(tiny_vision_arch("gemma3", num_layers=1))
    text_model = random_model(tiny_vision_arch("gemma3", num_layers=1, vision=None))
    image = pictures(1, 0)
    with pytest.raises(VisionPromptError, match="no vision encoder"):
        generate(text_model, tok, ["x"], images=[image], max_new_tokens=1)
    with pytest.raises(VisionPromptError, match="2 <start_of_image> markers but 1 images"):
        generate(gemma3, tok, ["<start_of_image>a<start_of_image>"], images=[image], max_new_tokens=1)
    with pytest.raises(VisionPromptError, match="one entry per prompt"):
        generate(gemma3, tok, ["a", "b"], images=[image], max_new_tokens=1)
    with pytest.raises(VisionPromptError, match="holds 0 image slots"):
        generate_ids(gemma3, [[2, 7, 8]], images=[image], max_new_tokens=1)
    with pytest.raises(ImageError, match="missing.png"):
        generate(gemma3, tok, ["x"], images=[[str(tmp_path / "missing.png")]], max_new_tokens=1)
    with pytest.raises(ImageError, match=r"\[28, 28, 3\]"):
        generate(gemma3, tok, ["x"], images=[[np.zeros((14, 14, 3), "float32")]], max_new_tokens=1)
    with pytest.raises(ImageError, match=r"\[-1, 1\]"):
        generate(gemma3, tok, ["x"], images=[[np.full((28, 28, 3), 255.0, "float32")]], max_new_tokens=1)
    pali = random_model(tiny_vision_arch("gemma", num_layers=1))
    with pytest.raises(VisionPromptError, match="not a chat model"):
        generate(pali, tok, ["caption en"], images=[image], chat=True, max_new_tokens=1)


def run_directory(path, arch: Architecture, tokenizer: str):
    """A run directory as training leaves it (resolved recipe, manifest, a checkpoint of random weights)."""
    from gemma_tune.config import load_recipe, recipe_architecture
    from gemma_tune.methods import build_method
    from gemma_tune.rundir import resolved_recipe_yaml
    from gemma_tune.train import checkpoint
    from gemma_tune.train.task import MethodTrainer

    path.mkdir()
    recipe = load_recipe({"name": "vision", "output_dir": str(path), "method": "sft",
                          "model": {"architecture": arch.model_dump(exclude_none=True), "tokenizer": tokenizer},
                          "data": {"train": {"path": "data/tiny/chat.jsonl", "format": "chat"}}})
    (path / "recipe.yaml").write_text(resolved_recipe_yaml(recipe))
    (path / "manifest.json").write_text(json.dumps({"name": recipe.name}))
    trainer = MethodTrainer(random_model(recipe_architecture(recipe)), build_method(recipe))
    trainer.compile(optimizer=keras.optimizers.AdamW())
    trainer.optimizer.build(trainer.trainable_variables)
    checkpoint.save(path, 1, trainer, {"step": 1})
    return path


def test_cli_generate_with_images(tmp_path, capsys, tiny_vision_arch):
    from pathlib import Path

    tokenizer = str(Path(TOKENIZER).resolve())
    png = tmp_path / "red.png"
    PIL.Image.new("RGB", (40, 30), (200, 30, 30)).save(png)
    pali = run_directory(tmp_path / "pali", tiny_vision_arch("gemma", num_layers=1), tokenizer)
    assert main(["generate", str(pali), "--image", str(png), "--prompt", "caption en", "--prompt", "answer en what?",
                 "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"### caption en [{png}]" in printed and f"### answer en what? [{png}]" in printed

    def fails(*argv, says):
        assert main(["generate", *map(str, argv), "--max-new-tokens", "2"]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err

    gemma3 = run_directory(tmp_path / "gemma3", tiny_vision_arch("gemma3", num_layers=1), tokenizer)
    fails(gemma3, "--image", png, "--prompt", "<start_of_image> and <start_of_image>", says="markers but 1 images")
    fails(gemma3, "--image", tmp_path / "missing.png", "--prompt", "x", says="missing.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    fails(gemma3, "--image", tmp_path / "broken.png", "--prompt", "x", says="broken.png")
    fails(gemma3, "--image", png, "--image", png, "--image", png, "--prompt", "a", "--prompt", "b",
          says="3 --image for 2 --prompt")
    text = run_directory(tmp_path / "text", tiny_vision_arch("gemma3", num_layers=1, vision=None), tokenizer)
    fails(text, "--image", png, "--prompt", "x", says="no vision encoder")


@pytest.mark.parametrize("family", ["gemma", "gemma3"])
def test_generation_prompt_is_the_start_of_a_training_row(family, tok, tmp_path, cache, tiny_vision_arch):
    """The prompt generation builds is what the data pipeline trained on, up to where the answer starts."""
    import PIL.Image

    from gemma_tune.config.schema import DataSection
    from gemma_tune.data import prepare

    PIL.Image.new("RGB", (28, 28), (200, 30, 30)).save(tmp_path / "red.png")
    if family == "gemma":
        row = {"image": "red.png", "prefix": "caption en", "suffix": "a red square"}
        fmt, prompt, chat = "image_text", "caption en", False
    else:
        row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "red.png"},
                                                          {"type": "text", "text": "What colour is it?"}]},
                            {"role": "assistant", "content": "red"}]}
        fmt, prompt, chat = "chat", "What colour is it?", True
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    arch = tiny_vision_arch(family)
    data = prepare(DataSection(train={"path": str(tmp_path / "rows.jsonl"), "format": fmt}, max_length=96,
                               packing=False), tok, seed=0, cache_dir=cache, architecture=arch)
    trained = next(data.train.batches(1, seed=0))["token_ids"][0].tolist()
    prompt = prompt_ids(tok, arch, prompt, num_images=1, chat=chat)
    assert trained[:len(prompt)] == prompt
    answer = tok.encode("a red square" if family == "gemma" else "red")
    assert trained[len(prompt):len(prompt) + len(answer)] == answer


def test_pan_and_scan_prompt_is_the_training_layout(tok, tmp_path, cache, tiny_vision_arch):
    """With pan-and-scan, a wide image is given with its crops exactly as the training data lays them out."""
    import PIL.Image

    from gemma_tune.config.schema import DataSection
    from gemma_tune.data import prepare
    from gemma_tune.data.images import pan_and_scan

    rng = np.random.default_rng(0)
    wide = PIL.Image.fromarray(rng.integers(0, 255, (300, 800, 3), dtype=np.uint8))
    wide.save(tmp_path / "wide.png")
    assert len(pan_and_scan(wide)) == 3
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "wide.png"},
                                                      {"type": "text", "text": "Describe it."}]},
                        {"role": "assistant", "content": "noise"}]}
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    arch = tiny_vision_arch("gemma3")
    data = prepare(DataSection(train={"path": str(tmp_path / "rows.jsonl"), "format": "chat"}, max_length=200,
                               packing=False, pan_and_scan=True), tok, seed=0, cache_dir=cache, architecture=arch)
    batch = next(data.train.batches(1, seed=0))
    text, images = vision_prompt.with_pan_and_scan(arch, "Describe it.", [str(tmp_path / "wide.png")])
    assert len(images) == 4
    prompt = prompt_ids(tok, arch, text, num_images=len(images), chat=True)
    assert batch["token_ids"][0].tolist()[:len(prompt)] == prompt
    np.testing.assert_allclose(vision_prompt.pixel_batch(arch, [images])[0], batch["images"][0], atol=1e-6)
    model = random_model(arch)
    out = generate(model, tok, ["Describe it."], images=[[str(tmp_path / "wide.png")]], pan_and_scan=True,
                   max_new_tokens=3)
    assert len(out) == 1
    with pytest.raises(VisionPromptError, match="Gemma 3 vision models only"):
        vision_prompt.with_pan_and_scan(tiny_vision_arch("gemma"), "caption en", [wide])
