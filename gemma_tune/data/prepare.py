"""`prepare(data, tokenizer, seed)`: a recipe's `data:` section -> packed or padded training rows.

Steps: load (load.py) -> tokenise every row into ids + labels with `datasets.map` (render.py; cached
under a fingerprint of the data, the tokenizer file and the settings; `num_proc` workers) -> report or
skip invalid rows (file and 1-based row number) -> carve `eval_fraction` by seed -> truncate
(right|left|drop, counted; a split left without any trained token is a DataError) -> pack
best-fit-decreasing (or one sequence per row; preference pairs always one pair per row) -> arrays of
the batch contract (pack.py) -> `Split`s (batches.py).

Preference pairs ignore `truncation`: a sequence over max_length keeps its start (the prompt) and loses
the end of its response; a pair whose prompt alone reaches max_length is dropped (`prompt_too_long`), and
one whose chosen and rejected are then the same tokens is skipped (`identical`), each counted with a
warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field

import datasets

from gemma_tune.data.batches import Split
from gemma_tune.data.load import carve_eval, load_source
from gemma_tune.data.pack import KEYS, best_fit_decreasing, build_rows, truncate, truncate_pair
from gemma_tune.data.render import Tokenise
from gemma_tune.errors import DataError

log = logging.getLogger("gemma_tune.data")

# a preference row's prompt may be implicit in chosen and rejected (render.preference_turns)
REQUIRED_COLUMNS = {"text": ["text"], "prompt_completion": ["prompt", "completion"], "chat": ["messages"],
                    "preference": ["chosen", "rejected"]}
RENDER_VERSION = "3"  # bump when rendering changes, so cached tokenisations are not reused
PARALLEL_ROWS = 1000


@dataclass
class PreparedData:
    """`train` / `eval` splits (eval None when there is none) and their `stats` ({"train": {...}, ...}:
    rows, invalid, truncated, dropped, prompt_too_long, identical, sequences, without_loss, rows_out,
    tokens, trained_tokens, packing_efficiency).

    `rows` are the valid rows; `rows = sequences + dropped + prompt_too_long + identical` (`sequences`
    counts pairs for preference data). `dropped` is truncation: drop (sft formats only); `prompt_too_long`
    and `identical` are preference pairs left out, and 0 for other formats. `truncated` counts sequences
    (two per pair) longer than max_length.
    """

    train: Split
    eval: Split | None
    stats: dict = field(default_factory=dict)


def _fingerprint(ds: datasets.Dataset, tokenizer, settings: dict) -> str:
    h = hashlib.sha256(RENDER_VERSION.encode())
    h.update(ds._fingerprint.encode())
    h.update(tokenizer.model_path.read_bytes())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:32]


def tokenise(ds: datasets.Dataset, source, data, tokenizer) -> datasets.Dataset:
    """Columns input_ids/labels (prefixed chosen_/rejected_ for preference) and error, one row per row."""
    missing = [c for c in REQUIRED_COLUMNS[source.format] if c not in ds.column_names]
    if missing:
        raise DataError(f"format {source.format!r} needs columns {missing}; the data has {ds.column_names} "
                        "(rename with `columns: {expected: in_data}`)", where=source.path)
    if len(ds) == 0:
        raise DataError("the dataset has no rows", where=source.path)
    fn = Tokenise(str(tokenizer.model_path.resolve()), source.format, source.template, data.loss_on)
    num_proc = data.num_proc or (min(os.cpu_count() or 1, 4) if len(ds) > PARALLEL_ROWS else 1)
    settings = {"format": source.format, "template": source.template, "loss_on": data.loss_on}
    return ds.map(fn, remove_columns=ds.column_names, num_proc=num_proc if num_proc > 1 else None,
                  new_fingerprint=_fingerprint(ds, tokenizer, settings), desc="tokenising")


def check_rows(ds: datasets.Dataset, where: str, skip_invalid: bool) -> tuple[datasets.Dataset, int]:
    """(valid rows, number skipped); an invalid row is a DataError unless `skip_invalid`.

    Rows are numbered from 1 in the order of the data (a JSONL file's line number; in a directory, the
    files are read in name order).
    """
    errors = ds["error"]
    bad = [i for i, e in enumerate(errors) if e]
    if bad and not skip_invalid:
        first = bad[0]
        more = f" ({len(bad) - 1} more invalid rows; set data.skip_invalid: true to skip them)" if len(bad) > 1 \
            else " (set data.skip_invalid: true to skip such rows)"
        raise DataError(errors[first] + more, where=f"{where}: row {first + 1}")
    if bad:
        shown = ", ".join(str(i + 1) for i in bad[:10]) + (" …" if len(bad) > 10 else "")
        log.warning("%s: skipped %d invalid rows (rows %s); first: %s", where, len(bad), shown, errors[bad[0]])
        ds = ds.select([i for i, e in enumerate(errors) if not e])
    return ds, len(bad)


def _sft_sequences(ds: datasets.Dataset, data, stats: dict) -> dict[str, list]:
    """{"": (ids, labels) of each row kept}: sequences over max_length cut as `data.truncation` says.

    Counts `truncated` (longer than max_length) and `dropped` (left out by truncation: drop).
    """
    kept, truncated = [], 0
    for ids, labels in zip(ds["input_ids"], ds["labels"]):
        truncated += len(ids) > data.max_length
        cut = truncate(ids, labels, data.max_length, data.truncation)
        if cut is not None:
            kept.append(cut)
    stats.update(truncated=truncated, dropped=len(ds) - len(kept), prompt_too_long=0, identical=0)
    return {"": kept}


def _preference_pairs(ds: datasets.Dataset, data, stats: dict) -> dict[str, list]:
    """{"chosen_": …, "rejected_": …}: (ids, labels) of each pair kept, in the same order.

    Whatever `data.truncation` says, a sequence over max_length is cut at its end (the prompt's start is
    kept, the response truncated; counted in `truncated`, per sequence). A pair is left out when its prompt
    alone reaches max_length (`prompt_too_long`: no response token would remain), or else when its chosen
    and rejected are the same token ids as cut (`identical`: there is no preference to learn).
    """
    kept = {"chosen_": [], "rejected_": []}
    counts = {"truncated": 0, "dropped": 0, "prompt_too_long": 0, "identical": 0}
    sequences = [zip(ds[f"{p}input_ids"], ds[f"{p}labels"]) for p in kept]
    for chosen, rejected in zip(*sequences):
        counts["truncated"] += (len(chosen[0]) > data.max_length) + (len(rejected[0]) > data.max_length)
        pair = truncate_pair(chosen, rejected, data.max_length)
        if pair is None:
            counts["prompt_too_long"] += 1
        elif pair[0][0] == pair[1][0]:
            counts["identical"] += 1
        else:
            kept["chosen_"].append(pair[0])
            kept["rejected_"].append(pair[1])
    stats.update(counts)
    return kept


def _warn_left_out(stats: dict, data, where: str) -> None:
    """A warning for each kind of preference pair left out, with its count."""
    if stats["prompt_too_long"]:
        log.warning("%s: dropped %d preference pairs whose prompt alone reaches max_length=%d (no response token "
                    "would remain; raise data.max_length or shorten the prompts)", where, stats["prompt_too_long"],
                    data.max_length)
    if stats["identical"]:
        log.warning("%s: skipped %d preference pairs whose chosen and rejected are the same tokens (within "
                    "max_length=%d): they carry no preference", where, stats["identical"], data.max_length)


def _nothing_left(n: int, stats: dict, data, where: str) -> DataError:
    """The DataError for a split whose `n` valid rows were all left out, with the count of each reason."""
    reasons = {"dropped": f"longer than max_length={data.max_length} and truncation is 'drop'",
               "prompt_too_long": f"with a prompt that alone reaches max_length={data.max_length}",
               "identical": "with the same chosen and rejected tokens"}
    why = "; ".join(f"{stats[key]} {text}" for key, text in reasons.items() if stats[key])
    return DataError(f"no rows left of {n}: {why}", where=where)


def build_split(ds: datasets.Dataset, data, preference: bool, where: str, stats: dict, name: str) -> Split:
    """Truncate, pack and lay out the rows of the tokenised dataset of split `name`; fills `stats`.

    Rows are cut or left out by `_sft_sequences` / `_preference_pairs`; none left is a DataError.
    `without_loss` counts sequences left with no trained target (e.g. right truncation cut the whole
    answer off): they cost compute and teach nothing, so they are reported; when no sequence keeps a
    trained target the split would train (or evaluate) on nothing, a DataError.
    """
    columns = (_preference_pairs if preference else _sft_sequences)(ds, data, stats)
    kept = len(next(iter(columns.values())))
    stats.update(sequences=kept, tokens=0, trained_tokens=0, without_loss=0)
    _warn_left_out(stats, data, where)
    if not kept:
        raise _nothing_left(len(ds), stats, data, where)
    arrays, real_per_row = {}, 0
    for p, sequences in columns.items():
        lengths = [len(ids) for ids, _ in sequences]
        groups = (best_fit_decreasing(lengths, data.max_length) if data.packing and not preference
                  else [[i] for i in range(len(sequences))])
        rows = build_rows(sequences, groups, data.max_length)
        arrays.update({p + k: rows[k] for k in KEYS})
        real_per_row = real_per_row + (rows["segment_ids"] > 0).sum(axis=1)
        stats["tokens"] += sum(lengths)
        stats["trained_tokens"] += int(rows["loss_mask"].sum())
        stats["without_loss"] += sum(1 for _, labels in sequences if not any(labels[1:]))
    if stats["trained_tokens"] == 0:
        raise DataError(f"{name}: all {stats['without_loss']} sequences lost every trained token after truncation "
                        f"(max_length={data.max_length}, truncation={data.truncation}); raise data.max_length, use "
                        "truncation: left (keeps the end of each sequence) or drop, or train on every token with "
                        "loss_on: all", where=where)
    stats["rows_out"] = len(real_per_row)
    stats["packing_efficiency"] = stats["tokens"] / (len(real_per_row) * len(columns) * data.max_length)
    if stats["without_loss"]:
        log.warning("%s: %d sequences have no trained token after truncation (max_length=%d, truncation=%s)",
                    where, stats["without_loss"], data.max_length, data.truncation)
    return Split(arrays, real_per_row, bucketed=not data.packing or preference)


def _tokenised_source(source, data, tokenizer, cache_dir):
    """(tokenised valid rows, number of invalid rows skipped) of one `DataSource`."""
    ds = tokenise(load_source(source, cache_dir), source, data, tokenizer)
    return check_rows(ds, source.path, data.skip_invalid)


def prepare(data, tokenizer, seed: int, cache_dir: str | None = None) -> PreparedData:
    """Prepared train (and eval) splits for a recipe's `data:` section (`gemma_tune.config.schema.DataSection`)."""
    preference = data.train.format == "preference"
    if data.eval is not None and (data.eval.format == "preference") != preference:
        raise DataError("train and eval must both be preference data or both not", where="data.eval.format")
    train, invalid = _tokenised_source(data.train, data, tokenizer, cache_dir)
    parts = {"train": (train, data.train.path, invalid)}
    if data.eval is not None:
        evaluation, eval_invalid = _tokenised_source(data.eval, data, tokenizer, cache_dir)
        parts["eval"] = (evaluation, data.eval.path, eval_invalid)
    elif data.eval_fraction > 0:
        train, evaluation = carve_eval(train, data.eval_fraction, seed, where=data.train.path)
        parts = {"train": (train, data.train.path, invalid), "eval": (evaluation, data.train.path, 0)}
    stats, splits = {}, {}
    for name, (ds, where, invalid) in parts.items():
        if len(ds) == 0:
            raise DataError("no valid rows left after skipping invalid ones", where=where)
        stats[name] = {"rows": len(ds), "invalid": invalid}
        splits[name] = build_split(ds, data, preference, where, stats[name], name)
    for name, s in stats.items():
        pairs = f", {s['prompt_too_long']} prompt too long, {s['identical']} identical" if preference else ""
        log.info("data %s: %d rows (%d invalid skipped, %d truncated, %d dropped%s) -> %d sequences in %d rows "
                 "of %d, %d tokens (%d trained), packing efficiency %.1f%%", name, s["rows"], s["invalid"],
                 s["truncated"], s["dropped"], pairs, s["sequences"], s["rows_out"], data.max_length, s["tokens"],
                 s["trained_tokens"], 100 * s["packing_efficiency"])
    return PreparedData(splits["train"], splits.get("eval"), stats)
