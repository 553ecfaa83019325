"""Image-text data for the vision models: the token layouts of PaliGemma and Gemma 3 (checked against
transformers' processors), pan-and-scan, images decoded per batch, padding and resume, bad images."""

import json
import shutil

import numpy as np
import PIL.Image
import pytest

from gemma_tune.config.schema import DataSection
from gemma_tune.data import prepare
from gemma_tune.data.images import FAMILY_RESAMPLE, load_images, pan_and_scan
from gemma_tune.data.layout import VisionLayout, crop_count
from gemma_tune.data.render import Tokenise
from gemma_tune.errors import ConfigError, DataError
from gemma_tune.models.config import Architecture

SLOT = 512  # image_token_id of the test architectures: the tiny tokenizer's vocabulary size
SIZE = 28   # their image_size


def architecture(family):
    """A tiny vision model: PaliGemma (every patch a token) or Gemma 3 (patches pooled 2×2), 4 tokens per image."""
    patch = 14 if family == "gemma" else 7
    return Architecture(family=family, vocab_size=520, hidden_size=32, intermediate_size=64, num_layers=1,
                        num_heads=2, num_kv_heads=1, head_dim=16,
                        vision={"image_size": SIZE, "patch_size": patch, "num_layers": 1, "hidden_size": 16,
                                "num_heads": 2, "intermediate_size": 32, "tokens_per_image": 4, "image_token_id": SLOT})


PALIGEMMA, GEMMA3 = architecture("gemma"), architecture("gemma3")


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def image(path, width=56, height=56, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)
    return path.name


def render(tok, row, fmt, family, base_dir, template="chat", loss_on="completion", pan_and_scan=False):
    layout = VisionLayout(family, SLOT, 4, pan_and_scan, str(base_dir))
    return Tokenise(str(tok.model_path), fmt, template, loss_on, layout)(row, 0)


def ids(tok, *parts):
    """Token ids of parts: text (tokenised on its own) or lists of ids."""
    return [i for p in parts for i in (tok.encode(p) if isinstance(p, str) else p)]


def section(path, fmt, **kw):
    return DataSection(train={"path": str(path), "format": fmt, **kw.pop("source", {})}, **kw)


RUN = [SLOT] * 4


@pytest.fixture
def pictures(tmp_path):
    """Three images in tmp_path: a.png, b.png (56×56) and wide.png (800×300: 3 pan-and-scan crops)."""
    return {name: image(tmp_path / f"{name}.png", *size, seed=i)
            for i, (name, size) in enumerate({"a": (56, 56), "b": (56, 56), "wide": (800, 300)}.items())}


# -- layouts -------------------------------------------------------------------------------------------------
def test_paligemma_layout_labels_and_prefix_mask(tok, tmp_path, pictures):
    out = render(tok, {"image": ["a.png", "b.png"], "prefix": "caption en", "suffix": "a red cat"}, "image_text",
                 "paligemma", tmp_path)
    assert out["error"] == "" and out["image_crops"] == [0, 0]
    prefix = RUN + RUN + [tok.bos_id] + tok.encode("caption en\n")
    suffix = tok.encode("a red cat") + [tok.eos_id]
    assert out["input_ids"] == prefix + suffix
    assert out["labels"] == [0] * len(prefix) + [1] * len(suffix)
    assert out["prefix_mask"] == [1] * len(prefix) + [0] * len(suffix)
    every = render(tok, {"image": "a.png", "prefix": "", "suffix": "cat"}, "image_text", "paligemma", tmp_path,
                   loss_on="all")
    assert every["input_ids"] == RUN + [tok.bos_id] + tok.encode("\n") + tok.encode("cat") + [tok.eos_id]
    assert every["labels"] == [0] * 4 + [1] * (len(every["input_ids"]) - 4)  # never the image slots
    assert every["prefix_mask"] == [1] * 6 + [0] * (len(every["input_ids"]) - 6)


def test_gemma3_chat_layout(tok, tmp_path, pictures):
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief. "}]},
                {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": " What? "},
                                             {"type": "image", "image": "b.png"}]},
                {"role": "assistant", "content": [{"type": "text", "text": " Noise "}, {"type": "text", "text": "."}]},
                {"role": "user", "content": "And now?"}, {"role": "model", "content": "Nothing."}]
    out = render(tok, {"messages": messages}, "chat", "gemma3", tmp_path)
    assert out["error"] == "" and out["image_crops"] == [0, 0]
    prompt = ids(tok, [tok.bos_id], "<start_of_turn>user\nBe brief. \n\n\n\n<start_of_image>", RUN,
                 "<end_of_image>\n\nWhat?\n\n<start_of_image>", RUN, "<end_of_image>\n\n<end_of_turn>\n"
                 "<start_of_turn>model\n")
    answer = tok.encode("Noise.<end_of_turn>")
    second = tok.encode("\n<start_of_turn>user\nAnd now?<end_of_turn>\n<start_of_turn>model\n")
    assert out["input_ids"] == prompt + answer + second + tok.encode("Nothing.<end_of_turn>") + tok.encode("\n")
    assert out["labels"] == ([0] * len(prompt) + [1] * len(answer) + [0] * len(second)
                             + [1] * len(tok.encode("Nothing.<end_of_turn>")) + [0])
    assert "prefix_mask" not in out  # Gemma 3 attends within each image; no prefix-LM mask


@pytest.mark.parametrize("template", ["chat", "none"])
def test_gemma3_image_text(tok, tmp_path, pictures, template):
    out = render(tok, {"image": "a.png", "prefix": " caption en", "suffix": "a cat"}, "image_text", "gemma3",
                 tmp_path, template=template)
    image_seq = ["\n\n<start_of_image>", RUN, "<end_of_image>\n\n"]
    if template == "chat":
        prompt = ids(tok, [tok.bos_id], "<start_of_turn>user\n" + image_seq[0], RUN,
                     image_seq[2] + "caption en<end_of_turn>\n<start_of_turn>model\n")
        answer = tok.encode("a cat<end_of_turn>")
        assert out["input_ids"] == prompt + answer + tok.encode("\n")
        assert out["labels"] == [0] * len(prompt) + [1] * len(answer) + [0]
    else:
        prompt = ids(tok, [tok.bos_id], image_seq[0], RUN, image_seq[2] + " caption en")
        answer = tok.encode("a cat") + [tok.eos_id]
        assert out["input_ids"] == prompt + answer
        assert out["labels"] == [0] * len(prompt) + [1] * len(answer)


def test_pan_and_scan_layout(tok, tmp_path, pictures):
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "wide.png"},
                                                     {"type": "image", "image": "a.png"}]},
                        {"role": "model", "content": "Two."}]}
    out = render(tok, row, "chat", "gemma3", tmp_path, pan_and_scan=True)
    assert out["image_crops"] == [3, 0]  # 800×300: three crops of 267×300; a square one: none
    full = ["\n\n<start_of_image>", RUN, "<end_of_image>\n\n"]
    text = ["<start_of_turn>user\nHere is the original image " + full[0], RUN,
            full[2] + " and here are some crops to help you see better " + full[0], RUN,
            full[2] + " " + full[0], RUN, full[2] + " " + full[0], RUN, full[2] + full[0], RUN,
            full[2] + "<end_of_turn>\n<start_of_turn>model\n"]
    assert out["input_ids"] == ids(tok, [tok.bos_id], *text, "Two.<end_of_turn>", "\n")
    assert out["input_ids"].count(SLOT) == 5 * 4  # the wide image stands for 1 + 3 images


def test_crop_count_is_what_pan_and_scan_makes():
    sizes = [(w, h) for w in (100, 255, 256, 300, 511, 512, 640, 800, 1000, 1200, 1500, 2000)
             for h in (100, 256, 300, 512, 700, 1024)]
    for w, h in sizes:
        assert crop_count(w, h) == len(pan_and_scan(PIL.Image.new("RGB", (w, h)))), (w, h)


# -- transformers' processors ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """transformers' GemmaTokenizer of the tiny SentencePiece model, with Gemma 3's image tokens declared."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    shutil.copy("data/tiny/tokenizer.model", folder / "tokenizer.model")
    return lambda **extra: transformers.GemmaTokenizer.from_pretrained(str(folder), **extra)


def pixels(values, tmp_path, family):
    return load_images(values, tmp_path, SIZE, FAMILY_RESAMPLE[family])


def test_paligemma_processor_gives_the_same_ids_labels_and_pixels(tok, tmp_path, pictures, hf_tokenizer):
    from transformers import PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    processor_images = SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE})
    processor_images.image_seq_length = 4
    processor = PaliGemmaProcessor(image_processor=processor_images, tokenizer=hf_tokenizer())
    assert processor.image_token_id == SLOT
    images = [PIL.Image.open(tmp_path / name).convert("RGB") for name in ("a.png", "b.png")]
    theirs = processor(images=[images], text=["<image><image>caption en"], suffix=["a red cat"])
    ours = render(tok, {"image": ["a.png", "b.png"], "prefix": "caption en", "suffix": "a red cat"}, "image_text",
                  "paligemma", tmp_path)
    assert list(theirs["input_ids"][0]) == ours["input_ids"]
    assert [1 - t for t in theirs["token_type_ids"][0]] == ours["prefix_mask"]
    assert [int(label != -100) for label in theirs["labels"][0]] == ours["labels"]
    np.testing.assert_allclose(np.stack(theirs["pixel_values"]).transpose(0, 2, 3, 1),
                               pixels(["a.png", "b.png"], tmp_path, "paligemma"), atol=1e-6)


@pytest.mark.parametrize("pas", [False, True])
def test_gemma3_processor_gives_the_same_ids_and_pixels(tok, tmp_path, pictures, hf_tokenizer, pas):
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from gemma_tune.checkpoints.hf_tokenizer import CHAT_TEMPLATE

    tokenizer = hf_tokenizer(extra_special_tokens={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                                   "eoi_token": "<end_of_image>"})
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": SIZE, "width": SIZE}),
                                tokenizer=tokenizer, image_seq_length=4, chat_template=CHAT_TEMPLATE)
    assert tokenizer.image_token_id == SLOT
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": " What? "},
                                             {"type": "image", "image": "wide.png"}, {"type": "text", "text": "And?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Noise."}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    images = [PIL.Image.open(tmp_path / name).convert("RGB") for name in ("a.png", "wide.png")]
    theirs = processor(text=[text], images=[images], do_pan_and_scan=pas)
    ours = render(tok, {"messages": messages}, "chat", "gemma3", tmp_path, pan_and_scan=pas)
    assert list(theirs["input_ids"][0]) == ours["input_ids"]
    assert ours["image_crops"] == ([0, 3] if pas else [0, 0])
    data = write(tmp_path / "rows.jsonl", [{"messages": messages}])
    split = prepare(section(data, "chat", pan_and_scan=pas, max_length=256), tok, seed=0, cache_dir=str(tmp_path),
                    architecture=GEMMA3).train
    batch = next(split.one_pass(1))
    assert batch["images"].shape == (1, 5 if pas else 2, SIZE, SIZE, 3)
    np.testing.assert_allclose(batch["images"][0], np.stack(theirs["pixel_values"]).transpose(0, 2, 3, 1), atol=1e-6)


# -- prepared splits and batches -------------------------------------------------------------------------------
def vqa_rows():
    def turn(*content):
        return {"role": "user", "content": [{"type": "image", "image": c} if c.endswith(".png") else
                                            {"type": "text", "text": c} for c in content]}
    return [{"messages": [turn("a.png", "Colour?"), {"role": "model", "content": "red"}]},
            {"messages": [turn("a.png", "b.png", "Same?"), {"role": "model", "content": "no"}]},
            {"messages": [{"role": "user", "content": "No picture?"}, {"role": "model", "content": "none"}]},
            {"messages": [turn("b.png", "Colour?"), {"role": "model", "content": "blue"}]},
            {"messages": [turn("Shape?", "a.png"), {"role": "model", "content": "noise"}]}]


def test_two_images_per_row_text_rows_and_padding(tok, cache, tmp_path, pictures):
    path = write(tmp_path / "vqa.jsonl", vqa_rows())
    out = prepare(section(path, "chat", max_length=64), tok, seed=0, cache_dir=cache, architecture=GEMMA3)
    split = out.train
    assert len(split) == 5 and out.stats["train"]["rows_out"] == 5  # never packed, though packing is on
    batches = list(split.one_pass(4))
    assert [b["images"].shape for b in batches] == [(4, 2, SIZE, SIZE, 3)] * 2  # N = the most images of a row
    a, b = pixels(["a.png", "b.png"], tmp_path, "gemma3")
    first = batches[0]["images"]
    np.testing.assert_array_equal(first[0], [a, np.zeros_like(a)])
    np.testing.assert_array_equal(first[1], [a, b])
    assert not first[2].any()  # the text-only row
    np.testing.assert_array_equal(first[3, 0], b)
    last = batches[1]
    assert not last["images"][1:].any() and not last["token_ids"][1:].any()  # padding rows: all zeros
    for row in range(4):  # the k-th run of image slots is image k: as many runs as the row has images
        assert (batches[0]["token_ids"][row] == SLOT).sum() == 4 * [1, 2, 0, 1][row]
    assert "prefix_mask" not in batches[0]


def test_paligemma_batches_carry_prefix_mask(tok, cache, tmp_path, pictures):
    rows = [{"image": "a.png", "prefix": "caption en", "suffix": "red noise"},
            {"image": ["a.png", "b.png"], "prefix": "compare", "suffix": "different"},
            {"image": "b.png", "prefix": "", "suffix": "blue"}]
    out = prepare(section(write(tmp_path / "captions.jsonl", rows), "image_text", max_length=32), tok, seed=0,
                  cache_dir=cache, architecture=PALIGEMMA)
    batch = next(out.train.one_pass(4))
    assert batch["prefix_mask"].dtype == np.int32 and batch["prefix_mask"].shape == (4, 32)
    assert batch["images"].dtype == np.float32 and batch["images"].shape == (4, 2, SIZE, SIZE, 3)
    for r in range(3):
        n = int(batch["prefix_mask"][r].sum())
        assert batch["token_ids"][r, n - 1] == tok.encode("\n")[0] and batch["loss_mask"][r, n - 1] == 1
        assert not batch["loss_mask"][r, :n - 1].any()  # nothing in the prefix is a trained target
    assert not batch["prefix_mask"][3].any() and not batch["images"][3].any()  # the padding row


def test_text_data_on_a_vision_model_packs_without_images(tok, cache):
    out = prepare(section("data/tiny/chat.jsonl", "chat", max_length=128), tok, seed=0, cache_dir=cache,
                  architecture=PALIGEMMA)
    assert len(out.train) < out.stats["train"]["sequences"]  # packed: no row holds an image
    batch = next(out.train.batches(2, seed=0))
    assert "images" not in batch  # the model runs its text path: no SigLIP pass over empty images
    assert not batch["prefix_mask"].any()  # chat rows are causal on PaliGemma too


def test_bundled_tiny_vision_data(tok, cache):
    captions = section("data/tiny_vision/captions.jsonl", "image_text",
                       eval={"path": "data/tiny_vision/captions_eval.jsonl", "format": "image_text"}, max_length=64)
    out = prepare(captions, tok, seed=0, cache_dir=cache, architecture=PALIGEMMA)
    assert (out.stats["train"]["rows"], out.stats["eval"]["rows"]) == (140, 20)
    vqa = prepare(section("data/tiny_vision/vqa.jsonl", "chat", max_length=64), tok, seed=0, cache_dir=cache,
                  architecture=GEMMA3)
    assert vqa.stats["train"]["rows"] == 430 and vqa.train.images.slots == 2  # some rows hold two images


def test_batches_decode_only_their_rows(tok, cache, tmp_path, pictures, monkeypatch):
    import PIL.ImageFile

    from gemma_tune.data import image_batches

    loads, opened = [], []
    load = PIL.ImageFile.ImageFile.load
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda self: loads.append(1) or load(self))
    split = prepare(section(write(tmp_path / "vqa.jsonl", vqa_rows()), "chat", max_length=64), tok, seed=0,
                    cache_dir=cache, architecture=GEMMA3).train
    assert loads == []  # tokenising read image headers only
    open_image = image_batches.open_image
    monkeypatch.setattr(image_batches, "open_image", lambda value, base: opened.append(value) or open_image(value, base))
    batches = split.one_pass(2)
    next(batches)
    assert opened == ["a.png", "a.png", "b.png"]  # rows 1 and 2 only
    next(batches)
    assert opened[3:] == ["b.png"]  # row 3 has no image


def test_resumed_batches_are_the_same(tok, cache, tmp_path, pictures):
    split = prepare(section(write(tmp_path / "vqa.jsonl", vqa_rows() * 2), "chat", max_length=64), tok, seed=0,
                    cache_dir=cache, architecture=GEMMA3).train
    stream = split.batches(3, seed=1)
    straight = [next(stream) for _ in range(6)]
    resumed = split.batches(3, seed=1, start_step=4)
    for expected in straight[4:]:
        got = next(resumed)
        assert set(got) == set(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])


# -- truncation and errors -------------------------------------------------------------------------------------
def test_truncation_never_cuts_an_image(tok, cache, tmp_path, pictures):
    rows = [{"image": "a.png", "prefix": "caption en", "suffix": "a long " * 6 + "answer"},
            {"image": "b.png", "prefix": "caption en", "suffix": "short"}]
    path = write(tmp_path / "captions.jsonl", rows)
    right = prepare(section(path, "image_text", max_length=24), tok, seed=0, cache_dir=cache, architecture=PALIGEMMA)
    assert (right.stats["train"]["truncated"], right.stats["train"]["images_cut"]) == (1, 0)  # the suffix is cut
    left = prepare(section(path, "image_text", max_length=24, truncation="left"), tok, seed=0, cache_dir=cache,
                   architecture=PALIGEMMA)
    s = left.stats["train"]
    assert (s["truncated"], s["images_cut"], s["sequences"]) == (1, 1, 1)  # its images would be cut: left out
    assert s["rows"] == s["sequences"] + s["dropped"] + s["images_cut"]
    with pytest.raises(DataError, match="no rows left of 2: 2 whose truncation to max_length=3 would cut an image"):
        prepare(section(path, "image_text", max_length=3), tok, seed=0, cache_dir=cache, architecture=PALIGEMMA)


def bad_image_rows(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path.parent / "outside.png").write_bytes((tmp_path / "a.png").read_bytes())
    return [{"image": "a.png", "prefix": "p", "suffix": "fine"}, {"image": "missing.png", "prefix": "p", "suffix": "s"},
            {"image": "notes.png", "prefix": "p", "suffix": "s"}, {"image": "../outside.png", "prefix": "p", "suffix": "s"},
            {"image": ["b.png", "a.png"], "prefix": "p", "suffix": "fine too"}]


def test_bad_images_are_row_errors_with_file_and_row(tok, cache, tmp_path, pictures):
    path = write(tmp_path / "bad.jsonl", bad_image_rows(tmp_path))
    with pytest.raises(DataError) as e:
        prepare(section(path, "image_text", max_length=32), tok, seed=0, cache_dir=cache, architecture=PALIGEMMA)
    assert e.value.where == f"{path}: row 2"
    assert "image file 'missing.png' does not exist" in e.value.message and "2 more invalid rows" in e.value.message
    out = prepare(section(path, "image_text", max_length=32, skip_invalid=True), tok, seed=0, cache_dir=cache,
                  architecture=PALIGEMMA)
    assert (out.stats["train"]["rows"], out.stats["train"]["invalid"]) == (2, 3)
    errors = Tokenise(str(tok.model_path), "image_text", "chat", "completion",
                      VisionLayout("paligemma", SLOT, 4, False, str(tmp_path)))
    messages = [errors(row, i)["error"] for i, row in enumerate(bad_image_rows(tmp_path))]
    assert "'notes.png' is not an image" in messages[2] and "outside the data directory" in messages[3]


def test_a_file_fixed_after_an_error_is_read_again(tok, cache, tmp_path, pictures):
    path = write(tmp_path / "later.jsonl", [{"image": "later.png", "prefix": "p", "suffix": "s"}])
    with pytest.raises(DataError, match="'later.png' does not exist"):
        prepare(section(path, "image_text"), tok, seed=0, cache_dir=cache, architecture=PALIGEMMA)
    image(tmp_path / "later.png")
    assert prepare(section(path, "image_text"), tok, seed=0, cache_dir=cache, architecture=PALIGEMMA).stats[
        "train"]["rows"] == 1  # image data is tokenised afresh, never from a cache


def test_an_image_that_fails_to_decode_names_file_and_row(tok, cache, tmp_path, pictures):
    whole = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[:len(whole) // 2])  # a valid header, truncated pixels
    rows = [{"image": "a.png", "prefix": "p", "suffix": "s"}, {"image": "cut.png", "prefix": "p", "suffix": "s"}]
    split = prepare(section(write(tmp_path / "cut.jsonl", rows), "image_text"), tok, seed=0, cache_dir=cache,
                    architecture=PALIGEMMA).train
    with pytest.raises(DataError, match="image file 'cut.png' cannot be decoded") as e:
        next(split.one_pass(2))
    assert e.value.where.endswith("cut.jsonl: row 2")


@pytest.mark.parametrize("fmt,row,family,message", [
    ("image_text", {"image": "a.png", "prefix": "p", "suffix": "s"}, None, "this model has no vision encoder"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]},
                           {"role": "model", "content": "x"}]}, None, "this model has no vision encoder"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]},
                           {"role": "model", "content": "x"}]}, "paligemma", "takes images in image_text rows"),
    ("chat", {"messages": [{"role": "user", "content": "Draw"},
                           {"role": "model", "content": [{"type": "image", "image": "a.png"}]}]}, "gemma3",
     "an image in a model turn"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "audio"}]}, {"role": "model", "content": "x"}]},
     "gemma3", "must be a {type: text, text} or {type: image, image} part"),
    ("preference", {"prompt": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]}], "chosen": "a",
                    "rejected": "b"}, "gemma3", "preference rows are text only"),
    ("image_text", {"image": [], "prefix": "p", "suffix": "s"}, "gemma3", "'image' is an empty list"),
    ("image_text", {"image": "a.png", "prefix": "p", "suffix": ""}, "paligemma", "empty suffix"),
])
def test_rows_that_do_not_fit_a_vision_layout(tok, tmp_path, pictures, fmt, row, family, message):
    layout = VisionLayout(family, SLOT, 4, False, str(tmp_path)) if family else None
    assert message in Tokenise(str(tok.model_path), fmt, "chat", "completion", layout)(row, 0)["error"]


def test_images_column_fills_image_parts_in_order(tok, tmp_path, pictures):
    parts = [{"type": "image"}, {"type": "text", "text": "Same?"}, {"type": "image"}]
    row = {"messages": [{"role": "user", "content": parts}, {"role": "model", "content": "no"}],
           "images": ["b.png", "a.png"]}
    named = {"messages": [{"role": "user", "content": [{"type": "image", "image": "b.png"}, parts[1],
                                                       {"type": "image", "image": "a.png"}]},
                          {"role": "model", "content": "no"}]}
    assert render(tok, row, "chat", "gemma3", tmp_path) == render(tok, named, "chat", "gemma3", tmp_path)
    short = render(tok, {**row, "images": ["b.png"]}, "chat", "gemma3", tmp_path)
    assert "2 image parts without an `image` value but the row's `images` column holds 1" in short["error"]


def test_hub_style_image_bytes(tok, cache, tmp_path, pictures):
    import datasets

    encoded = [(tmp_path / name).read_bytes() for name in ("a.png", "b.png")]
    rows = datasets.Dataset.from_dict(
        {"image": [{"bytes": encoded[0], "path": None}, {"bytes": encoded[1], "path": None}],
         "prefix": ["caption en"] * 2, "suffix": ["red", "blue"]},
        features=datasets.Features({"image": datasets.Image(), "prefix": datasets.Value("string"),
                                    "suffix": datasets.Value("string")}))
    rows.to_parquet(str(tmp_path / "rows.parquet"))
    split = prepare(section(tmp_path / "rows.parquet", "image_text"), tok, seed=0, cache_dir=cache,
                    architecture=GEMMA3).train
    np.testing.assert_array_equal(next(split.one_pass(2))["images"][:, 0], pixels(["a.png", "b.png"], tmp_path,
                                                                                 "gemma3"))


def test_a_fixed_prefix_for_data_without_one(tok, cache, tmp_path, pictures):
    rows = [{"image": "a.png", "prefix": "caption en", "suffix": "red"}, {"image": "b.png", "prefix": "caption en",
                                                                           "suffix": "blue"}]
    with_column = write(tmp_path / "with.jsonl", rows)
    without = write(tmp_path / "without.jsonl", [{"image": r["image"], "suffix": r["suffix"]} for r in rows])
    a, b = (prepare(section(path, "image_text", **kw), tok, seed=0, cache_dir=cache, architecture=PALIGEMMA).train
            for path, kw in ((with_column, {}), (without, {"source": {"prefix": "caption en"}})))
    for key in a.arrays:
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key])
    with pytest.raises(DataError, match=r"needs columns \['prefix'\]"):
        prepare(section(without, "image_text"), tok, seed=0, cache_dir=cache, architecture=PALIGEMMA)


def test_pan_and_scan_needs_gemma3(tok, cache, tmp_path, pictures):
    path = write(tmp_path / "rows.jsonl", [{"image": "a.png", "prefix": "p", "suffix": "s"}])
    with pytest.raises(DataError, match="Gemma 3 vision models only") as e:
        prepare(section(path, "image_text", pan_and_scan=True), tok, seed=0, cache_dir=cache, architecture=PALIGEMMA)
    assert e.value.where == "data.pan_and_scan"


# -- recipes ---------------------------------------------------------------------------------------------------
def test_recipe_checks_of_image_data(tmp_path):
    from gemma_tune.config import load_recipe

    def problems(preset, **data):
        recipe = {"name": "v", "model": {"preset": preset, "tokenizer": "data/tiny/tokenizer.model"},
                  "data": {"train": {"path": "data/tiny_vision/captions.jsonl", "format": "image_text"}, **data}}
        with pytest.raises(ConfigError) as e:
            load_recipe(recipe)
        return e.value.message

    text_model = problems("gemma3_1b", pan_and_scan=True)
    assert "data.train.format: image_text rows hold images but the model has no vision encoder" in text_model
    assert "data.pan_and_scan: pan-and-scan crops images for Gemma 3 vision models only" in text_model
    assert "unknown data format" not in problems("gemma3_4b", max_length=10 ** 6)
    chat = problems("gemma3_4b", train={"path": "data/tiny/chat.jsonl", "format": "chat", "prefix": "caption en"})
    assert "data.train.prefix: a fixed prefix is for image_text data, not chat" in chat
