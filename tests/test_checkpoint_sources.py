"""Checkpoint sources: hf://ORG/NAME[@REVISION] through huggingface_hub's cache (offline here), malformed
and unreachable sources as CheckpointErrors that say what to do."""

import shutil

import huggingface_hub.constants
import keras
import numpy as np
import pytest

from gemma_tune import load_model_and_tokenizer
from gemma_tune.checkpoints.sources import parse_hf, resolve_source
from gemma_tune.config.presets import preset_architecture
from gemma_tune.errors import CheckpointError
from gemma_tune.export import export_model
from gemma_tune.models import build_model
from gemma_tune.tokenizer import load_tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A huggingface_hub cache holding `org/tiny` at `main` (a gemma_tune export of a tiny model)."""
    tokenizer = load_tokenizer("data/tiny/tokenizer.model")
    model = build_model(preset_architecture("gemma3_tiny", num_layers=2))
    export = export_model(model, tokenizer, tmp_path / "export", "safetensors")
    repo = tmp_path / "cache" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(export, repo / "snapshots" / COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    return model


@pytest.mark.parametrize("source", ["hf://org/tiny", "hf://org/tiny@main", f"hf://org/tiny@{COMMIT}"])
def test_hf_source_from_the_hub_cache(hub_cache, source):
    model, tokenizer = load_model_and_tokenizer(source)
    assert model.architecture.num_layers == 2 and tokenizer.vocab_size == 512
    assert model.checkpoint_source == source
    for ours, theirs in zip(model.weights, hub_cache.weights):
        assert np.array_equal(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs))


def test_parse_hf():
    assert parse_hf("hf://google/gemma-3-1b-it") == ("google/gemma-3-1b-it", None)
    assert parse_hf("hf://google/gemma-3-1b-it@v1.0") == ("google/gemma-3-1b-it", "v1.0")


@pytest.mark.parametrize("source,expected", [
    ("hf://gemma-3-1b-it", "expected hf://ORG/NAME"),
    ("hf://a/b/c", "expected hf://ORG/NAME"),
    ("kaggle://google/gemma-3", "expected kaggle://OWNER/MODEL/FRAMEWORK/VARIATION"),
    ("hf://org/not-cached", "hf auth login"),  # offline (tests set HF_HUB_OFFLINE=1) and not cached
])
def test_bad_or_unreachable_sources(source, expected, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match=expected) as e:
        resolve_source(source)
    assert e.value.where == source


def test_local_sources(tmp_path):
    assert resolve_source(tmp_path) == tmp_path
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="got a file"):
        resolve_source(tmp_path / "file")
