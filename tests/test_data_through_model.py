"""Packed batches from the data pipeline, through the model: no attention across segments."""

import numpy as np
from keras import ops

from gemma_tune.config.presets import preset_architecture
from gemma_tune.config.schema import DataSection
from gemma_tune.data import prepare
from gemma_tune.models import build_model
from gemma_tune.tokenizer import load_tokenizer


def test_packed_rows_give_each_segment_its_logits_alone(tmp_path):
    tokenizer = load_tokenizer("data/tiny/tokenizer.model")
    data = DataSection(train={"path": "data/tiny/chat.jsonl", "format": "chat"}, max_length=128, packing=True)
    split = prepare(data, tokenizer, seed=0, cache_dir=str(tmp_path)).train
    batch = next(split.batches(2, seed=0))
    assert (batch["segment_ids"].max(axis=1) >= 2).all(), "the rows should pack several conversations"
    model = build_model(preset_architecture("gemma3_tiny", num_layers=3, sliding_window_pattern=3))
    rng = np.random.default_rng(0)
    for v in model.weights:
        v.assign(rng.normal(0.0, 0.3, v.shape).astype("float32"))
    inputs = {k: batch[k] for k in ("token_ids", "segment_ids", "positions")}
    packed = ops.convert_to_numpy(model(inputs))
    width = batch["token_ids"].shape[1]
    for row in range(2):
        for seg in np.unique(batch["segment_ids"][row]):
            if seg == 0:
                continue
            where = batch["segment_ids"][row] == seg
            n = int(where.sum())
            ids = np.zeros((1, width), "int32")
            ids[0, :n] = batch["token_ids"][row][where]
            np.testing.assert_array_equal(batch["positions"][row][where], np.arange(n))
            alone = ops.convert_to_numpy(model({"token_ids": ids,
                                                "padding_mask": (np.arange(width) < n)[None].astype("int32")}))
            np.testing.assert_allclose(packed[row][where], alone[0, :n], atol=1e-4)
