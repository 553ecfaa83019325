"""The chunked attention path (`gemma_tune.models.attention.chunked_attention`) against the plain reference:
outputs and gradients for every attention structure (packing, padding, sliding windows, soft-caps, attention
blocks, a cache frame), whole models in inference and training, decoding, and where "auto" takes it."""

from __future__ import annotations

import numpy as np
import pytest
from keras import ops

from gemma_tune.models import attention, build_model, tiling
from gemma_tune.models.attention import attend, attention_structure, chunked_attention, plain_attention

from test_model import numpy, packed_batch, randomised, tiny

LENGTH, HEADS, KV_HEADS, DIM = 11, 4, 2, 8


def structure_for(window, blocks: bool, self_attention: bool, dense: bool = True):
    """Two rows of 11 tokens: row 0 packs segments of 4, 5 and 1 tokens then one padding slot, row 1 one
    segment of 8 and padding; with `blocks`, bidirectional runs (an image, a prefix) inside the segments.
    Without `self_attention` the keys are 3 slots of cache more than the queries (a prefill at slot 3)."""
    segments = np.array([[1] * 4 + [2] * 5 + [3] + [0], [1] * 8 + [0] * 3], "int32")
    block_ids = np.array([[0, 1, 1, 0, 2, 2, 2, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 3, 3, 0, 0, 0]], "int32")
    query_index = np.arange(LENGTH, dtype="int32")
    key_index, key_segments, key_blocks = query_index, segments, block_ids
    if not self_attention:  # queries at cache slots 3 … 13 over 14 slots, the first 3 a real earlier segment
        query_index = query_index + 3
        key_index = np.arange(LENGTH + 3, dtype="int32")
        key_segments = np.concatenate([np.ones((2, 3), "int32"), segments], axis=1)
        key_blocks = np.concatenate([np.zeros((2, 3), "int32"), block_ids], axis=1)
    return attention_structure(query_index, key_index, segments, key_segments, window,
                               block_ids if blocks else None, key_blocks if blocks else None,
                               self_attention=self_attention, dense=dense)


def qkv(keys: int):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, LENGTH, HEADS, DIM)).astype("float32")
    k = rng.normal(size=(2, keys, KV_HEADS, DIM)).astype("float32")
    v = rng.normal(size=(2, keys, KV_HEADS, DIM)).astype("float32")
    return q, k, v


CASES = [(None, False, True), (3, False, True), (None, True, True), (3, True, True), (None, False, False),
         (3, True, False)]


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("window,blocks,self_attention", CASES)
def test_chunked_equals_plain_value_and_gradients(window, blocks, self_attention, softcap, value_and_grads):
    structure = structure_for(window, blocks, self_attention)
    chunked = structure_for(window, blocks, self_attention, dense=False)
    assert chunked.mask is None
    q, k, v = qkv(LENGTH if self_attention else LENGTH + 3)
    weights = np.random.default_rng(1).normal(size=(2, LENGTH, HEADS, DIM)).astype("float32")

    def plain(q, k, v, weights):
        out = plain_attention(q, k, v, structure.dense(), scale=0.3, softcap=softcap)
        return ops.sum(out * weights)

    def tiled(q, k, v, weights):  # tiles of 4 rows (the last of 3), rematerialised as in training
        out = chunked_attention(q, k, v, chunked, scale=0.3, softcap=softcap, training=True, tile_queries=4)
        return ops.sum(out * weights)

    expected, expected_grads = value_and_grads(plain, q, k, v, weights)
    got, got_grads = value_and_grads(tiled, q, k, v, weights)
    np.testing.assert_allclose(numpy(got), numpy(expected), rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, expected_grads):
        np.testing.assert_allclose(numpy(g), numpy(e), atol=1e-5)
    inference = chunked_attention(q, k, v, chunked, scale=0.3, softcap=softcap, tile_queries=4)
    np.testing.assert_allclose(numpy(inference), numpy(plain_attention(q, k, v, structure.dense(), scale=0.3,
                                                                       softcap=softcap)), atol=1e-5)


def test_tiles_shrink_with_many_heads_and_keys():
    assert tiling.tile_queries(1, 4, 32768) == 1024  # Gemma 3 1B at 32k: 4 heads
    assert tiling.tile_queries(1, 32, 32768) == 128  # 27B: 32 heads, the tile's scores held to 2^27
    assert tiling.tile_queries(2, 16, 8192) == 512
    assert tiling.tile_queries(64, 64, 1 << 20) == tiling.MIN_TILE_QUERIES


def test_causal_tiles_leave_out_only_forbidden_keys():
    """A causal tile [start, stop) reads keys [start − window + 1, stop); the mask forbids every key outside."""
    structure = structure_for(3, False, True)
    assert structure.key_range(4, 8, LENGTH) == (2, 8)
    assert structure_for(None, False, True).key_range(4, 8, LENGTH) == (0, 8)
    assert structure_for(3, True, True).key_range(4, 8, LENGTH) == (0, LENGTH)  # blocks: a key may follow
    assert structure_for(3, False, False).key_range(4, 8, LENGTH + 3) == (0, LENGTH + 3)  # a cache frame
    mask = numpy(structure.dense())
    assert not mask[:, 4:8, :2].any() and not mask[:, 4:8, 8:].any()


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_chunked_model_equals_plain(family, monkeypatch):
    monkeypatch.setattr(tiling, "CHUNK_ROWS", 4)  # 16 tokens: four tiles
    plain = randomised(build_model(tiny(family), attention_implementation="plain"))
    chunked = build_model(tiny(family), attention_implementation="chunked")
    chunked.set_weights(plain.get_weights())
    batch = packed_batch()
    real = batch["segment_ids"] > 0
    np.testing.assert_allclose(numpy(chunked(batch))[real], numpy(plain(batch))[real], atol=1e-5)
    reference = numpy(plain(batch, training=True))
    chunked.remat = True  # the tiles' remat inside each block's
    np.testing.assert_allclose(numpy(chunked(batch, training=True))[real], reference[real], atol=1e-5)


def test_chunked_prefill_and_decoding_equal_the_full_forward(monkeypatch):
    monkeypatch.setattr(tiling, "CHUNK_ROWS", 3)
    plain = randomised(build_model(tiny("gemma3")))
    chunked = build_model(tiny("gemma3"), attention_implementation="chunked")
    chunked.set_weights(plain.get_weights())
    ids = np.random.default_rng(3).integers(1, 96, (2, 12)).astype("int32")
    full = numpy(plain({"token_ids": ids, "padding_mask": np.ones_like(ids)}))
    cache = chunked.init_cache(2, 12)
    segments = np.ones((2, 12), "int32")
    positions = np.broadcast_to(np.arange(12, dtype="int32"), (2, 12))
    logits, cache = chunked.call_with_cache(ids[:, :8], positions[:, :8], segments, cache, 0)  # 3 tiles
    steps = [numpy(logits)]
    for t in range(8, 12):
        logits, cache = chunked.call_with_cache(ids[:, t:t + 1], positions[:, t:t + 1], segments, cache, t)
        steps.append(numpy(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4)


def test_auto_attends_in_chunks_from_the_threshold(monkeypatch):
    monkeypatch.setattr(tiling, "CHUNKED_FROM", 16)
    monkeypatch.setattr(tiling, "CHUNK_ROWS", 4)
    model = randomised(build_model(tiny("gemma2")))  # soft-capped: the dense path would be plain
    batch = packed_batch()
    index, segments = np.arange(16, dtype="int32"), batch["segment_ids"]
    long = model._structures(index, index, segments, segments, self_attention=True)
    short = model._structures(index[:15], index[:15], segments[:, :15], segments[:, :15], self_attention=True)
    assert all(s.mask is None for s in long.values()) and all(s.mask is not None for s in short.values())
    plain = build_model(tiny("gemma2"), attention_implementation="plain")
    plain.set_weights(model.get_weights())
    real = segments > 0
    np.testing.assert_allclose(numpy(model(batch))[real], numpy(plain(batch))[real], atol=1e-5)
    assert not attention.runs_in_chunks("plain", 1 << 20, "float32", True)
    assert not attention.runs_in_chunks("auto", None, "float32", True)  # a length unknown while tracing


def test_attend_takes_the_chunked_path_by_name():
    structure = structure_for(None, False, True, dense=False)
    q, k, v = qkv(LENGTH)
    out = attend(q, k, v, structure, scale=1.0, softcap=None, implementation="chunked")
    np.testing.assert_allclose(numpy(out), numpy(plain_attention(q, k, v, structure.dense(), scale=1.0,
                                                                 softcap=None)), atol=1e-5)


def test_training_in_chunks_gives_the_dense_losses(tmp_path, monkeypatch):
    """The trainer (Keras fit, compiled where the backend compiles, blocks rematerialised around the tiles' own
    remat) takes the same steps with 128-token rows in tiles of 32 as with the dense path."""
    import gemma_tune

    from test_train import recipe

    def losses(name):
        result = gemma_tune.run(recipe(tmp_path / name, max_steps=3, remat=True, save_every=3))
        return result.history["loss"]

    dense = losses("dense")
    monkeypatch.setattr(tiling, "CHUNKED_FROM", 64)
    monkeypatch.setattr(tiling, "CHUNK_ROWS", 32)
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["training"])
        return chunked_attention(*args, **kwargs)

    monkeypatch.setattr(attention, "chunked_attention", counted)
    np.testing.assert_allclose(losses("chunked"), dense, rtol=1e-5)
    assert True in calls  # the training step attended in tiles
