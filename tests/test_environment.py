"""`gemma-tune env` (the environment report), deterministic kernels, and `gemma-tune init` (a starter)."""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import yaml

from gemma_tune.cli import main
from gemma_tune.config import load_recipe
from gemma_tune.environment import environment


def test_env_reports_backend_devices_and_versions(capsys):
    backend = keras.backend.backend()
    assert main(["env", "--backend", backend]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"backend   {backend}")
    assert "device    cpu" in out and "GiB" in out
    assert f"keras {keras.__version__}" in out and "gemma_tune 0.1.0" in out and "keras-hub" in out
    record = environment(backend)
    assert record["devices"] and record["cpu"] and record["packages"]["keras"] == keras.__version__


def test_deterministic_kernels_are_switched_on_in_a_fresh_process():
    backend = keras.backend.backend()
    code = ("from gemma_tune.backend import select_backend, use_deterministic_kernels, deterministic_kernels\n"
            f"b = select_backend('{backend}'); print(deterministic_kernels(b)); use_deterministic_kernels(b)\n"
            "print(deterministic_kernels(b))\n"
            "import os; print('flags:', os.environ.get('XLA_FLAGS', ''), os.environ.get('CUBLAS_WORKSPACE_CONFIG', ''))")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "CUBLAS_WORKSPACE_CONFIG")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    before, after, flags = done.stdout.strip().splitlines()[-3:]
    assert before == "off" and after.startswith("on (")
    if backend == "jax":
        assert "--xla_gpu_deterministic_ops=true" in flags
    if backend == "torch":
        assert ":4096:8" in flags


def test_init_writes_a_self_contained_starter(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "mine"]) == 0
    written = tmp_path / "mine" / "recipe.yaml"
    text = written.read_text()
    assert text.startswith("# Starter recipe from gemma_tune's bundled quickstart.yaml")
    raw = yaml.safe_load(text)
    assert "base" not in raw and "description" not in raw and raw["output_dir"] == "runs/quickstart"
    assert raw["data"]["train"]["path"] == "data/tiny/chat.jsonl" and raw["model"]["tokenizer"] == "data/tiny/tokenizer.model"
    monkeypatch.chdir(tmp_path / "mine")
    recipe = load_recipe("recipe.yaml")
    assert recipe.data.train.path == str(tmp_path / "mine" / "data" / "tiny" / "chat.jsonl")
    assert recipe.model.preset == "gemma3_tiny" and recipe.model.architecture["num_layers"] == 6
    assert "next: cd" in capsys.readouterr().out


def test_init_copies_a_vision_starter_with_its_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "vision", "--recipe", "paligemma_quickstart"]) == 0
    assert (tmp_path / "vision" / "data" / "tiny_vision" / "images" / "150.png").is_file()
    monkeypatch.chdir(tmp_path / "vision")
    recipe = load_recipe("recipe.yaml")
    assert recipe.data.train.path.startswith(str(tmp_path / "vision" / "data" / "tiny_vision"))


def test_init_overwrites_nothing_and_names_unknown_recipes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "recipe.yaml").write_text("name: keep me\n")
    assert main(["init", "mine"]) == 2
    assert (tmp_path / "mine" / "recipe.yaml").read_text() == "name: keep me\n"
    assert main(["init", "other", "--recipe", "quickstrat"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "quickstart" in err and not (tmp_path / "other").exists()
