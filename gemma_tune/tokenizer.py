"""Gemma's SentencePiece tokenizer.

`GemmaTokenizer.encode(text)` returns ids without bos/eos. Special-token strings in the text
(`<start_of_turn>`, `<end_of_turn>`, `<bos>`, …) map to their single ids whether the vocabulary holds
them as user-defined pieces (which SentencePiece already matches in text) or as control pieces (which it
never matches): the text is split on every special string the vocabulary knows, each plain part is
encoded by SentencePiece and each special string becomes its id.

`load_tokenizer(source)` accepts a `.model` file, an HF checkpoint dir (`tokenizer.model`), a keras-hub
preset dir (`assets/tokenizer/vocabulary.spm`), `hf://ORG/NAME` or `kaggle://HANDLE` (only the tokenizer
file is downloaded).
"""

from __future__ import annotations

import re
from pathlib import Path

import sentencepiece as spm

from gemma_tune.errors import CheckpointError

GEMMA_SPECIAL_TOKENS = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<mask>",
                        "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|file_separator|>")
HF_FILE = "tokenizer.model"
KERAS_HUB_FILE = "assets/tokenizer/vocabulary.spm"


class GemmaTokenizer:
    """A SentencePiece model with Gemma's special ids (pad, eos, bos, start/end of turn)."""

    def __init__(self, model_path: str | Path):
        self.model_path = Path(model_path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"not a readable SentencePiece model ({e})", where=str(self.model_path)) from e
        self.vocab_size = int(self._sp.vocab_size())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        self.pad_id = int(self._sp.pad_id())
        self.start_of_turn_id = self._required("<start_of_turn>")
        self.end_of_turn_id = self._required("<end_of_turn>")
        control = {self._sp.id_to_piece(i) for i in range(self.vocab_size) if self._sp.IsControl(i)}
        named = {t for t in GEMMA_SPECIAL_TOKENS if self._known(t)}
        self.special_ids = {piece: int(self._sp.piece_to_id(piece)) for piece in control | named}
        ordered = sorted(self.special_ids, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, ordered)) + ")") if ordered else None

    def _known(self, piece: str) -> bool:
        return not self._sp.IsUnknown(self._sp.piece_to_id(piece))

    def _required(self, piece: str) -> int:
        if not self._known(piece):
            raise CheckpointError(f"the vocabulary has no {piece} piece; expected a Gemma tokenizer",
                                  where=str(self.model_path))
        return int(self._sp.piece_to_id(piece))

    def token_to_id(self, piece: str) -> int:
        """The id of a vocabulary piece (the unknown id when it is not one)."""
        return int(self._sp.piece_to_id(piece))

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, no bos/eos added; special-token strings become their single ids."""
        if self._special_re is None:
            return list(self._sp.encode(text))
        ids: list[int] = []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:
                ids.append(self.special_ids[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids) -> str:
        """Text of `ids`; special pieces (bos, eos, pad, control pieces) are dropped, as SentencePiece does."""
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"GemmaTokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"


def _download(source: str) -> Path:
    if source.startswith("hf://"):
        from huggingface_hub import hf_hub_download
        try:
            return Path(hf_hub_download(source[len("hf://"):], HF_FILE))
        except Exception as e:  # network, auth, missing repo: all a bad source for the user
            raise CheckpointError(f"could not download {HF_FILE} ({e})", where=source) from e
    import kagglehub
    try:
        return Path(kagglehub.model_download(source[len("kaggle://"):], path=KERAS_HUB_FILE))
    except Exception as e:
        raise CheckpointError(f"could not download {KERAS_HUB_FILE} ({e})", where=source) from e


def find_tokenizer_file(source: str | Path) -> Path:
    """The SentencePiece file of `source` (a file, HF dir, keras-hub preset dir, hf:// or kaggle://)."""
    text = str(source)
    if text.startswith(("hf://", "kaggle://")):
        return _download(text)
    path = Path(text)
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / HF_FILE, path / KERAS_HUB_FILE):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"no tokenizer in this directory: expected {HF_FILE} (HF checkpoint) or "
                              f"{KERAS_HUB_FILE} (keras-hub preset)", where=text)
    raise CheckpointError("no such tokenizer file or directory", where=text)


def load_tokenizer(source: str | Path) -> GemmaTokenizer:
    """A `GemmaTokenizer` for `source` (see `find_tokenizer_file`); CheckpointError when missing/invalid."""
    return GemmaTokenizer(find_tokenizer_file(source))
