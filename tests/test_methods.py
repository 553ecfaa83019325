"""Tuning methods as components of the one trainer: SFT's numbers are those from before methods became
components; dpo, ipo, simpo and orpo learn the tiny preference pairs; the reference model's three forms
agree; a preference run resumes exactly; options belong to their method."""

import json
import re
import shutil

import keras
import numpy as np
import pytest
from keras import ops

import gemma_tune
from gemma_tune.errors import ConfigError

TINY = {"num_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 16, "query_pre_attn_scalar": 16}

# The quickstart's first four SFT losses (log_every 1) and its eval loss, per backend: measured before the
# trainer ran methods as components (commit c47bbd4), then again when initial weights moved to the host
# (gemma_tune.models.init, commit 5eb7f82: the one change to these numbers since; the three backends now
# agree to 2e-7 relative).
SFT_BEFORE = {
    "jax": ([6.803918838500977, 5.34459924697876, 4.9136552810668945, 4.271815299987793], 4.3332197076818915),
    "tensorflow": ([6.80391788482666, 5.344600200653076, 4.913654804229736, 4.271816730499268], 4.333220003963857),
    "torch": ([6.803918361663818, 5.344599723815918, 4.913654804229736, 4.271816253662109], 4.333219830909472),
}


def test_sft_losses_are_those_from_before_the_method_component(tmp_path):
    result = gemma_tune.run("recipes/quickstart.yaml", overrides=[
        f"output_dir={tmp_path / 'q'}", "train.max_steps=4", "train.log_every=1", "train.warmup_steps=1",
        "train.eval_every=4", "train.sample_prompts=[]", "export.formats=[]"])
    losses, eval_loss = SFT_BEFORE[keras.backend.backend()]
    assert result.history["loss"] == pytest.approx(losses, rel=1e-6)
    assert result.history["eval_loss"] == pytest.approx([eval_loss], rel=1e-6)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """The first 64 bundled preference pairs."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(open("data/tiny/preference.jsonl").readlines()[:64]))
    return path


def recipe(run_dir, method, pairs, lora=True, preference=None, **train):
    spec = {
        "name": method, "seed": 0, "output_dir": str(run_dir), "method": method,
        "model": {"preset": "gemma3_tiny", "architecture": TINY, "tokenizer": "data/tiny/tokenizer.model",
                  "dtype": "float32"},
        "data": {"train": {"path": str(pairs), "format": "preference"},
                 "eval": {"path": str(pairs), "format": "preference"}, "max_length": 48},
        "train": {"max_steps": 80, "batch_size": 8, "learning_rate": 1e-2, "warmup_steps": 2, "log_every": 20,
                  **train},
    }
    if lora:
        spec["lora"] = {"rank": 8, "alpha": 16}
    if preference:
        spec["preference"] = preference
    return spec


@pytest.mark.parametrize("method", ["dpo", "ipo", "simpo", "orpo"])
def test_preference_methods_learn_the_training_pairs(tmp_path, pairs, method):
    result = gemma_tune.run(recipe(tmp_path / "run", method, pairs))
    history = result.history
    assert history["eval_rewards/accuracies"][-1] > 0.9
    assert history["eval_rewards/margins"][-1] > 0 and history["loss"][-1] < history["loss"][0]
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    names = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected"} | ({"nll_loss", "log_odds_ratio", "log_odds_chosen"} if method == "orpo" else set())
    assert names <= set(rows[-1]) and rows[-1]["split"] == "eval"
    header = (result.run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert names <= set(header)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["method"] == method and summary["eval"]["rewards/accuracies"] > 0.9


def test_precomputed_and_on_the_fly_references_give_the_same_losses(tmp_path, pairs):
    """With LoRA the on-the-fly reference is the model with its adapters off; precomputed, one pass of the
    same before training."""
    runs = {}
    for precompute in (True, False):
        spec = recipe(tmp_path / str(precompute), "dpo", pairs, max_steps=3, log_every=1,
                      preference={"precompute_reference": precompute})
        runs[precompute] = gemma_tune.run(spec).history["loss"]
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)
    assert (tmp_path / "True" / "reference" / "logps.safetensors").is_file()
    assert not (tmp_path / "False" / "reference").exists()


def test_a_reference_named_by_its_source_is_that_model(tmp_path, pairs):
    """Full fine-tuning from random weights: the reference null (the starting model) and the same starting
    weights saved as a Hugging Face checkpoint and named as preference.reference give the same run."""
    from gemma_tune.backend import set_random_seed
    from gemma_tune.checkpoints.hf import save_hf_checkpoint
    from gemma_tune.config import load_recipe
    from gemma_tune.train.build import build_for_recipe

    spec = recipe(tmp_path / "null", "dpo", pairs, lora=False, max_steps=3, log_every=1)
    set_random_seed(spec["seed"])  # as the run seeds itself: the same starting weights
    start, tokenizer = build_for_recipe(load_recipe(spec))
    (tmp_path / "start").mkdir()
    save_hf_checkpoint(start, tokenizer, tmp_path / "start")
    null = gemma_tune.run(spec).history["loss"]
    named = gemma_tune.run({**spec, "output_dir": str(tmp_path / "named"),
                            "preference": {"reference": str(tmp_path / "start")}}).history["loss"]
    assert named == pytest.approx(null, rel=1e-5)
    with pytest.raises(ConfigError, match="preference.precompute_reference: false needs lora"):
        gemma_tune.load_recipe({**spec, "preference": {"precompute_reference": False}})


def test_with_lora_the_adapters_off_reference_is_the_base_model():
    from gemma_tune.config.presets import preset_architecture
    from gemma_tune.methods.preference import pair_logps
    from gemma_tune.models import adapters_disabled, build_model, enable_lora

    keras.utils.set_random_seed(0)
    arch = preset_architecture("gemma3_tiny", **TINY)
    base = build_model(arch, dtype="float32")
    adapted = build_model(arch, dtype="float32")
    for mine, theirs in zip(adapted.variables, base.variables):
        mine.assign(theirs.value)
    enable_lora(adapted, rank=4, alpha=8)
    rng = np.random.default_rng(0)
    for layer in adapted._flatten_layers():
        if getattr(layer, "lora_enabled", False):  # non-zero adapters: they change the model
            layer.lora_kernel_b.assign(rng.normal(0, 0.5, layer.lora_kernel_b.shape).astype("float32"))
    batch = {}
    for side in ("chosen", "rejected"):
        ids = rng.integers(3, arch.vocab_size, (2, 12)).astype("int32")
        mask = np.zeros((2, 12), "float32")
        mask[:, 6:11] = 1.0
        batch.update({f"{side}_token_ids": ids, f"{side}_segment_ids": np.ones((2, 12), "int32"),
                      f"{side}_positions": np.tile(np.arange(12, dtype="int32"), (2, 1)),
                      f"{side}_target_ids": np.roll(ids, -1, axis=1), f"{side}_loss_mask": mask})
    expected = pair_logps(base, batch, False, 1024)
    with adapters_disabled(adapted):
        off = pair_logps(adapted, batch, False, 1024)
    on = pair_logps(adapted, batch, False, 1024)
    for a, b in ((off.chosen, expected.chosen), (off.rejected, expected.rejected)):
        np.testing.assert_allclose(ops.convert_to_numpy(a), ops.convert_to_numpy(b), rtol=1e-6, atol=1e-5)
    assert np.abs(ops.convert_to_numpy(on.chosen) - ops.convert_to_numpy(expected.chosen)).max() > 1e-2


def test_a_resumed_dpo_run_continues_with_identical_losses(tmp_path, pairs, caplog):
    """Full fine-tuning: the precomputed reference is read back from the run directory, not recomputed."""
    full = tmp_path / "full"
    spec = recipe(full, "dpo", pairs, lora=False, max_steps=4, log_every=1, save_every=2)
    uninterrupted = gemma_tune.run(spec).history["loss"]
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_4")
    shutil.rmtree(cut / "exports", ignore_errors=True)
    caplog.clear()
    resumed = gemma_tune.run({**spec, "output_dir": str(cut)}, resume=True).history["loss"]
    assert resumed == uninterrupted
    assert re.search(r"reference log-probabilities read from \S+reference/logps.safetensors", caplog.text)


def test_options_belong_to_their_method(pairs, tmp_path):
    with pytest.raises(ConfigError, match=r"preference.gamma: not an option of dpo \(its options: beta, "
                                          r"label_smoothing, reference, precompute_reference\)"):
        gemma_tune.load_recipe(recipe(tmp_path, "dpo", pairs, preference={"gamma": 1.0}))
    sft = recipe(tmp_path, "sft", pairs, preference={"beta": 0.2})
    sft["data"] = {"train": {"path": "data/tiny/chat.jsonl", "format": "chat"}}
    with pytest.raises(ConfigError, match="preference.beta: an option of dpo, ipo, simpo, orpo"):
        gemma_tune.load_recipe(sft)
    with pytest.raises(ConfigError, match="method dpo trains on preference data, not chat"):
        gemma_tune.load_recipe({**recipe(tmp_path, "dpo", pairs), "data": sft["data"]})
    from gemma_tune.methods import method_options

    options = method_options(gemma_tune.load_recipe(recipe(tmp_path, "simpo", pairs, preference={"beta": 2.5})))
    assert options == {"beta": 2.5, "gamma": 1.0, "sft_weight": 0.0}  # each method's own defaults
