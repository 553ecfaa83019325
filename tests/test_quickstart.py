"""README's main command, `gemma-tune run recipes/quickstart.yaml`, end to end through the CLI (shortened
with a max_steps override): exit code 0, metrics, samples, checkpoints and both exports, which load back."""

import json
import subprocess
import sys

import numpy as np


def test_quickstart_runs_end_to_end(tmp_path):
    run_dir = tmp_path / "quickstart"
    command = [sys.executable, "-m", "gemma_tune.cli", "run", "recipes/quickstart.yaml", f"output_dir={run_dir}",
               "train.max_steps=6", "train.eval_every=6", "train.save_every=3", "train.log_every=2",
               "train.warmup_steps=2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"run directory: {run_dir}" in done.stdout and "finished after step 6/6" in done.stdout

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4, 6]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [6]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [6] and samples[0]["prompt"] == "What is 2 plus 3?"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_3", "step_6"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["exports"]) == {"keras", "safetensors"}
    for name in ("recipe.yaml", "manifest.json", "metrics.csv", "loss_curve.png", "logs/run.log"):
        assert (run_dir / name).is_file(), name

    assert (run_dir / "exports" / "keras" / "model.keras").is_file()

    # both merged exports compute what the trained model (its last checkpoint) computes
    from keras import ops

    from gemma_tune.loading import load_model

    batch = {"token_ids": np.array([[2, 4, 339, 474, 10]], np.int32), "padding_mask": np.ones((1, 5), np.int32)}
    trained = ops.convert_to_numpy(load_model(run_dir)(batch))
    for fmt in ("safetensors", "keras"):
        exported = ops.convert_to_numpy(load_model(run_dir / "exports" / fmt)(batch))
        np.testing.assert_allclose(exported, trained, atol=1e-5, err_msg=fmt)
