"""Prompts with images for generation: the token layout transformers' processors build, and the pixels.

PaliGemma (`Architecture.prefix_lm`; transformers' PaliGemmaProcessor):

    [image_token_id × tokens_per_image × n_images] <bos> prompt "\\n"

  The whole prompt is the prefix: attention block 1 (bidirectional), the generated tokens causal (block 0),
  as transformers' generate (token_type_ids 0 over the prompt). PaliGemma is not a chat model: no template.

Gemma 3 vision models (Gemma3Processor with its chat template, or the raw text): <bos> then the text, where
each `<start_of_image>` becomes the processor's

    "\\n\\n<start_of_image>" [image_token_id × tokens_per_image] "<end_of_image>\\n\\n"

  A prompt's `<start_of_image>` markers place its images, one marker per image; a prompt without a marker
  but with images gets one marker per image before its text (`<start_of_image>` × n + prompt, what the chat
  template writes for a user turn of image parts then a text part). Each image's run of slots is one
  attention block (`gemma_tune.models.vision.attention_blocks`).

The image token is a special token that the processors' tokenizers split on, so the text between two runs
of slots is tokenised as one string (special strings such as `<start_of_turn>` map to their ids).

Pixels: an image is a path (relative to the working directory), bytes, a datasets Image dict or a PIL
image, opened and preprocessed as transformers' image processor of the family does (`gemma_tune.data.images`:
RGB, resized to `vision.image_size` — bicubic for PaliGemma, bilinear for Gemma 3 — and scaled to [−1, 1]),
or an already preprocessed array [S, S, 3] of floats in [−1, 1]. Gemma 3's pan-and-scan crops are not made.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image

from gemma_tune.data.images import FAMILY_RESAMPLE, ImageError, open_image, preprocess

START_OF_IMAGE, END_OF_IMAGE = "<start_of_image>", "<end_of_image>"
CHAT_PROMPT = "<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n"
NO_VISION = ("this model has no vision encoder: images need a vision model (PaliGemma, or Gemma 3 4B and "
             "larger)")
RANGE_SLACK = 1e-3  # preprocessed arrays may exceed [−1, 1] by rounding only


class VisionPromptError(ValueError):
    """Images that do not fit the model or the prompts (the message says what was expected)."""


def vision_family(architecture) -> str | None:
    """"paligemma" | "gemma3" (the prompt layout and the key of `images.FAMILY_RESAMPLE`), None without vision."""
    if architecture.vision is None:
        return None
    return "paligemma" if architecture.prefix_lm else "gemma3"


def images_per_prompt(architecture, images, count: int) -> list[list] | None:
    """`images` as one list per prompt (None when no prompt has an image).

    `images` is None or a sequence with one entry per prompt: a list (or tuple) of images, an array
    [N, S, S, 3] of N preprocessed images, or a single image. Images for a model without a vision encoder,
    or not one entry per prompt, are a VisionPromptError."""
    if images is None:
        return None
    if isinstance(images, (str, bytes)) or not isinstance(images, (Sequence, np.ndarray)):
        raise VisionPromptError(f"images are one entry per prompt (a list of that prompt's images), got "
                                f"{type(images).__name__}")
    if len(images) != count:
        raise VisionPromptError(f"images are one entry per prompt (a list of that prompt's images): got {len(images)} "
                                f"entries for {count} prompts")
    rows = []
    for entry in images:
        if isinstance(entry, (list, tuple)) or (isinstance(entry, np.ndarray) and entry.ndim == 4):
            rows.append(list(entry))
        elif entry is None:
            rows.append([])
        else:
            rows.append([entry])
    if not any(rows):
        return None
    if architecture.vision is None:
        raise VisionPromptError(NO_VISION)
    return rows


def prompt_ids(tokenizer, architecture, prompt: str, num_images: int = 0, chat: bool = True) -> list[int]:
    """Token ids of one prompt with `num_images` images, laid out for the model (module docstring); a text
    model's (and a Gemma 3 text prompt's) are <bos> + the text, wrapped in the chat template when `chat`."""
    family = vision_family(architecture)
    if family is None and num_images:
        raise VisionPromptError(NO_VISION)
    if family == "paligemma":
        if chat:
            raise VisionPromptError("PaliGemma is not a chat model: its prompt is the raw prefix (e.g. 'caption en'); "
                                    "generate it with chat=False (or chat=None)")
        vision = architecture.vision
        return ([vision.image_token_id] * (vision.tokens_per_image * num_images) + [tokenizer.bos_id]
                + tokenizer.encode(prompt + "\n"))
    if family == "gemma3":
        markers = prompt.count(START_OF_IMAGE)
        if markers == 0 and num_images:
            prompt = START_OF_IMAGE * num_images + prompt
        elif markers != num_images:
            raise VisionPromptError(f"the prompt {prompt[:60]!r} has {markers} {START_OF_IMAGE} markers but "
                                    f"{num_images} images: each marker places one image (a prompt without markers "
                                    "gets its images before its text)")
    text = CHAT_PROMPT.format(prompt=prompt) if chat else prompt
    if family != "gemma3" or not num_images:
        return [tokenizer.bos_id] + tokenizer.encode(text)
    missing = [t for t in (START_OF_IMAGE, END_OF_IMAGE) if t not in tokenizer.special_ids]
    if missing:
        raise VisionPromptError(f"the tokenizer has no {' or '.join(missing)} token; a Gemma 3 vision model needs "
                                "Gemma 3's tokenizer")
    vision = architecture.vision
    slots = [vision.image_token_id] * vision.tokens_per_image
    parts = text.split(START_OF_IMAGE)
    ids = [tokenizer.bos_id] + tokenizer.encode(parts[0] + "\n\n" + START_OF_IMAGE)
    for k, part in enumerate(parts[1:], start=1):
        after = "\n\n" + START_OF_IMAGE if k < len(parts) - 1 else ""
        ids += slots + tokenizer.encode(END_OF_IMAGE + "\n\n" + part + after)
    return ids


PAN_AND_SCAN_INTRO = "Here is the original image "
PAN_AND_SCAN_CROPS = " and here are some crops to help you see better "


def with_pan_and_scan(architecture, prompt: str, images: list) -> tuple[str, list]:
    """(prompt, images) with Gemma 3's pan-and-scan crops, as transformers' Gemma3Processor with
    do_pan_and_scan (and the training data with `data.pan_and_scan`) writes them: an image whose crops
    activate (`gemma_tune.data.images.pan_and_scan`, transformers' defaults) becomes
    "Here is the original image " <image> " and here are some crops to help you see better " <crop> " " <crop> …,
    its images the original then the crops. A prompt without markers gets its images before its text first.
    Only for Gemma 3 vision models, and images given as paths, bytes or PIL images (not preprocessed
    arrays), else a VisionPromptError."""
    from gemma_tune.data.images import pan_and_scan
    from gemma_tune.data.layout import PAN_AND_SCAN

    if vision_family(architecture) != "gemma3":
        raise VisionPromptError("pan-and-scan crops images for Gemma 3 vision models only")
    if not images:
        return prompt, images
    if prompt.count(START_OF_IMAGE) == 0:
        prompt = START_OF_IMAGE * len(images) + prompt
    parts = prompt.split(START_OF_IMAGE)
    if len(parts) - 1 != len(images):
        raise VisionPromptError(f"the prompt {prompt[:60]!r} has {len(parts) - 1} {START_OF_IMAGE} markers but "
                                f"{len(images)} images")
    text, out = parts[0], []
    for k, (value, after) in enumerate(zip(images, parts[1:])):
        if isinstance(value, np.ndarray) or not (isinstance(value, (str, bytes, bytearray, dict, PIL.Image.Image))
                                                 or hasattr(value, "__fspath__")):
            raise VisionPromptError(f"pan-and-scan needs image {k + 1} as a path, bytes or a PIL image (it crops the "
                                    "full-size picture), not preprocessed pixels")
        image = open_image(value, None)
        crops = pan_and_scan(image, **PAN_AND_SCAN)
        if crops:
            text += (PAN_AND_SCAN_INTRO + START_OF_IMAGE + PAN_AND_SCAN_CROPS
                     + " ".join([START_OF_IMAGE] * len(crops)))
        else:
            text += START_OF_IMAGE
        text += after
        out += [image, *crops]
    return text, out


def image_array(value, architecture, where: str = "an image") -> np.ndarray:
    """One image as float32 [S, S, 3] in [−1, 1] for `architecture`'s vision encoder (module docstring).
    An image that cannot be read, or an array of another shape or range, is an ImageError."""
    size = architecture.vision.image_size
    if isinstance(value, (str, bytes, bytearray, dict, PIL.Image.Image)) or hasattr(value, "__fspath__"):
        return preprocess(open_image(value, None), size, FAMILY_RESAMPLE[vision_family(architecture)])
    if not isinstance(value, np.ndarray):
        if not hasattr(value, "shape"):
            raise ImageError(f"{where} is a path, bytes, a PIL image or preprocessed pixels [{size}, {size}, 3] in "
                             f"[-1, 1]; got {type(value).__name__}")
        from keras import ops

        value = ops.convert_to_numpy(value)
    if value.shape != (size, size, 3) or not np.issubdtype(value.dtype, np.floating):
        raise ImageError(f"{where} is an array of {value.dtype} {list(value.shape)}; preprocessed pixels are floats "
                         f"[{size}, {size}, 3] (the model's image_size) in [-1, 1] (pass a path or PIL image to "
                         "have it resized and scaled)")
    value = value.astype(np.float32)
    if not np.isfinite(value).all() or value.min() < -1 - RANGE_SLACK or value.max() > 1 + RANGE_SLACK:
        raise ImageError(f"{where} has values in [{value.min():g}, {value.max():g}]; preprocessed pixels lie in "
                         "[-1, 1] (x / 255 · 2 − 1; pass a path or PIL image to have it scaled)")
    return value


def pixel_batch(architecture, rows: list[list] | None) -> np.ndarray | None:
    """float32 [B, N, S, S, 3]: each row's images in order, zeros after them (N = the most images of a row);
    None when no row has an image."""
    if not rows or not any(rows):
        return None
    size = architecture.vision.image_size
    out = np.zeros((len(rows), max(len(r) for r in rows), size, size, 3), np.float32)
    for b, row in enumerate(rows):
        for i, value in enumerate(row):
            out[b, i] = image_array(value, architecture, f"image {i + 1} of prompt {b + 1}")
    return out


def check_image_slots(architecture, prompt_ids: Sequence[Sequence[int]], rows: list[list] | None) -> None:
    """Every prompt holds `tokens_per_image` slots of `image_token_id` per image it is given (and a model
    without a vision encoder is given no image), else a VisionPromptError."""
    vision = architecture.vision
    if vision is None:
        if rows:
            raise VisionPromptError(NO_VISION)
        return
    for b, ids in enumerate(prompt_ids):
        given = len(rows[b]) if rows else 0
        slots = sum(1 for t in ids if t == vision.image_token_id)
        if slots != given * vision.tokens_per_image:
            raise VisionPromptError(f"prompt {b + 1} holds {slots} image slots (token {vision.image_token_id}) but is "
                                    f"given {given} images of {vision.tokens_per_image} slots each")


def prompt_blocks(architecture, tokens: np.ndarray, real: np.ndarray) -> np.ndarray | None:
    """Attention blocks [B, P] int32 of left-padded prompts `tokens` (`real`: 1 for a real token), by the
    model's own rule (`gemma_tune.models.vision.attention_blocks`): PaliGemma's prefix (every real prompt
    token, block 1), Gemma 3's image runs (1, 2, … per row); None for a model without vision or prompts
    without images (all causal)."""
    from keras import ops

    from gemma_tune.models.vision import attention_blocks

    vision = architecture.vision
    if vision is None or not (architecture.prefix_lm or (tokens == vision.image_token_id).any()):
        return None
    blocks = attention_blocks(tokens, vision.image_token_id, real if architecture.prefix_lm else None)
    return ops.convert_to_numpy(blocks).astype(np.int32)