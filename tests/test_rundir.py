"""The run directory: resolved recipe (re-runnable as is) and manifest; backend selection."""

import json
import os

import keras
import pytest
import yaml

from gemma_tune.backend import select_backend
from gemma_tune.config import load_recipe
from gemma_tune.errors import UserError
from gemma_tune.rundir import RunDirectory


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chat.jsonl").write_text('{"messages": []}\n')
    (tmp_path / "tok.model").write_bytes(b"spm")
    return load_recipe({"name": "r", "seed": 7, "output_dir": str(tmp_path / "run"),
                        "model": {"preset": "gemma3_tiny", "tokenizer": "tok.model"},
                        "data": {"train": {"path": "chat.jsonl", "format": "chat"}, "max_length": 32}})


def test_run_dir_holds_resolved_recipe_and_manifest(recipe, tmp_path):
    with RunDirectory.open(recipe.output_dir) as held:
        assert not (held.path / "recipe.yaml").exists()  # nothing is written before the commit
        held.commit(recipe, keras.backend.backend(), fresh=True)
    run_dir = held.path
    resolved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert resolved["data"]["train"]["path"] == str(tmp_path / "chat.jsonl")
    os.chdir(run_dir)  # re-runnable as is, from anywhere
    assert load_recipe(run_dir / "recipe.yaml") == recipe

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["backend"] == keras.backend.backend()
    assert manifest["packages"]["keras"] == keras.__version__
    assert manifest["devices"]
    data = manifest["data"]["train"]
    assert data["files"] == 1 and len(data["sha256"]) == 64
    assert (run_dir / "logs" / "run.log").exists()


def test_backend_cannot_change_after_keras_import():
    active = keras.backend.backend()
    assert select_backend(active) == active
    other = next(b for b in ("jax", "tensorflow", "torch") if b != active)
    with pytest.raises(UserError, match=f"already imported with the {active} backend"):
        select_backend(other)
    with pytest.raises(UserError, match="unknown backend 'mxnet'"):
        select_backend("mxnet")
