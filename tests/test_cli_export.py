"""`gemma-tune export`: a run directory (its latest training checkpoint, LoRA unmerged) exported as
safetensors and as a PEFT adapter that transformers / peft load with the run's logits; an HF checkpoint
re-exported in bfloat16; user errors as one message and exit code 2."""

import json

import keras
import numpy as np
import pytest
import torch
import transformers

from gemma_tune import load_model
from gemma_tune.cli import main
from gemma_tune.config import load_recipe, recipe_architecture
from gemma_tune.methods import build_method
from gemma_tune.models import build_model, enable_lora, lora_projections
from gemma_tune.rundir import resolved_recipe_yaml
from gemma_tune.train import checkpoint
from gemma_tune.train.task import MethodTrainer

TOL = 1e-4
IDS = np.random.RandomState(0).randint(3, 512, (2, 24)).astype(np.int32)


def ours(model):
    return keras.ops.convert_to_numpy(model({"token_ids": IDS, "padding_mask": np.ones_like(IDS)}))


def transformers_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.numpy()


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as `gemma-tune run recipes/quickstart.yaml` leaves it after a step: the resolved
    recipe, a manifest and a checkpoint written by the trainer's own `checkpoint.save` (random weights
    and adapters stand in for trained ones)."""
    path = tmp_path_factory.mktemp("run")
    recipe = load_recipe("recipes/quickstart.yaml", [f"output_dir={path}", "lora.rank=4"])
    (path / "recipe.yaml").write_text(resolved_recipe_yaml(recipe))
    (path / "manifest.json").write_text(json.dumps({"name": recipe.name}))
    model = build_model(recipe_architecture(recipe))
    enable_lora(model, recipe.lora.rank, recipe.lora.alpha, targets=recipe.lora.targets)
    rng = np.random.RandomState(0)
    for v in model.weights:
        v.assign(rng.normal(0.0, 0.3 if len(v.shape) == 1 else 0.08, v.shape).astype(np.float32))
    trainer = MethodTrainer(model, build_method(recipe))  # what the trainer checkpoints
    trainer.compile(optimizer=keras.optimizers.AdamW())
    trainer.optimizer.build(trainer.trainable_variables)
    checkpoint.save(path, 3, trainer, {"step": 3})
    return path, ours(model)


def test_run_dir_loads_from_its_checkpoint_with_lora_unmerged(run_dir):
    path, expected = run_dir
    model = load_model(path)
    assert len(list(lora_projections(model))) == 7 * model.architecture.num_layers
    assert np.array_equal(ours(model), expected)


def test_export_run_as_safetensors_and_peft(run_dir, tmp_path, capsys):
    path, expected = run_dir
    assert main(["export", str(path), "--format", "safetensors", "--out", str(tmp_path / "merged")]) == 0
    assert "exported" in capsys.readouterr().out
    assert np.abs(transformers_logits(hf_model(tmp_path / "merged")) - expected).max() <= TOL

    import peft

    assert main(["export", str(path), "--format", "safetensors", "--no-merge-lora", "--out", str(tmp_path / "base")]) == 0
    assert main(["export", str(path), "--format", "peft", "--out", str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] is None  # the run started from random weights
    assert (tmp_path / "adapter" / "tokenizer.model").is_file()
    applied = peft.PeftModel.from_pretrained(hf_model(tmp_path / "base"), tmp_path / "adapter").eval()
    assert np.abs(transformers_logits(applied) - expected).max() <= TOL


def test_export_run_as_keras(run_dir, tmp_path):
    path, expected = run_dir
    assert main(["export", str(path), "--format", "keras", "--out", str(tmp_path / "keras")]) == 0
    assert (tmp_path / "keras" / "model.keras").is_file()
    assert np.abs(ours(load_model(tmp_path / "keras")) - expected).max() <= TOL


def test_export_hf_checkpoint_in_bfloat16(run_dir, tmp_path):
    path, _ = run_dir
    assert main(["export", str(path), "--format", "safetensors", "--out", str(tmp_path / "f32")]) == 0
    assert main(["export", str(tmp_path / "f32"), "--format", "safetensors", "--dtype", "bfloat16",
                 "--out", str(tmp_path / "bf16")]) == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    back = ours(load_model(tmp_path / "bf16"))
    assert np.abs(back - ours(load_model(tmp_path / "f32"))).max() < 0.5


def test_user_errors_exit_2_with_one_message(run_dir, tmp_path, capsys):
    path, _ = run_dir
    assert main(["export", str(tmp_path / "absent"), "--format", "safetensors", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no such checkpoint directory" in err and "Traceback" not in err

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert main(["export", str(path), "--format", "safetensors", "--out", str(tmp_path / "taken")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(path), "--format", "safetensors", "--out", str(tmp_path / "taken"), "--force"]) == 0
    assert (tmp_path / "taken" / "config.json").is_file() and not (tmp_path / "taken" / "file").exists()

    assert main(["export", str(path), "--format", "safetensors", "--preset", "gemma3_1b",
                 "--out", str(tmp_path / "p")]) == 2
    assert "does not match preset 'gemma3_1b'" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_export_help_names_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    for option in ("--format", "--out", "--merge-lora", "--no-merge-lora", "--dtype", "--force", "--backend"):
        assert option in text
