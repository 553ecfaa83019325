"""The SFT trainer end to end on a tiny model: the loss falls, full / LoRA / QLoRA train what they should,
accumulation equals a big batch, a diverging run stops cleanly, and what a run writes."""

import json
import math
import os
import re
import struct
import tempfile

import keras
import numpy as np
import pytest
from safetensors.numpy import load_file

import gemma_tune

TINY = {"num_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 8, "query_pre_attn_scalar": 8}


if keras.backend.backend() == "jax":  # identical programs compile once per test session
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "gemma_tune_jax_cache"))


def recipe(run_dir, lora=None, quantize=None, eval_data=False, **train):
    data = {"train": {"path": "data/tiny/chat.jsonl", "format": "chat"}, "max_length": 128}
    if eval_data:
        data["eval"] = {"path": "data/tiny/chat_eval.jsonl", "format": "chat"}
    return {
        "name": "tiny", "seed": 0, "output_dir": str(run_dir),
        "model": {"preset": "gemma3_tiny", "architecture": TINY, "weights": None,
                  "tokenizer": "data/tiny/tokenizer.model", "dtype": "float32"},
        "lora": lora, "quantize": quantize,
        "data": data,
        "train": {"max_steps": 4, "batch_size": 4, "learning_rate": 3e-3, "schedule": "constant",
                  "log_every": 1, **train},
    }


def checkpoint_weights(run_dir, step):
    return load_file(str(run_dir / "checkpoints" / f"step_{step}" / "model.safetensors"))


def initial_weights(tmp_path, **kw):
    """The variables a run starts from: the recipe's model built after seeding, as `run` does."""
    from keras import ops

    from gemma_tune.train.build import build_for_recipe
    from gemma_tune.checkpoints.variables import keyed_variables

    keras.utils.set_random_seed(0)
    model, _ = build_for_recipe(gemma_tune.load_recipe(recipe(tmp_path / "init", **kw)))
    return {key: ops.convert_to_numpy(v.value) for key, v in keyed_variables(model.variables).items()}


def test_loss_decreases_and_run_outputs(tmp_path):
    run_dir = tmp_path / "run"
    result = gemma_tune.run(recipe(run_dir, eval_data=True, max_steps=16, batch_size=8, eval_every=8,
                                   save_every=8, learning_rate=1e-2))
    losses = result.history["loss"]
    assert result.history["step"] == list(range(1, 17))
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-4:]) < losses[0] - 0.5, losses
    assert result.history["eval_step"] == [8, 16]
    assert result.history["eval_loss"][1] < result.history["eval_loss"][0]
    assert result.history["eval_perplexity"][1] == pytest.approx(math.exp(result.history["eval_loss"][1]))

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 17))
    csv_lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("step,split,loss") and len(csv_lines) == 1 + len(rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 16
    assert summary["tokens"] > summary["trained_tokens"] > 0 and summary["tokens_per_s"] > 0
    assert summary["final_loss"] == pytest.approx(losses[-1])
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_16", "step_8"]
    assert _tensorboard_scalars(run_dir / "tensorboard")["train/loss"] == pytest.approx(losses)


def _tensorboard_scalars(log_dir):
    """{tag: [values]} read from TensorBoard event files (TFRecord framing of Event protos)."""
    from tensorboard.compat.proto import event_pb2

    out = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append(value.simple_value)
    return out


@pytest.mark.parametrize("method", ["full", "lora_bfloat16", "qlora_int8"])
def test_full_lora_qlora_train_what_they_should(tmp_path, method):
    """Full fine-tuning trains every weight; LoRA (here in bfloat16: the frozen base stored in bfloat16)
    and QLoRA (int8 base) train the float32 adapters only."""
    lora = {"rank": 4, "alpha": 8, "targets": ["q", "v", "down"]} if method != "full" else None
    quantize = "int8" if method == "qlora_int8" else None
    run_dir = tmp_path / "run"
    config = recipe(run_dir, lora=lora, quantize=quantize, max_steps=3, save_every=1)
    if method == "lora_bfloat16":
        config["model"]["dtype"] = "bfloat16"
    result = gemma_tune.run(config)
    before, after = checkpoint_weights(run_dir, 2), checkpoint_weights(run_dir, 3)  # what step 3 changed
    assert set(before) == set(after) and all(math.isfinite(x) for x in result.history["loss"])
    changed = {name for name in after if not np.array_equal(before[name], after[name])}
    adapters = {name for name in after if "lora_kernel" in name}
    if method == "full":
        assert not adapters
        # every weight trains: embedding, norms and projections (seed generators aside)
        assert changed == {n for n in after if "seed_generator" not in n}
    else:
        # 3 targets x 2 layers x (A, B); only they change, the base (quantised or not) is frozen
        assert len(adapters) == 12 and changed == adapters
        kernels = [n for n in after if n.endswith("q_proj/kernel")]
        assert after[kernels[0]].dtype == (np.int8 if quantize else np.float32)
        assert all(after[n].dtype == np.float32 for n in adapters)
        summary_counts = _count_lora(after, adapters)
        assert summary_counts == 2 * (4 * (32 + 32) + 4 * (32 + 16) + 4 * (64 + 32))


def _count_lora(weights, names):
    return sum(int(np.prod(weights[n].shape)) for n in names)


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    """One SGD step on 8 rows: batch 8 == 4 accumulated micro-batches of 2 (same rows, same update).
    The accumulated run also cuts the loss into 100-token chunks, which must not change it either."""
    common = dict(max_steps=1, save_every=1, optimizer="sgd", learning_rate=0.5, max_grad_norm=None)
    big = gemma_tune.run(recipe(tmp_path / "big", batch_size=8, **common))
    accumulated = gemma_tune.run(recipe(tmp_path / "acc", batch_size=2, grad_accum=4, loss_chunk_size=100,
                                        **common))
    assert accumulated.history["loss"][0] == pytest.approx(big.history["loss"][0], rel=1e-6)
    a, b = checkpoint_weights(tmp_path / "big", 1), checkpoint_weights(tmp_path / "acc", 1)
    init = initial_weights(tmp_path)
    for name in a:
        if "seed_generator" in name:
            continue
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
        if name.endswith("kernel"):  # and the step really moved the weights
            assert not np.array_equal(a[name], init[name]), name


def test_rematerialisation_leaves_the_step_unchanged(tmp_path):
    """train.remat recomputes each block in the backward pass: same loss, same update."""
    common = dict(max_steps=1, save_every=1, optimizer="sgd", learning_rate=0.5, batch_size=2)
    plain = gemma_tune.run(recipe(tmp_path / "plain", **common))
    remat = gemma_tune.run(recipe(tmp_path / "remat", remat=True, **common))
    assert remat.history["loss"] == pytest.approx(plain.history["loss"], rel=1e-6)
    a, b = checkpoint_weights(tmp_path / "plain", 1), checkpoint_weights(tmp_path / "remat", 1)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("learning_rate", [1e30, 1e38])
def test_divergence_stops_and_names_the_last_finite_checkpoint(tmp_path, capsys, learning_rate):
    """SGD at an absurd rate: the loss or the weights become non-finite. Non-finite weights are never
    saved, and the checkpoint the message names holds finite ones (or it says none was written)."""
    from gemma_tune.cli import main

    run_dir = tmp_path / "run"
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe(run_dir, max_steps=6, save_every=1, optimizer="sgd",
                                      learning_rate=learning_rate, max_grad_norm=None)))
    assert main(["run", str(path)]) == 2  # a user error: message, exit code 2, no traceback
    err = capsys.readouterr().err
    assert "gemma-tune: error: train: the " in err and "Traceback" not in err and "train.learning_rate" in err
    step = int(re.search(r"at step (\d+)", err).group(1))
    kept = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert all(k < step for k in kept)  # nothing was saved at or after the step that diverged
    named = re.search(r"the last finite checkpoint, (\S+), is kept", err)
    if kept:
        assert named and named.group(1) == str(run_dir / "checkpoints" / f"step_{kept[-1]}")
        weights = load_file(str(run_dir / "checkpoints" / f"step_{kept[-1]}" / "model.safetensors"))
        assert all(np.isfinite(w).all() for w in weights.values() if w.dtype.kind == "f")
    else:
        assert named is None and "no checkpoint was written before it" in err


@pytest.mark.parametrize("kind,expected", [
    ("constant", [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.25, 0.5, 0.75, 1.0, 1.0, 0.75, 0.5]),
    ("cosine", [0.25, 0.5, 0.75, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5]),
])
def test_schedule_warms_up_then_decays_per_optimiser_step(kind, expected):
    from gemma_tune.train.optim import WarmupSchedule

    # peak 1, 4 warmup steps of 8, 2 micro-steps per optimiser step (Keras counts micro-steps); after
    # warmup, progress p = (s - 4) / (8 - 4)
    schedule = WarmupSchedule(1.0, total_steps=8, warmup_steps=4, kind=kind, accum=2)
    got = [float(keras.ops.convert_to_numpy(schedule(2 * s + 1))) for s in range(7)]
    assert got == pytest.approx(expected, abs=1e-6)


def test_weight_decay_skips_norm_scales_and_biases():
    from gemma_tune.config.schema import TrainSection
    from gemma_tune.train.optim import WarmupSchedule, build_optimizer

    train = TrainSection(max_steps=1, learning_rate=0.1, weight_decay=0.5, schedule="constant", max_grad_norm=None)
    optimizer = build_optimizer(train, WarmupSchedule.for_recipe(train, 1))
    variables = [keras.Variable(np.ones(3, np.float32), name=n) for n in ("kernel", "scale", "bias")]
    optimizer.apply([keras.ops.zeros(3) for _ in variables], variables)  # no gradient: decay alone moves
    kernel, scale, bias = (keras.ops.convert_to_numpy(v.value) for v in variables)
    np.testing.assert_allclose(kernel, 1 - 0.1 * 0.5)  # AdamW: w <- w - lr * wd * w
    np.testing.assert_array_equal(scale, 1.0)
    np.testing.assert_array_equal(bias, 1.0)


def test_run_length_from_epochs_counts_optimiser_steps():
    from gemma_tune.config.schema import TrainSection
    from gemma_tune.data import Split
    from gemma_tune.train.loop import total_steps

    from gemma_tune.data.prompts import PromptSplit
    from gemma_tune.methods import build_method

    def method(name, **rl):
        recipe = {"name": "n", "model": {"preset": "gemma3_tiny", "tokenizer": "data/tiny/tokenizer.model"},
                  "method": name, "data": {"train": {"path": "data/tiny/arithmetic.jsonl",
                                                     "format": "prompt" if rl else "chat"}, "max_length": 64}}
        return build_method(gemma_tune.load_recipe({**recipe, **({"rl": rl} if rl else {})}))

    split = Split({"token_ids": np.zeros((10, 4), np.int32)}, np.ones(10), bucketed=False)  # 3 batches of 4
    assert total_steps(TrainSection(epochs=2.5, batch_size=4, grad_accum=2), split, method("sft")) == 4  # ⌈2.5·3/2⌉
    assert total_steps(TrainSection(max_steps=7, batch_size=4), split, method("sft")) == 7
    # online RL: rounds of batch_size × grad_accum prompts, each trained num_iterations steps
    prompts = PromptSplit([[1]] * 10, ["p"] * 10, {})  # rounds of 4 prompts: 3 per epoch
    grpo = method("grpo", num_iterations=2, rewards=["answer_match"])
    assert total_steps(TrainSection(epochs=1.5, batch_size=2, grad_accum=2), prompts, grpo) == 9  # ⌈1.5 · 3 · 2⌉


def test_bfloat16_lora_keeps_the_frozen_base_in_bfloat16(tmp_path):
    from gemma_tune.train.build import build_for_recipe

    config = recipe(tmp_path / "run", lora={"rank": 4, "alpha": 8, "targets": ["q", "v"]}, max_steps=1)
    config["model"]["dtype"] = "bfloat16"
    model, _ = build_for_recipe(gemma_tune.load_recipe(config))
    q_proj = model.blocks[0].attention.q_proj
    assert q_proj._kernel.dtype == "bfloat16" and model.token_embedding.embeddings.dtype == "bfloat16"
    assert q_proj.lora_kernel_a.dtype == "float32" and q_proj.lora_kernel_b.dtype == "float32"
    assert {v.dtype for v in model.trainable_weights} == {"float32"}
