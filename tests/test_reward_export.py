"""A reward model's exports: safetensors that transformers loads as Gemma3TextForSequenceClassification,
Gemma2ForSequenceClassification and GemmaForSequenceClassification (num_labels 1, `score.weight`), and a
PEFT SEQ_CLS adapter with the score head saved whole, which peft applies over the base: the same float32
scores as ours within 1e-4 on a right-padded batch; both load back as a RewardModel; the keras format is
refused. The LoRA reward run starts from a causal-LM checkpoint, as a real one does."""

import json
import os
import tempfile

import keras
import numpy as np
import peft
import pytest
import torch
import transformers
from keras import ops
from safetensors import safe_open

import gemma_tune
from gemma_tune.cli import main
from gemma_tune.config.presets import preset_architecture
from gemma_tune.export import export_model
from gemma_tune.models import RewardModel, build_model
from gemma_tune.tokenizer import load_tokenizer

TOL = 1e-4
TOKENIZER = "data/tiny/tokenizer.model"
TINY = {"num_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 8, "query_pre_attn_scalar": 8}
BASE = dict(TINY, vocab_size=512, num_layers=4, sliding_window=8, max_position_embeddings=128)
ARCHS = {
    "gemma3": dict(BASE, sliding_window_pattern=2),
    "gemma2": dict(BASE, family="gemma2", use_qk_norm=False, rope_local_theta=None, rope_scaling_factor=1.0,
                   rope_theta=10_000.0, sliding_window_pattern=2, attn_logit_softcap=5.0, final_logit_softcap=3.0),
    "gemma": dict(BASE, family="gemma", use_qk_norm=False, use_post_attention_norm=False, use_post_ffw_norm=False,
                  rope_local_theta=None, rope_scaling_factor=1.0, rope_theta=10_000.0, sliding_window=None,
                  sliding_window_pattern=None, query_pre_attn_scalar=None),
}
CLASSES = {"gemma3": "Gemma3TextForSequenceClassification", "gemma2": "Gemma2ForSequenceClassification",
           "gemma": "GemmaForSequenceClassification"}

if keras.backend.backend() == "jax":  # identical programs compile once per test session
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "gemma_tune_jax_cache"))


def padded_batch(seed=0, lengths=(12, 7, 3)):
    """Right-padded token ids (pad id 0, as the tokenizer's) and their mask."""
    rng = np.random.RandomState(seed)
    ids = np.zeros((len(lengths), max(lengths)), np.int32)
    for r, n in enumerate(lengths):
        ids[r, :n] = rng.randint(3, 512, n)
    return ids, (ids > 0).astype(np.int32)


IDS, MASK = padded_batch()


def ours(model):
    return ops.convert_to_numpy(model({"token_ids": IDS, "padding_mask": MASK})).astype(np.float32)


def theirs(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.squeeze(-1).float().numpy()


def classifier(path, **kw):
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", **kw).eval()


def keys(file):
    with safe_open(str(file), "np") as f:
        return {name: f.get_slice(name).get_shape() for name in f.keys()}


@pytest.mark.parametrize("family", sorted(ARCHS))
def test_safetensors_export_is_a_transformers_sequence_classifier(family, tmp_path):
    model = RewardModel(build_model(preset_architecture("gemma3_tiny", **ARCHS[family])))
    rng = np.random.RandomState(0)
    for v in model.weights:  # every weight random (norms and the head included)
        v.assign(rng.normal(0.0, 0.3 if len(v.shape) == 1 else 0.08, v.shape).astype(np.float32))
    out = export_model(model, load_tokenizer(TOKENIZER), tmp_path / "hf", "safetensors")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [CLASSES[family]]
    assert config["num_labels"] == 1 and config["id2label"] == {"0": "LABEL_0"} and config["pad_token_id"] == 0
    tensors = keys(out / "model.safetensors")
    assert tensors["score.weight"] == [1, 32] and "lm_head.weight" not in tensors
    assert all(name.startswith("model.") for name in tensors if name != "score.weight")
    hf = classifier(out)
    assert type(hf).__name__ == CLASSES[family]
    np.testing.assert_allclose(theirs(hf), ours(model), atol=TOL)
    back = gemma_tune.load_model(out)
    assert isinstance(back, RewardModel)
    np.testing.assert_array_equal(ours(back), ours(model))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA reward run from a causal-LM checkpoint (random), exporting safetensors and peft at its end."""
    root = tmp_path_factory.mktemp("reward_export")
    keras.utils.set_random_seed(1)
    export_model(build_model(preset_architecture("gemma3_tiny", **TINY)), load_tokenizer(TOKENIZER), root / "base",
                 "safetensors")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(open("data/tiny/preference.jsonl").readlines()[:32]))
    return gemma_tune.run({
        "name": "reward-export", "seed": 0, "output_dir": str(root / "run"), "method": "reward",
        "model": {"weights": str(root / "base"), "dtype": "float32"},
        "lora": {"rank": 4, "alpha": 8, "targets": ["q", "v", "gate"]},
        "data": {"train": {"path": str(pairs), "format": "preference"}, "max_length": 48},
        "train": {"max_steps": 4, "batch_size": 8, "learning_rate": 2e-2, "schedule": "constant", "log_every": 4},
        "export": {"formats": ["safetensors", "peft"]},
    }), root / "base"


def test_run_exports_the_merged_reward_model(lora_run):
    run, _ = lora_run
    model = gemma_tune.load_model(run.run_dir)
    assert isinstance(model, RewardModel) and any(v.path.endswith("lora_kernel_b") for v in model.variables)
    hf = classifier(run.exports["safetensors"])
    np.testing.assert_allclose(theirs(hf), ours(model), atol=TOL)


def test_peft_export_carries_the_score_head(lora_run):
    run, base = lora_run
    adapter = run.exports["peft"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    assert config["base_model_name_or_path"] == str(base.resolve())
    tensors = keys(adapter / "adapter_model.safetensors")
    assert tensors["base_model.model.score.weight"] == [1, 32]
    assert all(".lora_" in name for name in tensors if name != "base_model.model.score.weight")
    expected = ours(gemma_tune.load_model(run.run_dir))
    # the base is a causal LM: its classifier head starts random, and the adapter's saved head replaces it
    over_base = peft.PeftModel.from_pretrained(classifier(base, num_labels=1), adapter).eval()
    np.testing.assert_allclose(theirs(over_base), expected, atol=TOL)
    auto = peft.AutoPeftModelForSequenceClassification.from_pretrained(
        adapter, num_labels=1, dtype=torch.float32, attn_implementation="eager").eval()
    np.testing.assert_allclose(theirs(auto), expected, atol=TOL)
    back = gemma_tune.load_model(adapter)
    assert isinstance(back, RewardModel)
    np.testing.assert_allclose(ours(back), expected, atol=1e-6)


def test_cli_exports_a_reward_run(lora_run, tmp_path, capsys):
    run, _ = lora_run
    out = tmp_path / "merged"
    assert main(["export", str(run.run_dir), "--format", "safetensors", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Gemma3TextForSequenceClassification"]
    np.testing.assert_allclose(theirs(classifier(out)), ours(gemma_tune.load_model(run.run_dir)), atol=TOL)
    capsys.readouterr()
    assert main(["export", str(run.run_dir), "--format", "keras", "--out", str(tmp_path / "keras")]) == 2
    err = capsys.readouterr().err
    assert "a reward model exports as safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "keras").exists()
