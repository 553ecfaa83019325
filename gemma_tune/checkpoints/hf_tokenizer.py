"""The tokenizer and generation files of a Hugging Face Gemma checkpoint.

`write_hf_tokenizer_files(tokenizer, out_dir, arch=None)` copies the SentencePiece model as `tokenizer.model` and
writes `tokenizer_config.json` (GemmaTokenizer, bos added / eos not, Gemma's special tokens and chat
template) and `special_tokens_map.json`; transformers' `AutoTokenizer` builds its fast tokenizer from
these. `generation_config(tokenizer)` stops generation at `<eos>` and `<end_of_turn>`, as Gemma's
instruction-tuned checkpoints do.

A vision model's export also needs what `transformers.AutoProcessor` reads (`write_processor_files`):
  * the image token in the tokenizer: PaliGemma's `<image>`, Gemma 3's `<image_soft_token>`, at the model's
    `image_token_id` — the SentencePiece piece's id, or else an added special token, which transformers
    numbers from the SentencePiece vocabulary's size on, so then image_token_id must be that size (as in the
    real tokenizers: 257152, 262144) — named in `extra_special_tokens` (`image_token`; Gemma 3 also
    `boi_token` `<start_of_image>` and `eoi_token` `<end_of_image>`, which become special tokens so the
    processor's text matches them as single ids);
  * `preprocessor_config.json`: SiglipImageProcessor (PaliGemma) / Gemma3ImageProcessor (Gemma 3) at
    image_size², mean = std = 0.5, rescale 1/255, the family's resampling filter
    (`gemma_tune.data.images.FAMILY_RESAMPLE`: bicubic / bilinear, transformers' defaults), image_seq_length;
  * `processor_config.json`: PaliGemmaProcessor / Gemma3Processor with image_seq_length (tokens per image);
  * Gemma 3: `chat_template.json`, the processor's chat template (`CHAT_TEMPLATE`).
`AutoProcessor.from_pretrained(export)` then turns an image and a prompt into the ids and pixels our model
takes (PaliGemma: `<image>`×N `<bos>` prompt `\n`; Gemma 3: each `<start_of_image>` expanded to
`\n\n<start_of_image>` `<image_soft_token>`×N `<end_of_image>\n\n`).

`CHAT_TEMPLATE` is Gemma 3's Jinja chat template (the one gemma_tune.data renders: roles alternate
user/model, "assistant" is written "model", a system message joins the first user turn followed by a
blank line, contents are trimmed, an image item becomes `<start_of_image>`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from gemma_tune.errors import CheckpointError

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}"
    "{%- set role = \"model\" -%}"
    "{%- else -%}"
    "{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}"
    "{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception(\"Invalid content type\") }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{'<start_of_turn>model\\n'}}"
    "{%- endif -%}"
)

TOKENIZER_FILE = "tokenizer.model"


IMAGE_PIECES = {"paligemma": "<image>", "gemma3": "<image_soft_token>"}
BOI, EOI = "<start_of_image>", "<end_of_image>"
IMAGE_PROCESSORS = {"paligemma": "SiglipImageProcessor", "gemma3": "Gemma3ImageProcessor"}
PROCESSORS = {"paligemma": "PaliGemmaProcessor", "gemma3": "Gemma3Processor"}


def vision_layout(arch) -> str | None:
    """"paligemma" or "gemma3" for a vision model's architecture, None for a text model."""
    if arch is None or arch.vision is None:
        return None
    return "gemma3" if arch.family == "gemma3" else "paligemma"


def image_token_ids(tokenizer, arch) -> dict:
    """{piece: id} of the image tokens a vision model's tokenizer files hold (module docstring): the image
    soft token and, for Gemma 3, `<start_of_image>` / `<end_of_image>`. CheckpointError when the tokenizer
    cannot give them the model's ids."""
    layout = vision_layout(arch)
    piece, image_id = IMAGE_PIECES[layout], arch.vision.image_token_id
    given = tokenizer.token_to_id(piece) if _known(tokenizer, piece) else tokenizer.vocab_size
    if given != image_id:
        how = "its piece's id" if _known(tokenizer, piece) else "the first id after its vocabulary, as an added token"
        raise CheckpointError(f"the model's image_token_id is {image_id}, but the tokenizer gives {piece} {given} "
                              f"({how}); a processor would put the images elsewhere", where="vision.image_token_id")
    ids = {piece: image_id}
    if layout == "gemma3":
        for marker in (BOI, EOI):
            if not _known(tokenizer, marker):
                raise CheckpointError(f"the tokenizer has no {marker} piece, which Gemma 3's processor puts around "
                                      "each image", where=str(tokenizer.model_path))
            ids[marker] = tokenizer.token_to_id(marker)
    return ids


def _known(tokenizer, piece: str) -> bool:
    """Whether the SentencePiece vocabulary holds `piece` (unknown pieces map to `<unk>`'s id)."""
    return piece == "<unk>" or tokenizer.token_to_id(piece) != tokenizer.token_to_id("<unk>")


def special_tokens(tokenizer, arch=None) -> dict:
    """bos/eos/pad/unk pieces and the additional special tokens the vocabulary holds (a vision model's: also its
    image tokens)."""
    pieces = {token_id: piece for piece, token_id in tokenizer.special_ids.items()}
    extra = [piece for piece in ("<start_of_turn>", "<end_of_turn>") if piece in tokenizer.special_ids]
    if vision_layout(arch) is not None:
        extra += [piece for piece in image_token_ids(tokenizer, arch) if piece not in extra]
    return {"bos_token": pieces.get(tokenizer.bos_id, "<bos>"), "eos_token": pieces.get(tokenizer.eos_id, "<eos>"),
            "pad_token": pieces.get(tokenizer.pad_id, "<pad>"), "unk_token": "<unk>",
            "additional_special_tokens": extra}


def generation_config(tokenizer) -> dict:
    """generation_config.json: stop at <eos> or <end_of_turn>."""
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": [tokenizer.eos_id, tokenizer.end_of_turn_id],
            "pad_token_id": tokenizer.pad_id, "do_sample": False}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hf_tokenizer_files(tokenizer, out_dir: str | Path, arch=None) -> None:
    """tokenizer.model, tokenizer_config.json and special_tokens_map.json of `tokenizer` into `out_dir`; for a
    vision model (`arch` with `vision`) with its image tokens (module docstring)."""
    out_dir = Path(out_dir)
    shutil.copyfile(tokenizer.model_path, out_dir / TOKENIZER_FILE)
    tokens = special_tokens(tokenizer, arch)
    config = {"tokenizer_class": "GemmaTokenizer", **tokens, "add_bos_token": True, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False, "padding_side": "left",
              "chat_template": CHAT_TEMPLATE}
    layout = vision_layout(arch)
    if layout is not None:
        ids = image_token_ids(tokenizer, arch)
        image = IMAGE_PIECES[layout]
        config["extra_special_tokens"] = {"image_token": image} if layout == "paligemma" else {
            "boi_token": BOI, "eoi_token": EOI, "image_token": image}
        config["added_tokens_decoder"] = {
            str(token_id): {"content": piece, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True}
            for piece, token_id in ids.items() if token_id >= tokenizer.vocab_size}
        config["processor_class"] = PROCESSORS[layout]
    write_json(out_dir / "special_tokens_map.json", tokens)
    write_json(out_dir / "tokenizer_config.json", config)


def write_processor_files(arch, out_dir: str | Path) -> None:
    """preprocessor_config.json, processor_config.json (and Gemma 3's chat_template.json) of a vision model."""
    from gemma_tune.data.images import FAMILY_RESAMPLE, RESAMPLE

    out_dir = Path(out_dir)
    layout = vision_layout(arch)
    vision = arch.vision
    image = {"do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
             "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
             "image_processor_type": IMAGE_PROCESSORS[layout], "image_seq_length": vision.tokens_per_image,
             "processor_class": PROCESSORS[layout], "resample": int(RESAMPLE[FAMILY_RESAMPLE[layout]]),
             "rescale_factor": 1 / 255, "size": {"height": vision.image_size, "width": vision.image_size}}
    if layout == "gemma3":
        image.update(do_pan_and_scan=None, pan_and_scan_max_num_crops=None, pan_and_scan_min_crop_size=None,
                     pan_and_scan_min_ratio_to_activate=None)
        write_json(out_dir / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    write_json(out_dir / "preprocessor_config.json", dict(sorted(image.items())))
    write_json(out_dir / "processor_config.json", {"image_seq_length": vision.tokens_per_image,
                                                   "processor_class": PROCESSORS[layout]})
