"""An install that works outside the checkout: the wheel carries the presets, the bundled recipes and the
tiny tokenizer, model and data (package data found through importlib.resources), so that, installed into
a fresh virtual environment, `gemma-tune` runs the quickstart from an unrelated directory.

The fresh environment gets gemma_tune from the wheel alone; its dependencies are those of this
interpreter, reached through a .pth path entry (a path entry does not run this environment's editable
hook, so the checkout is not importable there: the test checks where gemma_tune is imported from).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import gguf
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, env=None, timeout=600):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the fresh environment's bin directory, the wheel, an environment for its commands)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # built from a copy: an in-tree build would leave build/ in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "gemma_tune", source / "gemma_tune",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
          str(tmp / "dist"), str(source)], cwd=tmp)
    wheel = next((tmp / "dist").glob("gemma_tune-*.whl"))

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    fresh_python = venv / "bin" / "python"
    fresh_site = _run([str(fresh_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                      cwd=tmp).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(fresh_site, "dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(fresh_python), "install", "--no-deps", "--quiet",
          str(wheel)], cwd=tmp)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return venv / "bin", wheel, env


def test_the_wheel_carries_presets_recipes_and_tiny_data(installed):
    _, wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("gemma_tune/bundled/configs/models/gemma3_1b.yaml", "gemma_tune/bundled/recipes/quickstart.yaml",
                   "gemma_tune/bundled/configs/data/tiny_chat.yaml", "gemma_tune/bundled/data/tiny/tokenizer.model",
                   "gemma_tune/bundled/data/tiny/chat.jsonl", "gemma_tune/bundled/data/tiny/sft_start/model.safetensors",
                   "gemma_tune/bundled/data/tiny_vision/captions.jsonl"):
        assert needed in names, needed


def test_installed_wheel_runs_the_quickstart_from_any_directory(installed, tmp_path):
    bin_dir, _, env = installed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(bin_dir / "python"), "-c", "import gemma_tune; print(gemma_tune.__file__)"], cwd=elsewhere, env=env)
    assert Path(where.stdout.strip()).is_relative_to(bin_dir.parent), where.stdout  # the wheel's, not the checkout's

    # a recipe naming a real-size preset validates from the package's presets (builds nothing)
    (elsewhere / "mine.yaml").write_text("name: mine\n"
                                         "model: {preset: gemma3_1b, weights: null, tokenizer: data/tiny/tokenizer.model}\n"
                                         "data: {train: {path: data/tiny/chat.jsonl, format: chat}}\n")
    checked = _run([str(bin_dir / "gemma-tune"), "validate", "mine.yaml"], cwd=elsewhere, env=env)
    assert "gemma3_1b (gemma3, 26 layers" in checked.stdout, checked.stdout

    backend = os.environ.get("KERAS_BACKEND", "jax")
    _run([str(bin_dir / "gemma-tune"), "run", "recipes/quickstart.yaml", "--backend", backend, "train.max_steps=6", "train.warmup_steps=2",
          "train.eval_every=3", "train.save_every=6", "train.sample_prompts=[]", "export.formats=[gguf]",
          "export.quantize=q8_0"],
         cwd=elsewhere, env=env)
    run_dir = elsewhere / "runs" / "quickstart"
    losses = [row["loss"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if "loss" in row]
    assert losses and all(loss == loss for loss in losses)  # trained, finite
    reader = gguf.GGUFReader(run_dir / "exports" / "gguf" / "model.gguf")  # the recipe's export.quantize reached it
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32", kinds
    assert "FROM ./model.gguf" in (run_dir / "exports" / "gguf" / "Modelfile").read_text()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["data"]["train"]["source"].endswith("gemma_tune/bundled/data/tiny/chat.jsonl")
    assert Path(manifest["data"]["train"]["source"]).is_relative_to(bin_dir.parent)


def test_init_writes_a_starter_that_runs_where_it_was_written(installed, tmp_path):
    bin_dir, _, env = installed
    _run([str(bin_dir / "gemma-tune"), "init", "project"], cwd=tmp_path, env=env)
    project = tmp_path / "project"
    assert (project / "data" / "tiny" / "chat.jsonl").is_file() and (project / "data" / "tiny" / "tokenizer.model").is_file()
    checked = _run([str(bin_dir / "gemma-tune"), "validate", "recipe.yaml"], cwd=project, env=env)
    assert f"chat: {project / 'data' / 'tiny' / 'chat.jsonl'}" in checked.stdout, checked.stdout
    again = subprocess.run([str(bin_dir / "gemma-tune"), "init", "project"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
