"""Where images sit in the token sequence of a vision model, as transformers' processors put them.

The text holds `tokens_per_image` slots of the architecture's `image_token_id` for each image (a
`VisionLayout`), never trained on; the model replaces them by the image's soft tokens, the k-th run of
slots in a row being the row's image k.

- PaliGemma (transformers' PaliGemmaProcessor): `[slots of every image] <bos> prefix "\\n" suffix <eos>`,
  rendered by `gemma_tune.data.render`; here an image is its slots alone.
- Gemma 3 (Gemma3Processor): each image, written `<start_of_image>` by the chat template, becomes the
  processor's `full_image_sequence` = "\\n\\n<start_of_image>" [slots] "<end_of_image>\\n\\n", merged with
  the text around it before tokenising (the processor tokenises the expanded text as one string). With
  pan-and-scan, an image whose crops activate becomes "Here is the original image " + full sequence +
  " and here are some crops to help you see better " + the crops' full sequences joined by " ", and
  stands for 1 + crops images (the original first).

The crop count depends only on the image's size, read from its header (PIL opens it without decoding
pixels), so tokenising never decodes an image.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import PIL.Image

from gemma_tune.data.images import ImageError, check_image_value
from gemma_tune.errors import DataError

# transformers' Gemma3Processor.images_kwargs, the defaults of `images.pan_and_scan`
PAN_AND_SCAN = {"min_crop_size": 256, "max_num_crops": 4, "min_ratio_to_activate": 1.2}
START_OF_IMAGE, END_OF_IMAGE = "<start_of_image>", "<end_of_image>"


@dataclass(frozen=True)
class ImageRef:
    """An image's place in a rendered row: `value` as the row gives it (a path relative to the data file's
    directory, bytes, a datasets Image dict {"bytes", "path"})."""

    value: object


@dataclass(frozen=True)
class VisionLayout:
    """How a vision model's rows hold images: `family` "paligemma" | "gemma3" (the layout, and the key of
    `images.FAMILY_RESAMPLE`), the slot id and count per image, pan-and-scan (Gemma 3), and `base_dir`, the
    directory image paths are relative to (None for hub datasets)."""

    family: str
    image_token_id: int
    tokens_per_image: int
    pan_and_scan: bool
    base_dir: str | None

    @classmethod
    def of(cls, architecture, pan_and_scan: bool, base_dir: str | None) -> VisionLayout | None:
        """The layout of `architecture` (None for a model without a vision encoder, or no architecture);
        pan-and-scan on anything but a Gemma 3 vision model is a DataError."""
        vision = architecture.vision if architecture is not None else None
        family = None if vision is None else "gemma3" if architecture.family == "gemma3" else "paligemma"
        if pan_and_scan and family != "gemma3":
            raise DataError("pan-and-scan crops images for Gemma 3 vision models only; this model is "
                            f"{'a PaliGemma' if family else 'without a vision encoder'}: set it to false",
                            where="data.pan_and_scan")
        if family is None:
            return None
        return cls(family, vision.image_token_id, vision.tokens_per_image, pan_and_scan, base_dir)


def crop_count(width: int, height: int) -> int:
    """The number of crops `images.pan_and_scan` makes of an image of this size with `PAN_AND_SCAN`
    (0 when it does not activate)."""
    long_side, short_side = max(width, height), min(width, height)
    if long_side / short_side < PAN_AND_SCAN["min_ratio_to_activate"]:
        return 0
    n = min(math.floor(long_side / short_side + 0.5), math.floor(long_side / PAN_AND_SCAN["min_crop_size"]))
    n = min(PAN_AND_SCAN["max_num_crops"], max(2, n))
    crop_long, crop_short = math.ceil(long_side / n), short_side
    return 0 if min(crop_long, crop_short) < PAN_AND_SCAN["min_crop_size"] else n


def _header_source(value, base_dir: str | None):
    """(what PIL opens, the name errors give) of a value that passed `check_image_value`."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return io.BytesIO(value["bytes"]), f"image bytes (of {value['path']!r})" if value.get("path") else \
                "image bytes"
        value = value["path"]
    if isinstance(value, (bytes, bytearray)):
        return io.BytesIO(value), "image bytes"
    path = Path(value) if base_dir is None else Path(base_dir) / value
    return path, f"image file {os.fspath(value)!r}"


def inspect_image(value, layout: VisionLayout) -> int:
    """The crops of one image value under `layout` (0 without pan-and-scan), after the checks that need no
    decoding: `check_image_value` (a path inside the data directory that exists, bytes, a datasets Image
    dict) and a header PIL recognises. Any problem is an ImageError naming the file."""
    check_image_value(value, layout.base_dir)
    if isinstance(value, PIL.Image.Image):
        size = value.size
    else:
        source, name = _header_source(value, layout.base_dir)
        try:
            with PIL.Image.open(source) as image:
                size = image.size
        except PIL.UnidentifiedImageError:
            raise ImageError(f"{name} is not an image PIL can read (no known image format)") from None
        except OSError as e:
            raise ImageError(f"{name} cannot be read ({e.strerror or e})") from e
    return crop_count(*size) if layout.pan_and_scan else 0


def _gemma3_segments(crops: int, run: list) -> list:
    """Text and slot pieces of one Gemma 3 image with `crops` pan-and-scan crops (`run`: its slots)."""
    full = [f"\n\n{START_OF_IMAGE}", *run, f"{END_OF_IMAGE}\n\n"]
    if not crops:
        return full
    scans = []
    for k in range(crops):
        scans += ([" "] if k else []) + full
    return ["Here is the original image ", *full, " and here are some crops to help you see better ", *scans]


def place_images(pieces: list, layout: VisionLayout) -> tuple[list, list[int]]:
    """(pieces with every image piece replaced by its layout, crops of each image in order).

    An image piece is `(ImageRef, None, False)` (render.py's pieces); its slots become pieces
    `(None, image_token_id, False)`. Adjacent text pieces of the same label are merged, so that text around
    an image tokenises as the processor's one string does. An image that fails `inspect_image` raises
    its ImageError.
    """
    run = [(None, layout.image_token_id, False)] * layout.tokens_per_image
    out, crops = [], []
    for piece in pieces:
        if not isinstance(piece[0], ImageRef):
            parts = [piece]
        else:
            crops.append(inspect_image(piece[0].value, layout))
            parts = run if layout.family == "paligemma" else [
                (p, None, False) if isinstance(p, str) else p for p in _gemma3_segments(crops[-1], run)]
        for part in parts:
            last = out[-1] if out else None
            if isinstance(part[0], str) and last is not None and isinstance(last[0], str) and last[2] == part[2]:
                out[-1] = (last[0] + part[0], None, last[2])
            else:
                out.append(part)
    return out, crops
