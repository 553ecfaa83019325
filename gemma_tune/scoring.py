"""`score(model, data)`: a reward model's scores of prompt/response rows or of preference pairs.

Rows (a data file as `data.train.path` reads it — jsonl/json/parquet/csv or a hub dataset — or a list of
dicts), all of one kind, told by their columns:
  * `prompt` and `completion` (or `response`): one user turn and the model's answer;
  * `messages`: a conversation ending with a model turn;
  * `chosen` and `rejected` (with `prompt`, or full conversations sharing their prompt turns): a preference
    pair, both sides scored.
Each is rendered with Gemma's chat template exactly as the data pipeline renders it for training
(`gemma_tune.data.render.Tokenise`: bos, turns, each model turn's `<end_of_turn>\\n`), so a reward run's
model scores what it was trained on. A sequence longer than `max_length` (default: the model's context)
keeps its start, as training cuts preference sequences. Sequences are scored in right-padded batches of
one shape (`batch_size` rows of the longest sequence's length; a last batch filled with empty rows), the
score of a row being the head on its last real token (`gemma_tune.models.reward`).

`Scores` holds `scores` (one per row), or for pairs `chosen`, `rejected` and `accuracy` (the share of
pairs scored r_chosen > r_rejected: the reward run's eval `accuracy` on the same pairs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gemma_tune.errors import CheckpointError, DataError, UserError

EXPECTED = ("expected rows with prompt and completion (or response), messages (ending with a model turn), or "
            "chosen and rejected (with a prompt, or as conversations sharing their prompt turns)")
NOT_A_REWARD_MODEL = ("not a reward model: expected a run of method: reward, or a one-label "
                      "*ForSequenceClassification checkpoint or PEFT adapter (as `gemma-tune export` writes them)")


@dataclass(frozen=True)
class Scores:
    """Per-row `scores` (prompt/response and messages rows), or `chosen`, `rejected` and `accuracy` (pairs)."""

    scores: list[float] | None = None
    chosen: list[float] | None = None
    rejected: list[float] | None = None
    accuracy: float | None = None


def _rows(data, where: str) -> tuple[list[dict], set[str]]:
    """(rows, column names) of a path (read as a recipe's data source) or of a list of dicts."""
    if isinstance(data, (str, Path)):
        from gemma_tune.config.schema import DataSource
        from gemma_tune.data.load import load_source

        ds = load_source(DataSource(path=str(data), format="any"))  # (the columns tell the kind)
        return list(ds), set(ds.column_names)
    rows = list(data)
    if not all(isinstance(row, dict) for row in rows):
        raise DataError("expected rows as dicts of columns", where=where)
    return rows, set().union(*rows) if rows else set()


def _kind(columns: set[str], where: str) -> str:
    if {"chosen", "rejected"} <= columns:
        return "preference"
    if "messages" in columns:
        return "chat"
    if "prompt" in columns and columns & {"completion", "response"}:
        return "prompt_completion"
    raise DataError(f"{EXPECTED}; the data has columns {sorted(columns)}", where=where)


def _sequences(rows: list[dict], kind: str, tokenizer, where: str) -> list[list[int]]:
    """Token ids of every row as training renders it (module docstring); pairs give all chosen sequences,
    then all rejected ones. A row that does not fit is a DataError naming it (1-based)."""
    from gemma_tune.data.render import Tokenise

    render = Tokenise(str(tokenizer.model_path), kind, "chat", "completion")
    names = ("chosen_", "rejected_") if kind == "preference" else ("",)
    out: dict[str, list[list[int]]] = {name: [] for name in names}
    for i, row in enumerate(rows, start=1):
        if kind == "prompt_completion" and row.get("completion") is None:
            row = {"prompt": row.get("prompt"), "completion": row.get("response")}
        tokens = render(row)
        if tokens["error"]:
            raise DataError(f"row {i}: {tokens['error']} ({EXPECTED})", where=where)
        for name in names:
            out[name].append(tokens[f"{name}input_ids"])
    return [ids for name in names for ids in out[name]]


def score_sequences(model, ids: list[list[int]], *, batch_size: int = 8, max_length: int | None = None,
                    pad_id: int = 0) -> np.ndarray:
    """float32 [len(ids)]: `model`'s (a RewardModel's) score of each token sequence, cut to `max_length`
    (default: the model's context), in right-padded batches of one shape."""
    limit = max_length or model.architecture.max_position_embeddings
    ids = [seq[:limit] for seq in ids]
    length = max(len(seq) for seq in ids)
    rows = -(-len(ids) // batch_size) * batch_size
    token_ids = np.full((rows, length), pad_id, np.int32)
    padding_mask = np.zeros((rows, length), np.int32)
    for r, seq in enumerate(ids):
        token_ids[r, :len(seq)] = seq
        padding_mask[r, :len(seq)] = 1
    scores = model.predict({"token_ids": token_ids, "padding_mask": padding_mask}, batch_size=batch_size,
                           verbose=0)
    return np.asarray(scores, np.float32).reshape(-1)[:len(ids)]


def score(model, data, *, batch_size: int = 8, max_length: int | None = None, tokenizer=None,
          dtype: str = "float32", preset: str | None = None) -> Scores:
    """The scores of `data`'s rows (module docstring) under `model`: a `RewardModel`, or a source
    `gemma_tune.load_model` reads (a reward run directory, an export of one, hf://…). `tokenizer`: a
    `GemmaTokenizer` or what `load_tokenizer` reads; default the one beside the model's weights (needed when
    `model` is a model object). `dtype` and `preset` are load_model's, for a source."""
    from gemma_tune.models import RewardModel
    from gemma_tune.tokenizer import GemmaTokenizer, load_tokenizer

    if batch_size < 1 or (max_length is not None and max_length < 2):
        raise UserError(f"expected batch_size >= 1 and max_length >= 2, got {batch_size} and {max_length}")
    where = str(data) if isinstance(data, (str, Path)) else "rows"
    if isinstance(model, (str, Path)):
        from gemma_tune.loading import load_model_and_tokenizer

        source = str(model)
        model, tokenizer = load_model_and_tokenizer(model, preset=preset, dtype=dtype, tokenizer=tokenizer)
    else:
        source = type(model).__name__
        if tokenizer is None:
            raise UserError("a model object needs its tokenizer: pass tokenizer= (a GemmaTokenizer or its path)")
    if not isinstance(model, RewardModel):
        raise CheckpointError(NOT_A_REWARD_MODEL, where=source)
    if not isinstance(tokenizer, GemmaTokenizer):
        tokenizer = load_tokenizer(tokenizer)
    rows, columns = _rows(data, where)
    if not rows:
        raise DataError("no rows to score", where=where)
    kind = _kind(columns, where)
    values = score_sequences(model, _sequences(rows, kind, tokenizer, where), batch_size=batch_size,
                             max_length=max_length, pad_id=tokenizer.pad_id).tolist()
    if kind != "preference":
        return Scores(scores=values)
    chosen, rejected = values[:len(rows)], values[len(rows):]
    accuracy = float(np.mean(np.greater(chosen, rejected)))
    return Scores(chosen=chosen, rejected=rejected, accuracy=accuracy)
