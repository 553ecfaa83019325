"""Recipes that name only `model.weights`: the architecture comes from the checkpoint (read cheaply from its
config at validation for local weights, never downloaded), a preset or model.architecture stated beside
weights must compute the checkpoint's decoder on every load path (hf:// included) with an error naming
the fields, the matching preset and the fix; what the tokenizer and the vocabulary say at build time."""

import json
import logging
import shutil
from pathlib import Path

import huggingface_hub.constants
import keras
import pytest
import yaml

from gemma_tune.cli import main
from gemma_tune.config import load_recipe, recipe_architecture
from gemma_tune.config.presets import preset_architecture
from gemma_tune.config.validate import known_architecture
from gemma_tune.errors import CheckpointError, ConfigError
from gemma_tune.export import export_model
from gemma_tune.loading import source_architecture
from gemma_tune.methods import build_method
from gemma_tune.models import build_model, enable_lora
from gemma_tune.tokenizer import load_tokenizer
from gemma_tune.train import checkpoint
from gemma_tune.train.build import build_for_recipe
from gemma_tune.train.task import MethodTrainer

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ROOT / "data" / "tiny" / "tokenizer.model")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer):
    """A Hugging Face checkpoint of the gemma3_tiny preset (context 1024)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-hf"
    return export_model(build_model(preset_architecture("gemma3_tiny")), tokenizer, path, "safetensors")


@pytest.fixture(scope="module")
def odd_dir(tmp_path_factory, tokenizer):
    """A Hugging Face checkpoint of a 2-layer model no preset describes."""
    path = tmp_path_factory.mktemp("ckpt") / "odd-hf"
    return export_model(build_model(preset_architecture("gemma3_tiny", num_layers=2)), tokenizer, path, "safetensors")


def recipe_with(model: dict) -> dict:
    return {"name": "w", "model": {"dtype": "float32", **model}, "lora": {"rank": 2},
            "data": {"train": {"path": str(ROOT / "data" / "tiny" / "chat.jsonl"), "format": "chat"},
                     "max_length": 128},
            "train": {"max_steps": 2}}


def weights_recipe(weights, **model) -> dict:
    return recipe_with({"weights": str(weights), **model})


def config_error(recipe, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe, overrides)
    return str(info.value)


def test_weights_alone_validate_and_build(hf_dir):
    recipe = load_recipe(weights_recipe(hf_dir))
    assert recipe_architecture(recipe) is None
    assert known_architecture(recipe) == preset_architecture("gemma3_tiny")
    model, tok = build_for_recipe(recipe)
    assert model.architecture == preset_architecture("gemma3_tiny") and tok.vocab_size == 512
    assert model.checkpoint_source == str(hf_dir)


def test_validation_reads_the_context_from_the_checkpoint_config(hf_dir):
    text = config_error(weights_recipe(hf_dir), ["data.max_length=2048"])
    assert "data.max_length: expected at most the model's context of 1024 tokens, got 2048" in text


def test_cli_validate_prints_the_checkpoint_architecture(hf_dir, tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(weights_recipe(hf_dir)))
    assert main(["validate", str(path)]) == 0
    assert "from the checkpoint (gemma3, 6 layers, hidden 64)" in capsys.readouterr().out
    path.write_text(json.dumps(weights_recipe("hf://org/not-downloaded")))
    assert main(["validate", str(path)]) == 0  # remote weights are not downloaded to validate
    assert "read from the checkpoint once downloaded" in capsys.readouterr().out


def test_a_mismatched_preset_names_the_fields_and_the_matching_preset(hf_dir):
    text = config_error(weights_recipe(hf_dir, preset="gemma3_1b"))
    assert "model.preset: the checkpoint does not match model.preset 'gemma3_1b'" in text
    assert "hidden_size: checkpoint 64 vs recipe 1152" in text and "num_layers: checkpoint 6 vs recipe 26" in text
    assert "it matches preset gemma3_tiny" in text and "model.preset=gemma3_tiny model.architecture=null" in text
    assert "model.preset=null model.architecture=null" in text
    recipe = load_recipe(weights_recipe(hf_dir, preset="gemma3_tiny"))  # the matching preset is accepted
    assert recipe_architecture(recipe) == preset_architecture("gemma3_tiny")


def test_quickstart_with_other_weights_says_how_to_drop_its_preset(odd_dir):
    quickstart = ROOT / "recipes" / "quickstart.yaml"
    text = config_error(quickstart, [f"model.weights={odd_dir}"])
    assert "configs/models/gemma3_tiny.yaml" in text or "recipes/quickstart.yaml" in text
    assert "num_layers: checkpoint 2 vs recipe 6" in text and "no configs/models preset matches it" in text
    assert "`base:`" in text
    recipe = load_recipe(quickstart, [f"model.weights={odd_dir}", "model.preset=null", "model.architecture=null"])
    assert known_architecture(recipe).num_layers == 2


def test_architecture_from_a_base_preset_file_must_agree(hf_dir):
    recipe = {**weights_recipe(hf_dir), "base": [str(ROOT / "configs" / "models" / "gemma3_1b.yaml")]}
    text = config_error(recipe)
    assert "gemma3_1b.yaml: model.preset: the checkpoint does not match model.preset 'gemma3_1b' with " \
           "model.architecture" in text
    recipe["model"]["preset"] = None  # the file's architecture stays, without its preset name
    text = config_error(recipe)
    assert "model.architecture: the checkpoint does not match model.architecture" in text
    assert "it matches preset gemma3_tiny" in text


def test_source_architecture_of_every_local_kind(hf_dir, tokenizer, tmp_path):
    tiny = preset_architecture("gemma3_tiny")
    assert source_architecture(hf_dir) == tiny
    holder = tmp_path / "holder"
    shutil.copytree(hf_dir, holder / "inner")
    assert source_architecture(holder) == tiny
    model = build_model(tiny)
    model.checkpoint_source = str(hf_dir)
    enable_lora(model, rank=2, alpha=4.0)
    assert source_architecture(export_model(model, tokenizer, tmp_path / "adapter", "peft")) == tiny
    keras_export = export_model(build_model(preset_architecture("gemma3_tiny", num_layers=2)), tokenizer,
                                tmp_path / "keras", "keras")
    assert source_architecture(keras_export).num_layers == 2
    assert source_architecture("hf://org/anything") is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        source_architecture(tmp_path / "empty")


# ---- hf:// weights: checked when downloaded, at build time --------------------------------------------------

@pytest.fixture
def hub_cache(hf_dir, tmp_path, monkeypatch):
    """A huggingface_hub cache holding `org/tiny` (the gemma3_tiny checkpoint) at `main`."""
    repo = tmp_path / "cache" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(hf_dir, repo / "snapshots" / COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))


def test_hf_weights_with_a_mismatched_preset_fail_when_built(hub_cache):
    recipe = load_recipe(weights_recipe("hf://org/tiny", preset="gemma3_1b"))  # nothing downloaded to validate
    with pytest.raises(CheckpointError) as info:
        build_for_recipe(recipe)
    text = str(info.value)
    assert text.startswith("hf://org/tiny: the checkpoint does not match the recipe's model.preset")
    assert "it matches preset gemma3_tiny" in text and "model.preset=null model.architecture=null" in text
    model, _ = build_for_recipe(load_recipe(weights_recipe("hf://org/tiny")))
    assert model.architecture == preset_architecture("gemma3_tiny") and model.checkpoint_source == "hf://org/tiny"


# ---- a run trained from local weights ---------------------------------------------------------------------------

def test_run_from_local_weights_records_them_as_the_adapter_base(hf_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    recipe = load_recipe({**weights_recipe(hf_dir), "output_dir": str(run)})
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    (run / "manifest.json").write_text(json.dumps({"name": recipe.name}))
    model, _ = build_for_recipe(recipe)
    trainer = MethodTrainer(model, build_method(recipe))  # what the trainer checkpoints
    trainer.compile(optimizer=keras.optimizers.AdamW())
    trainer.optimizer.build(trainer.trainable_variables)
    checkpoint.save(run, 1, trainer, {"step": 1})
    assert source_architecture(run) == preset_architecture("gemma3_tiny")
    assert main(["export", str(run), "--format", "peft", "--out", str(run / "exports" / "peft")]) == 0
    config = json.loads((run / "exports" / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(hf_dir).resolve())


# ---- vocabulary and tokenizer --------------------------------------------------------------------------------

def test_a_vocabulary_larger_than_the_tokenizer_is_a_warning(caplog):
    recipe = load_recipe(recipe_with({"preset": "gemma3_tiny", "architecture": {"vocab_size": 600, "num_layers": 1},
                                      "tokenizer": str(ROOT / "data" / "tiny" / "tokenizer.model")}))
    with caplog.at_level(logging.WARNING, logger="gemma_tune"):
        build_for_recipe(recipe)
    messages = [r.getMessage() for r in caplog.records if r.name == "gemma_tune"]
    assert any("ids >= 512 are never produced by the tokenizer" in m and "image tokens" in m for m in messages)
