"""Resume: a run continued from its step-3 checkpoint gives exactly the losses of the uninterrupted run;
SIGTERM mid-run saves a checkpoint and exits 130, and the same command then continues from it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import keras
import pytest

import gemma_tune
from gemma_tune.errors import CheckpointError, ConfigError

TINY = {"num_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 8, "query_pre_attn_scalar": 8}

JAX_CACHE = os.path.join(tempfile.gettempdir(), "gemma_tune_jax_cache")
if keras.backend.backend() == "jax":  # identical programs compile once per test session
    import jax

    jax.config.update("jax_compilation_cache_dir", JAX_CACHE)


def recipe(run_dir, **train):
    return {
        "name": "resume", "seed": 3, "output_dir": str(run_dir),
        "model": {"preset": "gemma3_tiny", "architecture": TINY, "weights": None,
                  "tokenizer": "data/tiny/tokenizer.model", "dtype": "float32"},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train": {"path": "data/tiny/chat.jsonl", "format": "chat"}, "max_length": 128},
        "train": {"max_steps": 6, "batch_size": 4, "grad_accum": 2, "learning_rate": 5e-3,
                  "schedule": "cosine", "warmup_steps": 2, "weight_decay": 0.01, "log_every": 1,
                  "save_every": 3, **train},
    }


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resumed_run_gives_the_uninterrupted_losses(tmp_path):
    """Cosine schedule with warmup, AdamW with decay, accumulation and LoRA dropout: all of their state
    (optimizer moments and step, accumulators, schedule position, dropout RNG, data position) resumes."""
    full = tmp_path / "full"
    uninterrupted = gemma_tune.run(recipe(full)).history["loss"]
    assert len(uninterrupted) == 6

    cut = tmp_path / "cut"  # the same run as it stood when its step-3 checkpoint was written
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_6")
    shutil.rmtree(cut / "exports", ignore_errors=True)
    resumed = gemma_tune.run(recipe(cut), resume=True)
    assert resumed.history["step"] == [1, 2, 3, 4, 5, 6]
    assert resumed.history["loss"] == uninterrupted  # exactly
    assert [r["step"] for r in rows(cut)] == [1, 2, 3, 4, 5, 6]


def test_resume_requires_a_checkpoint_and_matching_settings(tmp_path):
    with pytest.raises(CheckpointError, match="needs a checkpoint"):
        gemma_tune.run(recipe(tmp_path / "empty"), resume=True)
    assert not (tmp_path / "empty").exists()  # a refused run leaves no directory behind
    run_dir = tmp_path / "run"
    gemma_tune.run(recipe(run_dir, max_steps=1, save_every=1, warmup_steps=0))
    for resume in (None, True):
        with pytest.raises(ConfigError, match="train.batch_size: 4 -> 2"):
            gemma_tune.run(recipe(run_dir, max_steps=2, warmup_steps=0, batch_size=2), resume=resume)
        with pytest.raises(ConfigError, match="lora.rank: 4 -> 2"):
            gemma_tune.run({**recipe(run_dir, max_steps=2, warmup_steps=0), "lora": {"rank": 2, "alpha": 8}},
                           resume=resume)


def test_sigterm_saves_a_checkpoint_and_the_same_command_continues(tmp_path):
    run_dir = tmp_path / "run"
    path = tmp_path / "recipe.yaml"
    # constant schedule: continuing with a different max_steps changes nothing about the steps themselves
    path.write_text(json.dumps(recipe(run_dir, max_steps=100000, schedule="constant", save_every=None)))
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=JAX_CACHE)  # shared with the resume
    proc = subprocess.Popen([sys.executable, "-m", "gemma_tune.cli", "run", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (run_dir / "metrics.jsonl").exists() and len(rows(run_dir)) >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    checkpoints = list((run_dir / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and "Traceback" not in err
    stopped = int(checkpoints[0].name.split("_")[1])
    assert 2 <= stopped < 100000 and f"stopped at step {stopped}" in out + err
    assert [r["step"] for r in rows(run_dir)] == list(range(1, stopped + 1))

    result = gemma_tune.run(path, overrides=[f"train.max_steps={stopped + 2}"])
    assert result.history["step"] == list(range(1, stopped + 3))
    assert (run_dir / "checkpoints" / f"step_{stopped + 2}").is_dir()
