"""Truncation, best-fit-decreasing packing, the batch arrays and deterministic, resumable batches."""

import numpy as np
import pytest

from gemma_tune.data.batches import Split
from gemma_tune.data.pack import KEYS, best_fit_decreasing, build_rows, truncate


def test_truncation_modes():
    ids, labels = [1, 2, 3, 4, 5], [0, 0, 1, 1, 1]
    assert truncate(ids, labels, 3, "right") == ([1, 2, 3], [0, 0, 1])
    assert truncate(ids, labels, 3, "left") == ([3, 4, 5], [1, 1, 1])
    assert truncate(ids, labels, 3, "drop") is None
    assert truncate(ids, labels, 5, "drop") == (ids, labels)


def test_best_fit_decreasing():
    # longest first: 6 -> bin0 (room 4), 5 -> bin1 (room 5), 4 -> bin0 (fullest that fits; room 0),
    # 3 -> bin1 (room 2), 2 -> bin1 (room 0), 1 -> new bin2
    assert best_fit_decreasing([2, 6, 3, 5, 1, 4], 10) == [[1, 5], [3, 2, 0], [4]]
    assert best_fit_decreasing([10], 10) == [[0]]
    assert best_fit_decreasing([], 10) == []


def test_build_rows_segments_positions_targets_and_mask():
    seqs = [([2, 10, 11], [0, 1, 1]), ([2, 20], [0, 1]), ([2, 30, 31, 32], [1, 1, 1, 1])]
    rows = build_rows(seqs, [[0, 1], [2]], max_length=6)
    assert rows["token_ids"].tolist() == [[2, 10, 11, 2, 20, 0], [2, 30, 31, 32, 0, 0]]
    assert rows["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]]
    assert rows["positions"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]]
    # the last token of a segment has no target: targets never cross into the next segment
    assert rows["target_ids"].tolist() == [[10, 11, 0, 20, 0, 0], [30, 31, 32, 0, 0, 0]]
    assert rows["loss_mask"].tolist() == [[1, 1, 0, 1, 0, 0], [1, 1, 1, 0, 0, 0]]
    assert {k: rows[k].dtype for k in KEYS} == {"token_ids": np.int32, "segment_ids": np.int32,
                                                "positions": np.int32, "target_ids": np.int32,
                                                "loss_mask": np.float32}


def test_random_packing_never_mixes_segments():
    rng = np.random.default_rng(0)
    seqs = [(list(rng.integers(4, 500, n)), [1] * n) for n in rng.integers(1, 33, 200)]
    lengths = [len(s[0]) for s in seqs]
    groups = best_fit_decreasing(lengths, 32)
    assert sorted(i for g in groups for i in g) == list(range(200))
    assert all(sum(lengths[i] for i in g) <= 32 for g in groups)
    rows = build_rows(seqs, groups, 32)
    for r, group in enumerate(groups):
        seg, pos, tgt, tok = (rows[k][r] for k in ("segment_ids", "positions", "target_ids", "token_ids"))
        for s, idx in enumerate(group, start=1):
            where = np.flatnonzero(seg == s)
            assert where.tolist() == list(range(where[0], where[0] + lengths[idx]))  # contiguous
            assert tok[where].tolist() == seqs[idx][0]
            assert pos[where].tolist() == list(range(lengths[idx]))  # positions restart
            assert tgt[where[:-1]].tolist() == seqs[idx][0][1:] and tgt[where[-1]] == 0


@pytest.fixture(scope="module")
def split():
    n, T = 21, 4
    arrays = {"token_ids": np.arange(n * T, dtype=np.int32).reshape(n, T)}
    return Split(arrays, lengths=np.arange(n) % 4 + 1, bucketed=True)


def _ids(batches, k):
    return [next(batches)["token_ids"][:, 0].tolist() for _ in range(k)]


def test_batches_are_deterministic_and_reshuffled_per_epoch(split):
    assert split.steps_per_epoch(4) == split.num_batches(4) == 6
    a, b = _ids(split.batches(4, seed=3), 12), _ids(split.batches(4, seed=3), 12)
    assert a == b
    assert a[:6] != a[6:12]  # epoch 1 has another order
    epoch0 = [x for batch in a[:6] for x in batch]
    assert sorted(epoch0) == sorted([r * 4 for r in range(21)] + [0] * 3)  # every row once + 3 padding rows
    assert a != _ids(split.batches(4, seed=4), 12)


def test_start_step_resumes_with_the_next_batch(split):
    full = _ids(split.batches(4, seed=7), 15)
    for k in (0, 1, 5, 6, 11):
        assert _ids(split.batches(4, seed=7, start_step=k), 15 - k) == full[k:]


def test_last_batch_is_padded_and_one_pass_is_in_order(split):
    passes = list(split.one_pass(4))
    assert len(passes) == 6
    assert passes[-1]["token_ids"].shape == (4, 4)
    assert passes[-1]["token_ids"][1:].sum() == 0
    assert [row for b in passes for row in b["token_ids"][:, 0].tolist()][:21] == [r * 4 for r in range(21)]


def test_unpacked_batches_are_length_bucketed():
    n = 64
    lengths = np.random.default_rng(0).integers(1, 100, n)
    split = Split({"token_ids": np.arange(n, dtype=np.int32)[:, None]}, lengths, bucketed=True)
    it = split.batches(8, seed=0)
    batches = [next(it)["token_ids"][:, 0] for _ in range(split.steps_per_epoch(8))]
    assert sorted(int(i) for b in batches for i in b) == list(range(n))
    # one window holds the whole epoch here, so batches are contiguous runs of the sorted lengths
    spans = sorted((lengths[b].min(), lengths[b].max()) for b in batches)
    assert all(hi <= nxt_lo for (_, hi), (nxt_lo, _) in zip(spans, spans[1:]))
