"""Truncation, best-fit-decreasing packing and the batch arrays of docs/CONTRACTS.md.

For a row of T slots holding segments s = 1..k (0 = padding) with tokens x and labels l (1 = trained):
    positions[t]  = t - start(segment of t)
    target_ids[t] = x[t+1] if segment[t+1] == segment[t] != 0 else 0
    loss_mask[t]  = l[t+1] under the same condition, else 0.0
so no target, position or (through segment ids) attention crosses a segment boundary.
"""

from __future__ import annotations

import bisect

import numpy as np

KEYS = ("token_ids", "segment_ids", "positions", "target_ids", "loss_mask")


def truncate(ids: list[int], labels: list[int], max_length: int, mode: str):
    """(ids, labels) cut to `max_length` (right: keep the start; left: keep the end), or None (drop)."""
    if len(ids) <= max_length:
        return ids, labels
    if mode == "drop":
        return None
    if mode == "left":
        return ids[-max_length:], labels[-max_length:]
    return ids[:max_length], labels[:max_length]


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


def build_rows(sequences: list[tuple[list[int], list[int]]], groups: list[list[int]], max_length: int):
    """Arrays [len(groups), max_length] (KEYS) with the sequences of each group packed in order."""
    n = len(groups)
    out = {k: np.zeros((n, max_length), np.int32) for k in KEYS[:4]}
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
            t += L
    same = (out["segment_ids"][:, 1:] == out["segment_ids"][:, :-1]) & (out["segment_ids"][:, 1:] > 0)
    out["target_ids"][:, :-1] = np.where(same, out["token_ids"][:, 1:], 0)
    out["loss_mask"] = np.zeros((n, max_length), np.float32)
    out["loss_mask"][:, :-1] = np.where(same, labels[:, 1:], 0.0)
    return out
