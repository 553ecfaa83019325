"""The reward model (`method: reward`) end to end on a tiny model: it learns its training pairs, a run
resumes with the uninterrupted losses, the centering term adds c·(r_w + r_l)² per pair, a score is the
head on the last real token, `load_model(run_dir)` scores as the trainer did, `gemma-tune score` prints
the scores and the accuracy (exit 0) and refuses bad data and a model without a score head (exit 2)."""

import json
import math
import os
import re
import shutil
import tempfile

import keras
import numpy as np
import pytest
from keras import ops
from safetensors.numpy import load_file

import gemma_tune
from gemma_tune.cli import main
from gemma_tune.export import export_model
from gemma_tune.models import RewardModel

TINY = {"num_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 8, "query_pre_attn_scalar": 8}
TOKENIZER = "data/tiny/tokenizer.model"

if keras.backend.backend() == "jax":  # identical programs compile once per test session
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "gemma_tune_jax_cache"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """The first 64 bundled preference pairs."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(open("data/tiny/preference.jsonl").readlines()[:64]))
    return path


def recipe(run_dir, pairs, lora=None, reward=None, **train):
    spec = {
        "name": "reward", "seed": 0, "output_dir": str(run_dir), "method": "reward",
        "model": {"preset": "gemma3_tiny", "architecture": TINY, "tokenizer": TOKENIZER, "dtype": "float32"},
        "lora": lora,
        "data": {"train": {"path": str(pairs), "format": "preference"},
                 "eval": {"path": str(pairs), "format": "preference"}, "max_length": 48},
        "train": {"max_steps": 120, "batch_size": 8, "learning_rate": 3e-3, "schedule": "constant",
                  "warmup_steps": 2, "log_every": 20, **train},
    }
    if reward is not None:
        spec["reward"] = reward
    return spec


@pytest.fixture(scope="module")
def trained(tmp_path_factory, pairs):
    """A reward model trained on the pairs (full fine-tuning), evaluated on the same pairs."""
    return gemma_tune.run(recipe(tmp_path_factory.mktemp("reward") / "run", pairs))


def test_reward_model_learns_the_training_pairs(trained):
    history = trained.history
    assert history["eval_accuracy"][-1] > 0.9
    assert history["eval_margin"][-1] > 0 and history["loss"][-1] < history["loss"][0]
    rows = [json.loads(line) for line in (trained.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "accuracy", "margin"} <= set(rows[-1]) and rows[-1]["split"] == "eval"
    assert {"loss", "accuracy", "margin"} <= set(rows[0]) and rows[0]["split"] == "train"
    header = (trained.run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["step", "split", "loss", "accuracy", "margin"]
    summary = json.loads((trained.run_dir / "summary.json").read_text())
    assert summary["method"] == "reward" and summary["eval"]["accuracy"] > 0.9


def test_the_checkpoint_holds_the_decoder_and_the_score_head(trained):
    tensors = load_file(str(trained.run_dir / "checkpoints" / "step_120" / "model.safetensors"))
    assert tensors["score/kernel"].shape == (TINY["hidden_size"], 1)
    assert "token_embedding/embeddings" in tensors and "final_norm/scale" in tensors
    model = gemma_tune.load_model(trained.run_dir)
    assert isinstance(model, RewardModel)
    np.testing.assert_array_equal(ops.convert_to_numpy(model.score.kernel.value), tensors["score/kernel"])


def test_loaded_model_scores_as_the_trainer_did(trained, pairs):
    """`score(run_dir)` on the eval pairs gives the trainer's eval row: the same accuracy, and the mean margin
    and Bradley–Terry loss of the same scores."""
    result = gemma_tune.score(trained.run_dir, pairs, batch_size=5)
    row = [json.loads(line) for line in (trained.run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    chosen, rejected = np.array(result.chosen, np.float64), np.array(result.rejected, np.float64)
    assert len(chosen) == len(rejected) == 64
    assert result.accuracy == row["accuracy"] == np.mean(chosen > rejected)
    assert np.mean(chosen - rejected) == pytest.approx(row["margin"], rel=1e-4, abs=1e-4)
    loss = np.mean(np.logaddexp(0.0, -(chosen - rejected)))  # −log σ(r_w − r_l)
    assert loss == pytest.approx(row["loss"], rel=1e-4, abs=1e-5)


def test_score_is_the_head_on_the_last_real_token(trained):
    model = gemma_tune.load_model(trained.run_dir)
    rng = np.random.default_rng(0)
    lengths = (9, 5, 12)
    right = np.zeros((3, 12), "int32")
    left = np.zeros((3, 12), "int32")
    for r, n in enumerate(lengths):
        right[r, :n] = left[r, 12 - n:] = rng.integers(3, 512, n)
    hidden = ops.convert_to_numpy(model.lm({"token_ids": right, "padding_mask": (right > 0).astype("int32")},
                                           return_hidden_states=True))
    kernel = ops.convert_to_numpy(model.score.kernel.value)[:, 0]
    expected = [hidden[r, n - 1] @ kernel for r, n in enumerate(lengths)]
    padded = ops.convert_to_numpy(model({"token_ids": right, "padding_mask": (right > 0).astype("int32")}))
    np.testing.assert_allclose(padded, expected, atol=1e-5)
    segments = ops.convert_to_numpy(model({"token_ids": right, "segment_ids": (right > 0).astype("int32"),
                                           "positions": np.tile(np.arange(12, dtype="int32"), (3, 1))}))
    np.testing.assert_allclose(segments, expected, atol=1e-5)
    # left padding: transformers' rule (the rightmost real token) with positions counted from the first real one
    positions = np.maximum(np.cumsum(left > 0, axis=1) - 1, 0).astype("int32")
    from_left = ops.convert_to_numpy(model({"token_ids": left, "segment_ids": (left > 0).astype("int32"),
                                            "positions": positions}))
    np.testing.assert_allclose(from_left, expected, atol=1e-4)


def test_resumed_reward_run_gives_the_uninterrupted_losses(tmp_path, pairs):
    """LoRA with dropout, accumulation and the score head: the head's weights and moments resume too."""
    spec = dict(lora={"rank": 4, "alpha": 8, "dropout": 0.1}, max_steps=6, grad_accum=2, batch_size=4,
                learning_rate=5e-3, schedule="cosine", log_every=1, save_every=3, reward={"center_coefficient": 0.01})
    full = tmp_path / "full"
    uninterrupted = gemma_tune.run(recipe(full, pairs, **spec)).history["loss"]
    assert len(uninterrupted) == 6 and all(math.isfinite(x) for x in uninterrupted)
    cut = tmp_path / "cut"  # the same run as it stood when its step-3 checkpoint was written
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_6")
    resumed = gemma_tune.run(recipe(cut, pairs, **spec), resume=True)
    assert resumed.history["step"] == [1, 2, 3, 4, 5, 6]
    assert resumed.history["loss"] == uninterrupted  # exactly


def test_reward_options_and_exports_are_validated(pairs):
    from gemma_tune.errors import ConfigError
    from gemma_tune.methods import method_options

    loaded = gemma_tune.load_recipe(recipe("r", pairs, reward={"center_coefficient": 0.01}))
    assert method_options(loaded) == {"center_coefficient": 0.01}
    assert method_options(gemma_tune.load_recipe(recipe("r", pairs))) == {"center_coefficient": 0.0}
    problems = {
        "reward.center_coefficient: an option of reward, not of method dpo":
            dict(recipe("r", pairs, reward={"center_coefficient": 0.01}), method="dpo"),
        "preference.beta: an option of dpo": dict(recipe("r", pairs), preference={"beta": 0.1}),
        "reward.center_coefficient: expected a value greater than or equal to 0":
            recipe("r", pairs, reward={"center_coefficient": -0.5}),
        "export.formats: a reward model exports as safetensors": dict(recipe("r", pairs), export={"formats": ["keras"]}),
        "train.sample_prompts: a reward model scores sequences": recipe("r", pairs, sample_prompts=["Hi"]),
        "method reward trains on preference data, not chat": dict(recipe("r", pairs), data={
            "train": {"path": "data/tiny/chat.jsonl", "format": "chat"}}),
    }
    for message, spec in problems.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            gemma_tune.load_recipe(spec)


def batch_of_pairs(rng, rows=3, length=10, vocab=512):
    """Random pairs (right-padded sides of different lengths) and an all-zero padding row last."""
    batch = {}
    for side in ("chosen", "rejected"):
        ids = np.zeros((rows + 1, length), "int32")
        mask = np.zeros((rows + 1, length), "float32")
        for r in range(rows):
            n = int(rng.integers(5, length + 1))
            ids[r, :n] = rng.integers(3, vocab, n)
            mask[r, 2:n - 1] = 1.0
        segments = (ids > 0).astype("int32")
        batch.update({f"{side}_token_ids": ids, f"{side}_segment_ids": segments,
                      f"{side}_positions": np.where(segments, np.arange(length, dtype="int32"), 0),
                      f"{side}_target_ids": np.roll(ids, -1, axis=1) * segments, f"{side}_loss_mask": mask})
    return batch


def test_centering_adds_c_times_the_squared_score_sum_per_pair(pairs):
    from gemma_tune.methods import build_method
    from gemma_tune.methods.reward import bradley_terry_loss
    from gemma_tune.models.reward import sequence_scores
    from gemma_tune.train.build import build_for_recipe
    from gemma_tune.train.task import MethodTrainer

    chosen, rejected = np.array([1.5, -0.5, 2.0], "float32"), np.array([0.5, 0.25, -1.0], "float32")
    plain = ops.convert_to_numpy(bradley_terry_loss(chosen, rejected))
    np.testing.assert_allclose(plain, np.logaddexp(0.0, -(chosen - rejected)), rtol=1e-6)
    centered = ops.convert_to_numpy(bradley_terry_loss(chosen, rejected, center_coefficient=0.25))
    np.testing.assert_allclose(centered - plain, 0.25 * (chosen + rejected) ** 2, rtol=1e-5)

    # through the method: its loss moves by c · Σ_pairs (r_w + r_l)² / P, the padding row left out
    keras.utils.set_random_seed(0)
    lm, _ = build_for_recipe(gemma_tune.load_recipe(recipe("unused", pairs)))
    methods = {c: build_method(gemma_tune.load_recipe(recipe("unused", pairs, reward={"center_coefficient": c})))
               for c in (0.0, 0.25)}
    trainer = MethodTrainer(lm, methods[0.0])  # one model and head for both
    batch = batch_of_pairs(np.random.default_rng(0))
    batch["step_pairs"] = np.full((4,), 3.0, "float32")
    losses = {}
    for c, method in methods.items():
        out = {k: float(ops.convert_to_numpy(v)) for k, v in method.forward(trainer, batch, False).items()}
        losses[c] = out["loss"]
        assert out["pairs"] == 3.0
    stacked = {k: np.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ("token_ids", "segment_ids",
                                                                                          "positions")}
    scores = ops.convert_to_numpy(sequence_scores(lm, trainer.heads["score"], stacked))
    chosen, rejected = scores[:3], scores[4:7]  # rows 3 and 7 are the padding pair
    assert losses[0.25] - losses[0.0] == pytest.approx(0.25 * np.sum((chosen + rejected) ** 2) / 3, rel=1e-4)
    assert losses[0.0] == pytest.approx(float(np.mean(np.logaddexp(0.0, rejected - chosen))), rel=1e-5)


def test_cli_score_prints_scores_and_accuracy(trained, pairs, tmp_path, capsys):
    assert main(["score", str(trained.run_dir), "--data", str(pairs), "--batch-size", "16"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    expected = gemma_tune.score(trained.run_dir, pairs)
    assert len(lines) == 65
    values = np.array([[float(x) for x in line.split("\t")] for line in lines[:64]])
    np.testing.assert_allclose(values[:, 0], expected.chosen, atol=1e-5)
    np.testing.assert_allclose(values[:, 1], expected.rejected, atol=1e-5)
    assert lines[-1].startswith(f"accuracy {expected.accuracy:.6f} (")

    responses = tmp_path / "responses.jsonl"
    rows = [{"prompt": "What colour is grass?", "response": "The colour of grass is green."},
            {"prompt": "What colour is grass?", "completion": "The colour of grass is yellow."},
            {"messages": [{"role": "user", "content": "What colour is grass?"},
                          {"role": "assistant", "content": "The colour of grass is green."}]}]
    responses.write_text("".join(json.dumps(row) + "\n" for row in rows[:2]))
    assert main(["score", str(trained.run_dir), "--data", str(responses)]) == 0
    scores = [float(x) for x in capsys.readouterr().out.split()]
    assert len(scores) == 2 and scores[0] != scores[1]
    chat = gemma_tune.score(trained.run_dir, rows[2:]).scores  # the same conversation as the first row
    assert chat == pytest.approx(scores[:1], abs=1e-5)


def test_cli_score_user_errors_exit_2(trained, tmp_path, capsys):
    """Bad data, a missing file, generating from a reward model and scoring with a causal LM: exit 2, one
    message naming the problem."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "What colour is grass?"}\n')
    assert main(["score", str(trained.run_dir), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "expected rows with prompt and completion" in err and "Traceback" not in err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "What colour is grass?", "response": "Green."}\n{"prompt": "Hi", "response": 3}\n')
    assert main(["score", str(trained.run_dir), "--data", str(broken)]) == 2
    assert "row 2" in capsys.readouterr().err
    assert main(["score", str(trained.run_dir), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err

    assert main(["generate", str(trained.run_dir), "--prompt", "What colour is grass?"]) == 2
    assert "a reward model scores sequences" in capsys.readouterr().err

    causal = tmp_path / "causal"  # the decoder alone: a causal LM has no score head
    model, tokenizer = gemma_tune.load_model_and_tokenizer(trained.run_dir)
    export_model(model.lm, tokenizer, causal, "safetensors")
    assert main(["score", str(causal), "--data", str(bad)]) == 2
    assert "not a reward model" in capsys.readouterr().err
