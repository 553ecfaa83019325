"""Truncation, best-fit-decreasing packing and the batch arrays of docs/CONTRACTS.md.

For a row of T slots holding segments s = 1..k (0 = padding) with tokens x and labels l (1 = trained):
    positions[t]  = t - start(segment of t)
    target_ids[t] = x[t+1] if segment[t+1] == segment[t] != 0 else 0
    loss_mask[t]  = l[t+1] under the same condition, else 0.0
so no target, position or (through segment ids) attention crosses a segment boundary. A PaliGemma
split also has `prefix_mask` (int32, 1 over each segment's prefix tokens, 0 elsewhere and on padding).
"""

from __future__ import annotations

import bisect

import numpy as np

KEYS = ("token_ids", "segment_ids", "positions", "target_ids", "loss_mask")


def truncation_window(length: int, max_length: int, mode: str) -> slice | None:
    """The part of a sequence of `length` tokens kept within `max_length` (right: its start; left: its
    end), or None (drop: a longer sequence is left out)."""
    if length <= max_length:
        return slice(0, length)
    if mode == "drop":
        return None
    return slice(length - max_length, length) if mode == "left" else slice(0, max_length)


def truncate(ids: list[int], labels: list[int], max_length: int, mode: str):
    """(ids, labels) cut to `max_length` as `truncation_window` says, or None (drop)."""
    window = truncation_window(len(ids), max_length, mode)
    return None if window is None else (ids[window], labels[window])


def truncate_pair(chosen, rejected, max_length: int):
    """A preference pair of (ids, labels) cut to `max_length` at the end (the prompt's start is kept, the
    responses are truncated), or None when the prompt alone, with its model-turn opener, fills `max_length`:
    no response token (label 1) would remain in a sequence."""
    pair = tuple(truncate(ids, labels, max_length, "right") for ids, labels in (chosen, rejected))
    return None if any(not any(labels) for _, labels in pair) else pair


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of sequence indices: longest first, each into the fullest bin that still has room.

    Deterministic: ties in length keep index order; ties in room go to the earliest bin.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free slots, bin index)
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            bins.append([i])
            bisect.insort(room, (capacity - n, len(bins) - 1))
        else:
            free, b = room.pop(at)
            bins[b].append(i)
            bisect.insort(room, (free - n, b))
    return bins


def build_rows(sequences: list[tuple[list[int], list[int]]], groups: list[list[int]], max_length: int,
               prefix_masks: list[list[int]] | None = None):
    """Arrays [len(groups), max_length] (KEYS, and `prefix_mask` when `prefix_masks` gives each sequence's)
    with the sequences of each group packed in order."""
    n = len(groups)
    out = {k: np.zeros((n, max_length), np.int32) for k in KEYS[:4]}
    if prefix_masks is not None:
        out["prefix_mask"] = np.zeros((n, max_length), np.int32)
    labels = np.zeros((n, max_length), np.float32)
    for r, group in enumerate(groups):
        t = 0
        for s, idx in enumerate(group, start=1):
            ids, lab = sequences[idx]
            L = len(ids)
            out["token_ids"][r, t:t + L] = ids
            out["segment_ids"][r, t:t + L] = s
            out["positions"][r, t:t + L] = np.arange(L)
            labels[r, t:t + L] = lab
            if prefix_masks is not None:
                out["prefix_mask"][r, t:t + L] = prefix_masks[idx]
            t += L
    same = (out["segment_ids"][:, 1:] == out["segment_ids"][:, :-1]) & (out["segment_ids"][:, 1:] > 0)
    out["target_ids"][:, :-1] = np.where(same, out["token_ids"][:, 1:], 0)
    out["loss_mask"] = np.zeros((n, max_length), np.float32)
    out["loss_mask"][:, :-1] = np.where(same, labels[:, 1:], 0.0)
    return out
