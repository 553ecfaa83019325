"""`prepare(data, tokenizer, seed, architecture=None)`: a recipe's `data:` section -> packed or padded training rows.

Steps: load (load.py) -> tokenise every row into ids + labels with `datasets.map` (render.py; cached
under a fingerprint of the data, the tokenizer file and the settings; `num_proc` workers) -> report or
skip invalid rows (file and 1-based row number) -> carve `eval_fraction` by seed -> truncate
(right|left|drop, counted; a split left without any trained token is a DataError) -> pack
best-fit-decreasing (or one sequence per row; preference pairs always one pair per row) -> arrays of
the batch contract (pack.py) -> `Split`s (batches.py).

Vision models (`architecture.vision`): rows may hold images (render.py, layout.py). Tokenising checks each
image without decoding it (a missing, escaping or non-image file is the row's error, counted and skipped
like any invalid row with `skip_invalid`) and, with `data.pan_and_scan`, reads its size for the crop
count. Data that can hold images (image_text, chat whose contents are lists of parts) is tokenised on
every run, in memory, since its tokens and errors depend on the image files as they are now. A split with
any image is never packed (one sequence per row, whatever `data.packing` says: a row's images are the
runs of image slots in it); truncation that would cut an image's slots leaves the row out (`images_cut`,
counted and warned about). Its `Split` keeps each row's image references (image_batches.ImageRows), and
every batch of a vision model's split has `images` (and `prefix_mask` for PaliGemma).

Preference pairs ignore `truncation`: a sequence over max_length keeps its start (the prompt) and loses
the end of its response; a pair whose prompt alone reaches max_length is dropped (`prompt_too_long`), and
one whose chosen and rejected are then the same tokens is skipped (`identical`), each counted with a
warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field

import datasets

from gemma_tune.data.batches import Split
from gemma_tune.data.image_batches import ImageRows
from gemma_tune.data.layout import END_OF_IMAGE, START_OF_IMAGE, VisionLayout
from gemma_tune.data.load import carve_eval, image_base_dir, load_source
from gemma_tune.data.pack import best_fit_decreasing, build_rows, truncate_pair, truncation_window
from gemma_tune.data.prompts import PromptSplit, build_prompt_split
from gemma_tune.data.render import Tokenise
from gemma_tune.errors import DataError

log = logging.getLogger("gemma_tune.data")

# a preference row's prompt may be implicit in chosen and rejected (render.preference_turns)
REQUIRED_COLUMNS = {"text": ["text"], "prompt_completion": ["prompt", "completion"], "chat": ["messages"],
                    "preference": ["chosen", "rejected"], "image_text": ["image", "prefix", "suffix"],
                    "prompt": ["prompt"]}
RENDER_VERSION = "4"  # bump when rendering changes, so cached tokenisations are not reused
PARALLEL_ROWS = 1000


@dataclass
class PreparedData:
    """`train` / `eval` splits (eval None when there is none) and their `stats` ({"train": {...}, ...}:
    rows, invalid, truncated, dropped, prompt_too_long, identical, images_cut, sequences, without_loss,
    rows_out, tokens, trained_tokens, packing_efficiency).

    `rows` are the valid rows; `rows = sequences + dropped + prompt_too_long + identical + images_cut`
    (`sequences` counts pairs for preference data). `dropped` is truncation: drop (sft formats only);
    `prompt_too_long` and `identical` are preference pairs left out, and 0 for other formats; `images_cut`
    are rows whose truncation would cut an image (0 without images). `truncated` counts sequences (two per
    pair) longer than max_length.
    """

    train: Split | PromptSplit
    eval: Split | PromptSplit | None
    stats: dict = field(default_factory=dict)


@dataclass
class _Source:
    """A loaded data source: its rows (images undecoded), its path, format and, for a vision model, the
    layout of its images and the model's image size."""

    rows: datasets.Dataset
    where: str
    fmt: str
    layout: VisionLayout | None
    image_size: int | None

    def image_rows(self, refs: list) -> ImageRows:
        return ImageRows(self.rows, self.fmt, self.where, self.layout, self.image_size, refs)


def _fingerprint(ds: datasets.Dataset, tokenizer, settings: dict) -> str:
    h = hashlib.sha256(RENDER_VERSION.encode())
    h.update(ds._fingerprint.encode())
    h.update(tokenizer.model_path.read_bytes())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:32]


def _may_hold_images(ds: datasets.Dataset, fmt: str) -> bool:
    """Whether rows of `fmt` in `ds` can hold images: image_text, or chat whose message contents are not
    all strings (lists of parts)."""
    if fmt != "chat":
        return fmt == "image_text"
    messages = ds.features.get("messages")
    content = messages.feature.get("content") if isinstance(getattr(messages, "feature", None), dict) else None
    return not (isinstance(content, datasets.Value) and content.dtype in ("string", "large_string"))


def tokenise(ds: datasets.Dataset, source, data, tokenizer, layout: VisionLayout | None = None) -> datasets.Dataset:
    """Columns input_ids/labels (prefixed chosen_/rejected_ for preference) and error, one row per row, and
    the image columns of `Tokenise` for a vision model's `layout`."""
    required = [c for c in REQUIRED_COLUMNS[source.format] if not (c == "prefix" and source.prefix is not None)]
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        raise DataError(f"format {source.format!r} needs columns {missing}; the data has {ds.column_names} "
                        "(rename with `columns: {expected: in_data}`)", where=source.path)
    if len(ds) == 0:
        raise DataError("the dataset has no rows", where=source.path)
    fn = Tokenise(str(tokenizer.model_path.resolve()), source.format, source.template, data.loss_on, layout,
                  source.prefix, source.system)
    num_proc = data.num_proc or (min(os.cpu_count() or 1, 4) if len(ds) > PARALLEL_ROWS else 1)
    settings = {"format": source.format, "template": source.template, "loss_on": data.loss_on,
                "vision": dataclasses.asdict(layout) if layout is not None else None, "prefix": source.prefix,
                "system": source.system}
    options = {"with_indices": True} if fn.keeps_source_row else {}
    if fn.holds_images:
        options["features"] = fn.features()
        if _may_hold_images(ds, source.format):  # tokens and errors depend on the image files: never cached
            options.update(keep_in_memory=True, load_from_cache_file=False)
    return ds.map(fn, remove_columns=ds.column_names, num_proc=num_proc if num_proc > 1 else None,
                  new_fingerprint=_fingerprint(ds, tokenizer, settings), desc="tokenising", **options)


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


def _sft_sequences(ds: datasets.Dataset, data, stats: dict, slot: int | None):
    """({"": (ids, labels) of each row kept}, the kept rows' indices in `ds`, their prefix masks or None):
    sequences over max_length cut as `data.truncation` says.

    Counts `truncated` (longer than max_length), `dropped` (left out by truncation: drop) and `images_cut`
    (left out because the cut would remove image slots, token id `slot`: never half an image).
    """
    masks = ds["prefix_mask"] if "prefix_mask" in ds.column_names else None
    kept, rows, kept_masks, truncated, cut = [], [], [], 0, 0
    for i, (ids, labels) in enumerate(zip(ds["input_ids"], ds["labels"])):
        truncated += len(ids) > data.max_length
        window = truncation_window(len(ids), data.max_length, data.truncation)
        if window is None:
            continue
        if slot is not None and len(ids) > data.max_length and ids[window].count(slot) != ids.count(slot):
            cut += 1
            continue
        kept.append((ids[window], labels[window]))
        rows.append(i)
        if masks is not None:
            kept_masks.append(masks[i][window])
    stats.update(truncated=truncated, dropped=len(ds) - len(kept) - cut, prompt_too_long=0, identical=0,
                 images_cut=cut)
    return {"": kept}, rows, kept_masks if masks is not None else None


def _preference_pairs(ds: datasets.Dataset, data, stats: dict) -> dict[str, list]:
    """{"chosen_": …, "rejected_": …}: (ids, labels) of each pair kept, in the same order.

    Whatever `data.truncation` says, a sequence over max_length is cut at its end (the prompt's start is
    kept, the response truncated; counted in `truncated`, per sequence). A pair is left out when its prompt
    alone reaches max_length (`prompt_too_long`: no response token would remain), or else when its chosen
    and rejected are the same token ids as cut (`identical`: there is no preference to learn).
    """
    kept = {"chosen_": [], "rejected_": []}
    counts = {"truncated": 0, "dropped": 0, "prompt_too_long": 0, "identical": 0, "images_cut": 0}
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
    """A warning for each kind of preference pair, and for rows with images, left out, with its count."""
    if stats["prompt_too_long"]:
        log.warning("%s: dropped %d preference pairs whose prompt alone reaches max_length=%d (no response token "
                    "would remain; raise data.max_length or shorten the prompts)", where, stats["prompt_too_long"],
                    data.max_length)
    if stats["identical"]:
        log.warning("%s: skipped %d preference pairs whose chosen and rejected are the same tokens (within "
                    "max_length=%d): they carry no preference", where, stats["identical"], data.max_length)
    if stats["images_cut"]:
        log.warning("%s: left out %d rows whose truncation to max_length=%d would cut an image's tokens (raise "
                    "data.max_length)", where, stats["images_cut"], data.max_length)


def _nothing_left(n: int, stats: dict, data, where: str) -> DataError:
    """The DataError for a split whose `n` valid rows were all left out, with the count of each reason."""
    reasons = {"dropped": f"longer than max_length={data.max_length} and truncation is 'drop'",
               "prompt_too_long": f"with a prompt that alone reaches max_length={data.max_length}",
               "identical": "with the same chosen and rejected tokens",
               "images_cut": f"whose truncation to max_length={data.max_length} would cut an image"}
    why = "; ".join(f"{stats[key]} {text}" for key, text in reasons.items() if stats[key])
    return DataError(f"no rows left of {n}: {why}", where=where)


def build_split(ds: datasets.Dataset, data, preference: bool, source: _Source, stats: dict, name: str) -> Split:
    """Truncate, pack and lay out the rows of the tokenised dataset of split `name`; fills `stats`.

    Rows are cut or left out by `_sft_sequences` / `_preference_pairs`; none left is a DataError.
    `without_loss` counts sequences left with no trained target (e.g. right truncation cut the whole
    answer off): they cost compute and teach nothing, so they are reported; when no sequence keeps a
    trained target the split would train (or evaluate) on nothing, a DataError. A split with images is not
    packed (module docstring).
    """
    where, rows, masks = source.where, None, None
    if preference:
        columns = _preference_pairs(ds, data, stats)
    else:
        slot = source.layout.image_token_id if source.layout is not None else None
        columns, rows, masks = _sft_sequences(ds, data, stats, slot)
    kept = len(next(iter(columns.values())))
    stats.update(sequences=kept, tokens=0, trained_tokens=0, without_loss=0)
    _warn_left_out(stats, data, where)
    if not kept:
        raise _nothing_left(len(ds), stats, data, where)
    vision = "source_row" in ds.column_names  # a vision model's sft rows (Tokenise.holds_images)
    crops = []
    if vision:
        all_crops = list(ds["image_crops"])
        crops = [tuple(all_crops[i]) for i in rows]
    with_images = any(crops)
    packing = data.packing and not preference and not with_images
    if data.packing and with_images:
        log.info("%s: rows with images are not packed (one sequence per row, whatever data.packing says)", name)
    arrays, real_per_row = {}, 0
    for p, sequences in columns.items():
        lengths = [len(ids) for ids, _ in sequences]
        groups = best_fit_decreasing(lengths, data.max_length) if packing else [[i] for i in range(len(sequences))]
        built = build_rows(sequences, groups, data.max_length, masks)
        arrays.update({p + k: built[k] for k in built})
        real_per_row = real_per_row + (built["segment_ids"] > 0).sum(axis=1)
        stats["tokens"] += sum(lengths)
        stats["trained_tokens"] += int(built["loss_mask"].sum())
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
    images = None
    if vision and with_images:  # one reference per row: (index in the loaded data, crops of each image)
        sources = list(ds["source_row"])
        images = source.image_rows([(sources[i], c) for i, c in zip(rows, crops)])
    return Split(arrays, real_per_row, bucketed=not packing, images=images)


def _layout(data, source, architecture, tokenizer) -> VisionLayout | None:
    """The vision layout of `source`'s rows for `architecture` (None: a text model); a Gemma 3 layout needs
    the tokenizer's image pieces."""
    layout = VisionLayout.of(architecture, data.pan_and_scan, image_base_dir(source))
    if layout is not None and layout.family == "gemma3":
        missing = [p for p in (START_OF_IMAGE, END_OF_IMAGE) if p not in tokenizer.special_ids]
        if missing:
            raise DataError(f"the tokenizer has no {' or '.join(missing)} piece: Gemma 3 images need a Gemma 3 "
                            "tokenizer", where=str(tokenizer.model_path))
    return layout


def _tokenised_source(source, data, tokenizer, cache_dir, architecture):
    """(tokenised valid rows, number of invalid rows skipped, the `_Source`) of one `DataSource`."""
    rows = load_source(source, cache_dir)
    layout = _layout(data, source, architecture, tokenizer)
    ds, invalid = check_rows(tokenise(rows, source, data, tokenizer, layout), source.path, data.skip_invalid)
    size = architecture.vision.image_size if layout is not None else None
    return ds, invalid, _Source(rows, source.path, source.format, layout, size)


def prepare(data, tokenizer, seed: int, cache_dir: str | None = None, architecture=None) -> PreparedData:
    """Prepared train (and eval) splits for a recipe's `data:` section (`gemma_tune.config.schema.DataSection`),
    rendered for the model's `architecture` (`gemma_tune.models.config.Architecture`; None = a text model:
    its `vision` decides whether rows may hold images, and their layout)."""
    preference = data.train.format == "preference"
    prompts = data.train.format == "prompt"
    if data.eval is not None and (data.eval.format == "preference") != preference:
        raise DataError("train and eval must both be preference data or both not", where="data.eval.format")
    if data.eval is not None and (data.eval.format == "prompt") != prompts:
        raise DataError("train and eval must both be prompts (online RL) or both not", where="data.eval.format")
    train, invalid, source = _tokenised_source(data.train, data, tokenizer, cache_dir, architecture)
    parts = {"train": (train, source, invalid)}
    if data.eval is not None:
        evaluation, eval_invalid, eval_source = _tokenised_source(data.eval, data, tokenizer, cache_dir, architecture)
        parts["eval"] = (evaluation, eval_source, eval_invalid)
    elif data.eval_fraction > 0:
        train, evaluation = carve_eval(train, data.eval_fraction, seed, where=data.train.path)
        parts = {"train": (train, source, invalid), "eval": (evaluation, source, 0)}
    stats, splits = {}, {}
    for name, (ds, origin, invalid) in parts.items():
        if len(ds) == 0:
            raise DataError("no valid rows left after skipping invalid ones", where=origin.where)
        stats[name] = {"rows": len(ds), "invalid": invalid}
        if prompts:
            splits[name] = build_prompt_split(ds, origin.rows, data, stats[name], origin.where)
        else:
            splits[name] = build_split(ds, data, preference, origin, stats[name], name)
    for name, s in stats.items():
        pairs = f", {s['prompt_too_long']} prompt too long, {s['identical']} identical" if preference else \
            f", {s['prompt_too_long']} prompts over max_length" if prompts else ""
        cut = f", {s['images_cut']} cutting an image" if s["images_cut"] else ""
        log.info("data %s: %d rows (%d invalid skipped, %d truncated, %d dropped%s%s) -> %d sequences in %d rows "
                 "of %d, %d tokens (%d trained), packing efficiency %.1f%%", name, s["rows"], s["invalid"],
                 s["truncated"], s["dropped"], pairs, cut, s["sequences"], s["rows_out"], data.max_length, s["tokens"],
                 s["trained_tokens"], 100 * s["packing_efficiency"])
    return PreparedData(splits["train"], splits.get("eval"), stats)
