"""What an export may touch: never its source or the run directory around it (bar RUN/exports/), the
temporaries that killed exports left are cleaned, every exported file gets ordinary permissions, and a
PEFT adapter names its base model (or a warning says how)."""

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import keras
import pytest
import yaml

from gemma_tune.checkpoints import hf as hf_module
from gemma_tune.cli import main
from gemma_tune.config import load_recipe, recipe_architecture
from gemma_tune.config.presets import preset_architecture
from gemma_tune.errors import UserError
from gemma_tune.export import export_model
from gemma_tune.export.atomic import check_destination
from gemma_tune.methods import build_method
from gemma_tune.models import build_model, enable_lora
from gemma_tune.tempfiles import TEMP_NAME
from gemma_tune.tokenizer import load_tokenizer
from gemma_tune.train import checkpoint
from gemma_tune.train.task import MethodTrainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ROOT / "data" / "tiny" / "tokenizer.model")


def tiny_model(lora: bool = False):
    model = build_model(preset_architecture("gemma3_tiny", num_layers=2))
    if lora:
        enable_lora(model, rank=2, alpha=4.0)
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with a LoRA checkpoint, as `gemma-tune run recipes/quickstart.yaml` leaves it."""
    path = tmp_path_factory.mktemp("runs") / "quick"
    path.mkdir()
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"output_dir={path}", "lora.rank=2",
                                                                "model.architecture.num_layers=2"])
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    (path / "manifest.json").write_text(json.dumps({"name": recipe.name}))
    model = build_model(recipe_architecture(recipe))
    enable_lora(model, recipe.lora.rank, recipe.lora.alpha, targets=recipe.lora.targets)
    trainer = MethodTrainer(model, build_method(recipe))  # what the trainer checkpoints
    trainer.compile(optimizer=keras.optimizers.AdamW())
    trainer.optimizer.build(trainer.trainable_variables)
    checkpoint.save(path, 3, trainer, {"step": 3})
    return path


def contents(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ---- destinations that would break the source -------------------------------------------------------

@pytest.mark.parametrize("out", [".", "checkpoints/step_3", "checkpoints", "logs", "exports", ".."],
                         ids=["the run", "its checkpoint", "its checkpoints", "inside it", "exports itself",
                              "around it"])
def test_export_into_its_own_run_directory_is_refused_before_loading(run_dir, out, capsys):
    before = contents(run_dir)
    code = main(["export", str(run_dir), "--format", "safetensors", "--out", str(run_dir / out), "--force"])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("loaded from" in err or "run directory" in err)
    assert contents(run_dir) == before


def test_export_below_run_exports_is_allowed(run_dir, tmp_path):
    assert main(["export", str(run_dir), "--format", "peft", "--out", str(run_dir / "exports" / "peft")]) == 0
    assert (run_dir / "exports" / "peft" / "adapter_config.json").is_file()
    assert (run_dir / "checkpoints" / "step_3" / "model.safetensors").is_file()
    # an export inside a run is a source too: it may not be replaced, but a sibling may be written
    source = run_dir / "exports" / "peft"
    with pytest.raises(UserError, match="is the directory the model is loaded from"):
        check_destination(source, source)
    with pytest.raises(UserError, match="run directory"):
        check_destination(run_dir / "checkpoints", source)
    check_destination(run_dir / "exports" / "safetensors", source)
    check_destination(tmp_path / "elsewhere", source)


def test_paths_are_compared_resolved(tmp_path):
    source = tmp_path / "model"
    (source / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(source)
    for out in (tmp_path / "link", tmp_path / "link" / "sub", source / "sub" / ".." / "x", tmp_path / "other" / ".."):
        with pytest.raises(UserError, match="the directory the model is loaded from"):
            check_destination(out, tmp_path / "link")
    check_destination(tmp_path / "model2", source)


# ---- temporaries of killed exports --------------------------------------------------------------------

def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_exports_are_removed(tokenizer, tmp_path, monkeypatch):
    dead = tmp_path / f".out.tmp-{dead_pid()}-0123abcd"
    alive = tmp_path / f".out.tmp-{os.getpid()}-0123abcd"
    for stale in (dead, alive):
        stale.mkdir()
        (stale / "model.safetensors").write_bytes(b"half written")
    seen = []
    original = hf_module.write_hf_tokenizer_files

    def recording(tok, out_dir):
        seen.append(Path(out_dir).name)
        original(tok, out_dir)

    monkeypatch.setattr(hf_module, "write_hf_tokenizer_files", recording)
    export_model(tiny_model(), tokenizer, tmp_path / "out", "safetensors")
    match = TEMP_NAME.match(seen[0])  # the export itself was written under a temporary with our pid
    assert match and match["name"] == "out" and int(match["pid"]) == os.getpid()
    assert not dead.exists() and alive.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", alive.name])


# ---- permissions ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask 022", "umask 027"])
@pytest.mark.parametrize("fmt", ["keras", "safetensors", "peft"])
def test_exported_files_have_ordinary_permissions(tokenizer, tmp_path, fmt, umask):
    previous = os.umask(umask)
    try:
        out = export_model(tiny_model(lora=fmt == "peft"), tokenizer, tmp_path / fmt, fmt, base_model="org/base")
    finally:
        os.umask(previous)
    entries = [out, *out.rglob("*")]
    assert any(p.suffix == (".h5" if fmt == "keras" else ".safetensors") for p in entries)
    for path in entries:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, (path, oct(path.stat().st_mode))


# ---- the base model a PEFT adapter names ------------------------------------------------------------------

def test_base_model_option_lands_in_adapter_config(run_dir, tmp_path):
    base = tmp_path / "base"
    assert main(["export", str(run_dir), "--format", "safetensors", "--no-merge-lora", "--out", str(base)]) == 0
    assert main(["export", str(run_dir), "--format", "peft", "--out", str(tmp_path / "a"),
                 "--base-model", str(base)]) == 0
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())
    assert main(["export", str(run_dir), "--format", "peft", "--out", str(tmp_path / "b"),
                 "--base-model", "hf://google/gemma-3-1b-pt@main"]) == 0
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "google/gemma-3-1b-pt"


def test_unknown_base_is_a_warning_saying_what_to_set(tokenizer, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="gemma_tune"):
        out = export_model(tiny_model(lora=True), tokenizer, tmp_path / "adapter", "peft")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    assert any("--no-merge-lora" in r.getMessage() and "--base-model" in r.getMessage() for r in caplog.records)
    caplog.clear()
    model = tiny_model(lora=True)
    model.checkpoint_source = "hf://org/base"
    with caplog.at_level(logging.WARNING, logger="gemma_tune"):
        out = export_model(model, tokenizer, tmp_path / "named", "peft")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/base"
    assert not [r for r in caplog.records if r.name.startswith("gemma_tune")]


def test_exports_directory_is_ignored_by_git():
    lines = (ROOT / ".gitignore").read_text().splitlines()
    assert "exports/" in lines and "runs/" in lines


def test_help_names_base_model(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "--base-model" in capsys.readouterr().out
