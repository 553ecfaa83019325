"""The benchmark's workload: packed rows of random tokens, and what a trained token costs in FLOPs.

Rows follow gemma_tune's batch contract (docs/CONTRACTS.md, "Training batches") and are built by
`gemma_tune.data.pack.build_rows`: each row of T slots is filled completely by 1 … `max_segments`
segments of uniformly random token ids in [1, vocab) (cut points uniform), every target trained
(`loss_on: all`), so every slot is a real token and B·T tokens pass per step, as in keras-hub's
unpacked rows of the same shape.

FLOPs per token (stated as in `gemma_tune.train.measure`, PaLM appendix B):

    ours:    4·N + 2·N_trainable + 12·layers·heads·head_dim·T    (attention counted at full T, not
                                                                   halved for causality or windows)
    anchor:  6·N (full) or 4·N (LoRA), no attention term          (../shared/bench/anchors_gpu.py)

N counts every parameter once (the tied embedding is also the output projection), LoRA factors included.
"""

from __future__ import annotations

import numpy as np


def architecture(preset: str, overrides: list[str]):
    """The `preset`'s Architecture with `--arch KEY=VALUE` overrides (values read as YAML)."""
    import yaml

    from gemma_tune.config.presets import preset_architecture

    fields = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--arch wants KEY=VALUE, got {item!r}")
        fields[key] = yaml.safe_load(value)
    return preset_architecture(preset, **fields)


def random_packed_rows(rows: int, length: int, vocab_size: int, seed: int, max_segments: int = 4) -> dict:
    """Arrays [rows, length] (token_ids, segment_ids, positions, target_ids, loss_mask), full rows."""
    from gemma_tune.data.pack import build_rows

    rng = np.random.default_rng(seed)
    sequences, groups = [], []
    for _ in range(rows):
        count = int(rng.integers(1, min(max_segments, length) + 1))
        cuts = np.sort(rng.choice(np.arange(1, length), size=count - 1, replace=False))
        bounds = [0, *cuts.tolist(), length]
        group = []
        for start, stop in zip(bounds[:-1], bounds[1:]):
            ids = rng.integers(1, vocab_size, stop - start).tolist()
            group.append(len(sequences))
            sequences.append((ids, [1] * len(ids)))
        groups.append(group)
    return build_rows(sequences, groups, length)


def random_split(batch_size: int, batches: int, length: int, vocab_size: int, seed: int):
    """A `gemma_tune.data.Split` holding `batches` distinct batches of random packed rows."""
    from gemma_tune.data.batches import Split

    rows = batch_size * batches
    arrays = random_packed_rows(rows, length, vocab_size, seed)
    return Split(arrays, np.full(rows, length), bucketed=False)


def flops_per_token(total_params: int, trainable_params: int, arch, length: int, full: bool) -> dict:
    """{"ours": 4N + 2N_trainable + attention, "anchor": 6N or 4N} per trained token."""
    from gemma_tune.train.measure import flops_per_token as ours

    return {"ours": ours(total_params, trainable_params, arch, length),
            "anchor": (6.0 if full else 4.0) * total_params}
