"""Checks of the benchmark's logic on CPU: `python -m pytest -q bench/` (KERAS_BACKEND picks the backend).

The workload follows the batch contract, the table and ratios come out of hand-made records, and one
tiny end-to-end run of both systems gives a JSON line per system with finite figures.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

import sft_bench  # noqa: E402
from workload import flops_per_token, random_packed_rows, random_split  # noqa: E402


def test_rows_are_full_packed_and_follow_the_contract():
    rows = random_packed_rows(6, 32, vocab_size=100, seed=3)
    assert set(rows) == {"token_ids", "segment_ids", "positions", "target_ids", "loss_mask"}
    seg, tok = rows["segment_ids"], rows["token_ids"]
    assert seg.shape == (6, 32) and (seg > 0).all() and (tok >= 1).all() and (tok < 100).all()
    assert seg.max() > 1  # some rows hold several segments
    for r in range(6):
        for t in range(32):
            start = np.flatnonzero(seg[r] == seg[r, t])[0]
            assert rows["positions"][r, t] == t - start
            same_next = t + 1 < 32 and seg[r, t + 1] == seg[r, t]
            assert rows["loss_mask"][r, t] == float(same_next)
            assert rows["target_ids"][r, t] == (tok[r, t + 1] if same_next else 0)


def test_split_serves_distinct_batches_of_the_requested_shape():
    split = random_split(batch_size=2, batches=3, length=16, vocab_size=50, seed=0)
    stream = split.batches(2, seed=0)
    seen = [next(stream)["token_ids"] for _ in range(3)]
    assert all(b.shape == (2, 16) for b in seen)
    assert len({b.tobytes() for b in seen}) == 3


def test_flops_per_token_formulas():
    from gemma_tune.config.presets import preset_architecture

    arch = preset_architecture("gemma3_tiny")
    flops = flops_per_token(1000, 10, arch, 64, full=False)
    attention = 12 * arch.num_layers * arch.num_heads * arch.head_dim * 64
    assert flops == {"ours": 4 * 1000 + 2 * 10 + attention, "anchor": 4 * 1000}
    assert flops_per_token(1000, 1000, arch, 64, full=True)["anchor"] == 6 * 1000


def _record(system, rate, peak):
    return {"system": system, "tokens_per_s": rate, "step_s_median": 1024 / rate, "peak_memory_gib": peak,
            "peak_memory_above_baseline_gib": None, "tflops_per_s": 1.0, "mfu": None, "model_tflops_per_s": 1.0,
            "params_total": 10, "params_trainable": 2, "policy": "float32", "first_step_s": 3.0,
            "loss_first": 5.0, "loss_last": 4.5}


def test_table_gives_ratios_and_median_run_picks_the_middle():
    runs = [_record("ours", r, 1.0) for r in (300.0, 100.0, 200.0)]
    chosen = sft_bench.median_run(runs)
    assert chosen["tokens_per_s"] == 200.0 and chosen["repeats_tokens_per_s"] == [100, 200, 300]
    text = sft_bench.table([chosen, _record("keras-hub", 100.0, 2.0)])
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()}
    assert lines["tokens/s"].rstrip(" |").endswith("2.00×")
    assert lines["peak memory GiB"].rstrip(" |").endswith("0.50×")
    assert "100, 200, 300" in lines["tokens/s of each repeat"]


def test_failed_system_is_reported_without_ratios():
    text = sft_bench.table([_record("ours", 10.0, 1.0), {"system": "keras-hub", "error": "out of memory"}])
    assert "failed: out of memory" in text and "×" not in text


def test_both_systems_run_end_to_end(tmp_path):
    """ours, keras-hub and one of ours' variants (the chunked attention path) side by side."""
    out = tmp_path / "runs.jsonl"
    args = ["--preset", "gemma3_tiny", "--batch", "2", "--length", "32", "--dtype", "float32",
            "--steps", "2", "--warmup", "1", "--out", str(out), "--systems", "ours,ours-chunked,keras-hub",
            "--backend", os.environ.get("KERAS_BACKEND", "jax")]
    done = subprocess.run([sys.executable, str(BENCH / "sft_bench.py"), *args], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["system"] for r in records] == ["ours", "ours-chunked", "keras-hub"]
    assert [r["attention"] for r in records] == ["auto", "chunked", None]
    for r in records:
        assert r["timed_steps"] == 2 and r["batch"] == 2 and r["length"] == 32
        assert math.isfinite(r["loss_last"]) and r["tokens_per_s"] > 0 and r["peak_memory_gib"] > 0
        assert r["tflops_per_s"] == r["tokens_per_s"] * r["flops_per_token"] / 1e12
        assert r["params_trainable"] < r["params_total"]
    assert "| tokens/s |" in done.stdout and "ours / keras-hub" in done.stdout
