"""The tokenizer and generation files of a Hugging Face Gemma checkpoint.

`write_hf_tokenizer_files(tokenizer, out_dir)` copies the SentencePiece model as `tokenizer.model` and
writes `tokenizer_config.json` (GemmaTokenizer, bos added / eos not, Gemma's special tokens and chat
template) and `special_tokens_map.json`; transformers' `AutoTokenizer` builds its fast tokenizer from
these. `generation_config(tokenizer)` stops generation at `<eos>` and `<end_of_turn>`, as Gemma's
instruction-tuned checkpoints do.

`CHAT_TEMPLATE` is Gemma 3's Jinja chat template (the one gemma_tune.data renders: roles alternate
user/model, "assistant" is written "model", a system message joins the first user turn followed by a
blank line, contents are trimmed, an image item becomes `<start_of_image>`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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


def special_tokens(tokenizer) -> dict:
    """bos/eos/pad/unk pieces and the additional special tokens the vocabulary holds."""
    pieces = {token_id: piece for piece, token_id in tokenizer.special_ids.items()}
    extra = [piece for piece in ("<start_of_turn>", "<end_of_turn>") if piece in tokenizer.special_ids]
    return {"bos_token": pieces.get(tokenizer.bos_id, "<bos>"), "eos_token": pieces.get(tokenizer.eos_id, "<eos>"),
            "pad_token": pieces.get(tokenizer.pad_id, "<pad>"), "unk_token": "<unk>",
            "additional_special_tokens": extra}


def generation_config(tokenizer) -> dict:
    """generation_config.json: stop at <eos> or <end_of_turn>."""
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": [tokenizer.eos_id, tokenizer.end_of_turn_id],
            "pad_token_id": tokenizer.pad_id, "do_sample": False}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hf_tokenizer_files(tokenizer, out_dir: str | Path) -> None:
    """tokenizer.model, tokenizer_config.json and special_tokens_map.json of `tokenizer` into `out_dir`."""
    out_dir = Path(out_dir)
    shutil.copyfile(tokenizer.model_path, out_dir / TOKENIZER_FILE)
    tokens = special_tokens(tokenizer)
    write_json(out_dir / "special_tokens_map.json", tokens)
    write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "GemmaTokenizer", **tokens, "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False, "padding_side": "left",
        "chat_template": CHAT_TEMPLATE})
