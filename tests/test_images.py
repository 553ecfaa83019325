"""Host-side images (gemma_tune.data.images) against transformers' image processors: SiglipImageProcessor for
PaliGemma, Gemma3ImageProcessor (with pan-and-scan) for Gemma 3, on PIL images of odd sizes and modes; and the
ImageErrors for bad values. No Keras: the same on every backend."""

import io
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from transformers.image_transforms import convert_to_rgb
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.gemma3.processing_gemma3 import Gemma3Processor
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from gemma_tune.data.images import (FAMILY_RESAMPLE, RESAMPLE, ImageError, check_image_value, load_images,
                                    open_image, pan_and_scan, preprocess)

SIZE = 32
# transformers' PIL-backed processors (the default classes are these when torchvision is absent, as here; with
# torchvision they resize with torch instead, which gemma_tune.data.images documents as differing when downscaling)
PROCESSORS = {"paligemma": SiglipImageProcessorPil, "gemma3": Gemma3ImageProcessorPil}


def random_image(mode: str, width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    """Noise in `mode` (P: 16 colours, one of them transparent; RGBA and LA: varied alpha)."""
    rng = np.random.default_rng(seed)
    if mode == "P":
        image = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).quantize(16)
        image.info["transparency"] = 3
        return image
    if mode == "1":
        return random_image("L", width, height, seed).convert("1")
    bands = len(PIL.Image.new(mode, (1, 1)).getbands())
    return PIL.Image.frombytes(mode, (width, height), rng.integers(0, 256, height * width * bands, np.uint8).tobytes())


def processor(family: str, **kwargs):
    """The family's PIL-backed transformers processor, at SIZE."""
    proc = PROCESSORS[family](size={"height": SIZE, "width": SIZE}, **kwargs)
    assert proc.backend == "pil"
    return proc


def channels_last(pixel_values) -> np.ndarray:
    return np.asarray(pixel_values).transpose(0, 2, 3, 1)


def test_family_resample_is_the_processor_default():
    assert RESAMPLE[FAMILY_RESAMPLE["paligemma"]] == SiglipImageProcessorPil.resample == PIL.Image.BICUBIC
    assert RESAMPLE[FAMILY_RESAMPLE["gemma3"]] == Gemma3ImageProcessorPil.resample == PIL.Image.BILINEAR
    assert SiglipImageProcessorPil.image_mean == SiglipImageProcessorPil.image_std == [0.5, 0.5, 0.5]
    assert Gemma3ImageProcessorPil.image_mean == Gemma3ImageProcessorPil.image_std == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("family", ["paligemma", "gemma3"])
@pytest.mark.parametrize("mode, width, height", [("RGB", 53, 37), ("RGBA", 29, 61), ("L", 45, 45), ("P", 70, 23),
                                                 ("RGB", 13, 20)])
def test_preprocess_matches_transformers(family, mode, width, height):
    image = random_image(mode, width, height)
    want = channels_last(processor(family)(images=image, return_tensors="np")["pixel_values"])[0]
    got = preprocess(image, SIZE, FAMILY_RESAMPLE[family])
    assert got.shape == (SIZE, SIZE, 3) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-6
    assert got.min() >= -1 and got.max() <= 1


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK", "1", "RGB"])
def test_open_image_converts_modes_as_transformers(mode):
    image = random_image(mode, 11, 7, seed=1)
    got = open_image(image, None)
    assert got.mode == "RGB"
    assert np.array_equal(np.asarray(got), convert_to_rgb(image, return_numpy=True))


def test_rgb_with_a_transparent_colour_and_16_bit_grey():
    rgb = random_image("RGB", 5, 4, seed=2)
    rgb.info["transparency"] = tuple(rgb.getpixel((0, 0)))
    assert np.asarray(open_image(rgb, None))[0, 0].tolist() == [255, 255, 255]  # composited onto white
    assert np.array_equal(np.asarray(open_image(rgb, None)), convert_to_rgb(rgb, return_numpy=True))
    grey = PIL.Image.fromarray(np.array([[0, 257, 32896, 65535]], dtype=np.uint16))
    assert grey.mode == "I;16"
    assert np.asarray(open_image(grey, None))[0].tolist() == [[0] * 3, [1] * 3, [128] * 3, [255] * 3]


def crops_of(processed):
    return channels_last(processed["pixel_values"]), list(np.asarray(processed["num_crops"]).ravel())


@pytest.mark.parametrize("width, height, options, crops", [
    (1000, 260, {}, 3),  # wide: 4 by aspect, at most floor(1000 / 256) = 3; the last crop cut at the edge
    (300, 650, {}, 2),  # tall
    (300, 300, {}, 0),  # square: never
    (600, 100, {}, 0),  # crops would be 100 < 256 px high
    (101, 40, {"min_crop_size": 16}, 3),
    (40, 173, {"min_crop_size": 8, "max_num_crops": 3}, 3),
])
def test_pan_and_scan_matches_gemma3(width, height, options, crops):
    image = random_image("RGB", width, height, seed=3)
    settings = {**Gemma3Processor.images_kwargs, "do_pan_and_scan": True}
    names = {"min_crop_size": "pan_and_scan_min_crop_size", "max_num_crops": "pan_and_scan_max_num_crops"}
    settings.update({names[key]: value for key, value in options.items()})
    proc = processor("gemma3")
    want, num_crops = crops_of(proc(images=image, return_tensors="np", **settings))
    got = pan_and_scan(image, **options)
    assert num_crops == [len(got)] == [crops]
    ours = np.stack([preprocess(part, SIZE, "bilinear") for part in [image, *got]])
    assert ours.shape == want.shape and np.abs(ours - want).max() <= 1e-6


def test_pan_and_scan_defaults_are_gemma3_processors():
    kwargs = Gemma3Processor.images_kwargs
    assert pan_and_scan.__kwdefaults__ == {"min_crop_size": kwargs["pan_and_scan_min_crop_size"],
                                           "max_num_crops": kwargs["pan_and_scan_max_num_crops"],
                                           "min_ratio_to_activate": kwargs["pan_and_scan_min_ratio_to_activate"]}


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def base(tmp_path):
    """A data directory with images/ok.png, and outside.png next to it (outside the directory)."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    random_image("RGB", 9, 6, seed=4).save(root / "images" / "ok.png")
    random_image("RGB", 9, 6, seed=5).save(tmp_path / "outside.png")
    return root


def test_every_kind_of_value_opens_the_same(base):
    want = np.asarray(open_image("images/ok.png", base))
    data = (base / "images" / "ok.png").read_bytes()
    for value in [base / "images" / "ok.png", str(base / "images" / "ok.png"), "images/../images/ok.png", data,
                  {"bytes": data, "path": None}, {"bytes": None, "path": "images/ok.png"},
                  {"bytes": data, "path": "elsewhere.png"}, PIL.Image.open(io.BytesIO(data))]:
        check_image_value(value, base)
        assert np.array_equal(np.asarray(open_image(value, base)), want), value
    batch = load_images(["images/ok.png", data], base, SIZE, "bicubic")
    assert batch.shape == (2, SIZE, SIZE, 3) and batch.dtype == np.float32
    assert np.array_equal(batch[0], batch[1])
    assert load_images([], base, SIZE, "bicubic").shape == (0, SIZE, SIZE, 3)


def broken_files(base):
    """name -> what a bad image value is, for the error tests."""
    (base / "images" / "link.png").symlink_to(base.parent / "outside.png")
    (base / "images" / "notes.png").write_text("these are notes, not pixels\n")
    (base / "images" / "cut.png").write_bytes(png_bytes(random_image("RGB", 64, 64, seed=6))[:700])
    return {"missing.png": "images/missing.png", "outside.png": "../outside.png", "link.png": "images/link.png",
            "absolute": str(base.parent / "outside.png")}


@pytest.mark.parametrize("case, says", [("missing.png", "does not exist"), ("outside.png", "outside the data"),
                                        ("link.png", "outside the data"), ("absolute", "outside the data")])
def test_bad_paths_are_image_errors_naming_the_file(base, case, says):
    value = broken_files(base)[case]
    for check in (check_image_value, open_image):
        with pytest.raises(ImageError, match=says) as error:
            check(value, base)
        assert value in str(error.value)


@pytest.mark.parametrize("name, says", [("notes.png", "not an image"), ("cut.png", "corrupt or truncated")])
def test_undecodable_files_are_image_errors_naming_the_file(base, name, says):
    broken_files(base)
    check_image_value(f"images/{name}", base)  # cheap: the file exists and is inside
    with pytest.raises(ImageError, match=says) as error:
        open_image(f"images/{name}", base)
    assert f"images/{name}" in str(error.value)
    with pytest.raises(ImageError, match="image bytes"):
        open_image((base / "images" / name).read_bytes(), base)


@pytest.mark.parametrize("value, says", [(3, "got int 3"), ([b"x"], "got list"), (b"", "empty"),
                                         ({"image": "a.png"}, "got keys"), ({"bytes": None, "path": None}, "got keys"),
                                         ({"bytes": "a.png", "path": None}, "bytes are bytes, got str"),
                                         ("", "empty string")])
def test_wrong_values_are_image_errors(base, value, says):
    for check in (check_image_value, open_image):
        with pytest.raises(ImageError, match=says):
            check(value, base)


def test_bad_arguments_are_value_errors():
    image = random_image("RGB", 4, 4)
    with pytest.raises(ValueError, match="resample"):
        preprocess(image, SIZE, "lanczos")
    with pytest.raises(ValueError, match="size"):
        preprocess(image, 0, "bilinear")


def test_the_bundled_tiny_vision_data_opens():
    root = Path(__file__).resolve().parents[1] / "data" / "tiny_vision"
    rows = [json.loads(line) for name in ("captions.jsonl", "captions_eval.jsonl", "vqa.jsonl")
            for line in (root / name).read_text().splitlines()]
    values = [row["image"] for row in rows if "image" in row]
    values += [part["image"] for row in rows if "messages" in row for turn in row["messages"]
               for part in turn["content"] if part["type"] == "image"]
    assert len(set(values)) == 160 and len(rows) == 160 + 140 * 3 + 10
    for value in values:
        check_image_value(value, root)
    image = open_image(values[0], root)
    assert image.size == (56, 56) and image.mode == "RGB"
