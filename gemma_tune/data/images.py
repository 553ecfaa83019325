"""Images for the vision models (PaliGemma 1/2, Gemma 3), on the host: decode, convert to RGB, resize, normalise.

An image value in a data row is a path (relative to the data file's directory, `base_dir`, and never
leading out of it), `bytes`, a dict as the `datasets` Image feature stores it (`{"bytes": b | None,
"path": str | None}`, bytes first) or a PIL image. Anything wrong with one is an `ImageError` naming the
file (or 'image bytes') and what was expected.

The pixels are what transformers' image processor of the model's family computes on a PIL image through its
PIL backend (`PilBackend` in transformers/image_processing_backends.py), class defaults (do_convert_rgb=True
among them), bit for bit:
  1. RGB (`image_transforms.convert_to_rgb`): an image with an alpha band or a `transparency` entry
     (RGBA, LA, PA, P or L/RGB with a tRNS colour) is converted to RGBA and alpha-composited onto opaque
     white; any other mode goes through PIL's `convert("RGB")`. Two deviations, for images transformers
     spoils: 16-bit grey (`I;16*`) is first scaled to 8 bits, round(v · 255 / 65535), where `convert("RGB")`
     clips every value above 255; and LAB's 'A' band (a colour axis) is not taken for alpha.
  2. resize to size × size with PIL's `Image.resize`, with the filter of the family (`FAMILY_RESAMPLE`):
     - PaliGemma 1 and 2: SiglipImageProcessor, whose default is `resample = PILImageResampling.BICUBIC`
       (transformers/models/siglip/image_processing_pil_siglip.py, and image_processing_siglip.py); the
       hub checkpoints' preprocessor_config.json names SiglipImageProcessor with image_mean = image_std =
       [0.5, 0.5, 0.5].
     - Gemma 3: Gemma3ImageProcessor, whose default is `resample = PILImageResampling.BILINEAR`
       (transformers/models/gemma3/image_processing_pil_gemma3.py, and image_processing_gemma3.py), mean
       and std 0.5 (IMAGENET_STANDARD_MEAN / _STD).
  3. x = float32(float64(u8) · (1/255)) (`image_transforms.rescale`), then (x − 0.5) / 0.5 in float32
     (`image_transforms.normalize`): values in [−1, 1], channels last (transformers returns channels first).
transformers' torchvision backend (the default class when torchvision is installed) resizes with torch's
antialiased interpolation instead, which differs from PIL's when it downscales (by up to 20/255 in a bicubic
check).

Decoding relies on PIL's default `ImageFile.LOAD_TRUNCATED_IMAGES = False`: a truncated file fails in
`.load()` instead of giving partial pixels.
"""

from __future__ import annotations

import io
import itertools
import math
import os
from pathlib import Path

import numpy as np
import PIL.Image

RESAMPLE = {"bilinear": PIL.Image.Resampling.BILINEAR, "bicubic": PIL.Image.Resampling.BICUBIC}
FAMILY_RESAMPLE = {"paligemma": "bicubic", "gemma3": "bilinear"}
DICT_KEYS = frozenset({"bytes", "path"})
VALUE_KINDS = "a path (str), bytes, a datasets Image dict {'bytes': ..., 'path': ...} or a PIL image"


class ImageError(ValueError):
    """What is wrong with an image value (the message names the file/kind and what was expected)."""


def _resolve(path: str | os.PathLike, base_dir: str | Path | None) -> Path:
    """The real path of an image file: relative to `base_dir`, symbolic links followed, and inside `base_dir`
    (when given); it must be an existing file."""
    if not str(path):
        raise ImageError("an image path is an empty string; expected the path of an image file")
    if base_dir is None:
        real = Path(path).resolve()
    else:
        root = Path(base_dir).resolve()
        real = (root / path).resolve()  # an absolute `path` replaces root
        if not real.is_relative_to(root):
            raise ImageError(f"image file {str(path)!r} leads to {real}, outside the data directory {root}; image "
                             "paths never leave the directory of their data file")
    if not real.exists():
        raise ImageError(f"image file {str(path)!r} does not exist (looked for {real})")
    if not real.is_file():
        raise ImageError(f"image file {str(path)!r} is not a file ({real})")
    return real


def _to_rgb(image: PIL.Image.Image, name: str = "PIL image") -> PIL.Image.Image:
    """RGB as transformers' `convert_to_rgb` makes it: transparency composited onto white, other modes
    converted by PIL; 16-bit grey scaled to 8 bits first, and LAB's 'A' band not taken for alpha (see the
    module docstring). A mode PIL cannot convert is an ImageError naming `name`."""
    if image.mode.startswith("I;16"):
        wide = np.asarray(image).astype(np.uint32)
        image = PIL.Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    try:
        if (image.mode != "LAB" and "A" in image.getbands()) or image.info.get("transparency") is not None:
            background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")
    except ValueError as e:
        raise ImageError(f"{name} has mode {image.mode}, which PIL cannot convert to RGB ({e})") from e


def _decode(source, name: str) -> PIL.Image.Image:
    """Open a file path or a bytes buffer, decode all its pixels (`.load()`) and convert to RGB."""
    try:
        with PIL.Image.open(source) as image:
            image.load()
    except PIL.UnidentifiedImageError:
        raise ImageError(f"{name} is not an image PIL can read (no known image format)") from None
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, zlib.error ... on broken data
        raise ImageError(f"{name} cannot be decoded, it is corrupt or truncated ({type(e).__name__}: {e})") from e
    return _to_rgb(image, name)


def _check_dict(value: dict) -> None:
    """A datasets Image dict: keys among 'bytes' and 'path', at least one of them set."""
    if not set(value) <= DICT_KEYS or (value.get("bytes") is None and value.get("path") is None):
        raise ImageError(f"an image dict holds 'bytes' and/or 'path' (as the datasets Image feature stores "
                         f"images), got keys {sorted(map(str, value))}")


def _check_bytes(data) -> None:
    """Image bytes: bytes or bytearray, not empty."""
    if not isinstance(data, (bytes, bytearray)):
        raise ImageError(f"image bytes are bytes, got {type(data).__name__}")
    if not data:
        raise ImageError("image bytes are empty; expected the bytes of an image file")


def _wrong_type(value) -> ImageError:
    return ImageError(f"an image value is {VALUE_KINDS}; got {type(value).__name__} {repr(value)[:60]}")


def check_image_value(value, base_dir: str | Path | None) -> None:
    """Cheap validation without decoding pixels (type and, for paths, existence + inside base_dir); raises
    ImageError. Used when rows are tokenised, so that a missing file is reported with its row before training."""
    if isinstance(value, dict):
        _check_dict(value)
        if value.get("bytes") is not None:
            _check_bytes(value["bytes"])
            return
        value = value["path"]
    if isinstance(value, (str, os.PathLike)):
        _resolve(value, base_dir)
    elif isinstance(value, (bytes, bytearray)):
        _check_bytes(value)
    elif not isinstance(value, PIL.Image.Image):
        raise _wrong_type(value)


def open_image(value, base_dir: str | Path | None) -> PIL.Image.Image:
    """Decode one image value to an RGB PIL image.

    `value` is a path (str or os.PathLike; relative paths are relative to `base_dir`, the data file's
    directory; with a `base_dir`, the path after resolving, symbolic links included, must lie inside it,
    absolute paths too), `bytes`, a datasets Image dict (`bytes` used when set, else `path`) or a PIL image.
    A missing file, unreadable, corrupt or truncated data, or data that is no image is an ImageError naming
    the file (or 'image bytes') and why. Every mode is converted to RGB as in the module docstring.
    """
    if isinstance(value, dict):
        _check_dict(value)
        if value.get("bytes") is None:
            return open_image(value["path"], base_dir)
        _check_bytes(value["bytes"])
        name = f"image bytes (of {value['path']!r})" if value.get("path") else "image bytes"
        return _decode(io.BytesIO(value["bytes"]), name)
    if isinstance(value, (str, os.PathLike)):
        return _decode(_resolve(value, base_dir), f"image file {str(value)!r}")
    if isinstance(value, (bytes, bytearray)):
        _check_bytes(value)
        return _decode(io.BytesIO(value), "image bytes")
    if not isinstance(value, PIL.Image.Image):
        raise _wrong_type(value)
    try:
        value.load()
    except Exception as e:
        raise ImageError(f"PIL image cannot be decoded, it is corrupt or truncated ({type(e).__name__}: {e})") from e
    return _to_rgb(value)


def preprocess(image: PIL.Image.Image, size: int, resample: str) -> np.ndarray:
    """[size, size, 3] float32 in [−1, 1]: RGB, resized to size × size by PIL (`resample` "bilinear" or
    "bicubic"), then y = (x/255 − 0.5) / 0.5 = x/255 · 2 − 1, channels last: what transformers' image
    processor of the family computes on a PIL image (see the module docstring), bit for bit."""
    if resample not in RESAMPLE:
        raise ValueError(f"resample is one of {sorted(RESAMPLE)}, got {resample!r}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size is a positive int, got {size!r}")
    resized = _to_rgb(image).resize((size, size), resample=RESAMPLE[resample])
    x = (np.asarray(resized).astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.float32(0.5)) / np.float32(0.5)


def pan_and_scan(image: PIL.Image.Image, *, min_crop_size: int = 256, max_num_crops: int = 4,
                 min_ratio_to_activate: float = 1.2) -> list[PIL.Image.Image]:
    """Gemma 3's pan-and-scan crops of `image` (RGB; the original not included), exactly as transformers'
    Gemma3ImageProcessor computes them (`pan_and_scan` in models/gemma3/image_processing_pil_gemma3.py; the
    defaults here are `Gemma3Processor.images_kwargs`, in processing_gemma3.py); [] when it does not activate.

    Along the long side L (short side S), when L / S ≥ min_ratio_to_activate: n = floor(L/S + 0.5), capped by
    floor(L / min_crop_size), then clamped to [2, max_num_crops]; crops are ceil(L / n) long (the last one cut
    at the image's edge) and the full short side wide, and none is made when a crop's side is below
    min_crop_size. Crops run left to right (or top to bottom).
    """
    if min_crop_size < 1 or max_num_crops < 1:
        raise ValueError(f"min_crop_size and max_num_crops are positive, got {min_crop_size} and {max_num_crops}")
    width, height = image.size
    long_side, short_side = max(width, height), min(width, height)
    if long_side / short_side < min_ratio_to_activate:
        return []
    num = min(math.floor(long_side / short_side + 0.5), math.floor(long_side / min_crop_size))
    num = min(max_num_crops, max(2, num))
    num_w, num_h = (num, 1) if width >= height else (1, num)
    crop_w, crop_h = math.ceil(width / num_w), math.ceil(height / num_h)
    if min(crop_w, crop_h) < min_crop_size:
        return []
    rgb = _to_rgb(image)
    return [rgb.crop((left, top, min(left + crop_w, width), min(top + crop_h, height)))
            for top, left in itertools.product(range(0, crop_h * num_h, crop_h), range(0, crop_w * num_w, crop_w))]


def load_images(values: list, base_dir: str | Path | None, size: int, resample: str) -> np.ndarray:
    """[len(values), size, size, 3] float32: each value opened (`open_image`) and preprocessed (`preprocess`)."""
    if not values:
        return np.zeros((0, size, size, 3), np.float32)
    return np.stack([preprocess(open_image(value, base_dir), size, resample) for value in values])
