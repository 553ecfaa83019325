"""Online RL (grpo, rloo) through the one trainer, on every backend: completions are sampled from the
weights being trained, a resumed run (inside a round of μ iterations too) continues identically, RLOO with
its KL-penalised reward and an eval split runs, and a reward function that fails stops the run with its name
and row, the last checkpoint kept. (That the GRPO quickstart's reward climbs is checked where README runs it,
tests/test_readme_quickstarts.py on JAX, and by bench/readme_chains.py on TensorFlow and torch.)"""

import json
import os
import tempfile
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

import gemma_tune
from gemma_tune.methods.grpo import GRPO

ROOT = Path(__file__).resolve().parents[1]

if keras.backend.backend() == "jax":  # the same programs compile once per test session
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "gemma_tune_jax_cache"))

TINY = {"num_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 8, "query_pre_attn_scalar": 8}


def distinct_characters(prompts, completions, **kwargs):
    """A dense test reward: the number of different characters of the completion, / 10."""
    return [len(set(c)) / 10 for c in completions]


@pytest.fixture(autouse=True)
def test_rewards(monkeypatch):
    """`rl_test_rewards:…` importable as reward functions."""
    import sys
    import types

    module = types.ModuleType("rl_test_rewards")
    module.distinct_characters = distinct_characters
    monkeypatch.setitem(sys.modules, "rl_test_rewards", module)
    return module


def recipe(run_dir, method="grpo", lora=True, rl=None, **train):
    return {
        "name": "rl", "seed": 1, "output_dir": str(run_dir), "method": method,
        "model": {"preset": "gemma3_tiny", "architecture": TINY, "weights": None,
                  "tokenizer": "data/tiny/tokenizer.model", "dtype": "float32"},
        **({"lora": {"rank": 4, "alpha": 8}} if lora else {}),
        "data": {"train": {"path": "data/tiny/arithmetic.jsonl", "format": "prompt"}, "max_length": 32},
        "train": {"max_steps": 4, "batch_size": 2, "learning_rate": 5e-3, "schedule": "constant", "log_every": 1,
                  **train},
        "rl": {"num_generations": 4, "max_completion_length": 6,
               "rewards": ["answer_match", "rl_test_rewards:distinct_characters"],
               **(rl or {})},
    }


def rows(run_dir, split="train"):
    return [r for r in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["split"] == split]


def probe(lm) -> np.ndarray:
    """A trained weight (a LoRA B factor, zero at the start) as NumPy."""
    layer = lm.blocks[0].attention.q_proj
    return np.array(ops.convert_to_numpy(layer.lora_kernel_b))


def test_completions_are_sampled_from_the_weights_being_trained(tmp_path, monkeypatch):
    """Each round is sampled from the weights after the optimisation step before it: with grad_accum 2 and
    μ = 2, rounds start at steps 1 and 3, sampled from the starting weights and from those after step 2. Every
    round's prompts take data.max_length slots, and the decoding step is compiled when the train step is."""
    import gemma_tune.sampling

    at_rollout, after_step, sampled = [], {}, []
    original = GRPO.rollout
    original_sample = gemma_tune.sampling.sample

    def recording_sample(*args, **kw):
        sampled.append((kw["prompt_slots"], kw["compile_step"]))
        return original_sample(*args, **kw)

    monkeypatch.setattr(gemma_tune.sampling, "sample", recording_sample)

    def recording(self, prompts, **kw):
        at_rollout.append((kw["step"], probe(self.lm)))
        return original(self, prompts, **kw)

    monkeypatch.setattr(GRPO, "rollout", recording)

    class AfterStep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            after_step["jit_compile"] = self.model.jit_compile
            if (batch + 1) % 2 == 0:
                after_step[(batch + 1) // 2] = probe(self.model.lm)

    run_recipe = gemma_tune.load_recipe(recipe(tmp_path / "run", grad_accum=2, rl={"num_iterations": 2}))
    gemma_tune.train.train(run_recipe, callbacks=[AfterStep()])
    assert sampled and set(sampled) == {(run_recipe.data.max_length, after_step["jit_compile"] is True)}
    assert [step for step, _ in at_rollout] == [0, 2]
    np.testing.assert_array_equal(at_rollout[0][1], 0.0)  # the starting adapters
    np.testing.assert_array_equal(at_rollout[1][1], after_step[2])
    assert not np.array_equal(after_step[1], after_step[2])  # the weights did move in between


def test_a_resumed_run_continues_identically(tmp_path):
    """Full fine-tuning with β > 0 (a frozen reference copy), μ = 2, stopped at step 3, inside the round of
    steps 3-4: its rollouts come back from the checkpoint, the next round is sampled as it was."""
    settings = dict(lora=False, rl={"num_iterations": 2, "beta": 0.1})
    full = tmp_path / "full"
    uninterrupted = gemma_tune.run(recipe(full, max_steps=6, **settings))
    assert not (full / "checkpoints" / "step_6" / "method.safetensors").exists()  # a round's end: nothing kept
    cut = tmp_path / "cut"  # stopped at step 3, then the same run made longer: it continues
    gemma_tune.run(recipe(cut, max_steps=3, **settings))
    assert (cut / "checkpoints" / "step_3" / "method.safetensors").is_file()
    resumed = gemma_tune.run(recipe(cut, max_steps=6, **settings))
    assert resumed.history["step"] == list(range(1, 7))
    for key in ("loss", "reward", "kl", "entropy", "completions/mean_length"):
        assert resumed.history[key] == uninterrupted.history[key], key
    assert (cut / "completions.jsonl").read_text() == (full / "completions.jsonl").read_text()


def test_rloo_with_an_eval_split(tmp_path):
    run_dir = tmp_path / "rloo"
    data = {"train": {"path": "data/tiny/arithmetic.jsonl", "format": "prompt"}, "eval_fraction": 0.2,
            "max_length": 32}
    result = gemma_tune.run({**recipe(run_dir, method="rloo", eval_every=2), "data": data})
    evals = rows(run_dir, "eval")
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:  # every metric of TRL's names, β 0.05 (RLOO's default) gives a KL
        for key in ("loss", "reward", "reward_std", "rewards/answer_match", "rewards/distinct_characters", "kl",
                    "clip_ratio", "completions/mean_length", "completions/clipped_ratio", "frac_reward_zero_std",
                    "entropy"):
            assert r[key] is not None and np.isfinite(r[key]), key
    lines = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    eval_prompts = {c["prompt"] for c in lines if c["split"] == "eval"}
    assert len(eval_prompts) == 6 and sum(c["split"] == "eval" for c in lines) == 2 * 6 * 4
    assert result.history["kl"][0] == 0.0  # the first step's policy is the reference


def test_a_failing_reward_function_stops_the_run_with_its_name(tmp_path):
    """Through the CLI, the function imported from the working directory: exit 2, its name, the row and the
    error, no traceback; the checkpoints before the failure are kept."""
    import subprocess
    import sys

    import yaml

    (tmp_path / "my_rewards.py").write_text(
        "calls = 0\n\n"
        "def flaky(prompts, completions, **kwargs):\n"
        "    global calls\n"
        "    calls += 1\n"
        "    if calls > 2:\n"
        "        raise ZeroDivisionError('no reward for you')\n"
        "    return [0.0] * len(completions)\n")
    data = recipe(tmp_path / "run", save_every=1, rl={"rewards": ["my_rewards:flaky"]})
    data["model"]["tokenizer"] = str(ROOT / "data/tiny/tokenizer.model")
    data["data"]["train"]["path"] = str(ROOT / "data/tiny/arithmetic.jsonl")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    done = subprocess.run([sys.executable, "-m", "gemma_tune", "run", "r.yaml", "--backend", keras.backend.backend()],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "reward 'flaky' raised" in done.stderr and "What is" in done.stderr
    assert "ZeroDivisionError: no reward for you" in done.stderr
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_1", "step_2"]
