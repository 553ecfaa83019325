"""The `gemma-tune` command line: help, list, validate, and user errors as exit code 2 without traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "gemma_tune.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_help_names_every_subcommand():
    out = cli("--help")
    assert out.returncode == 0
    for command in ("validate", "run", "list", "keys", "export", "generate"):
        assert command in out.stdout
    run_help = cli("run", "--help").stdout
    assert "--backend" in run_help and "--resume" in run_help and "KEY=VALUE" in run_help


def test_version_module_entry_point_and_public_api():
    import gemma_tune

    module = subprocess.run([sys.executable, "-m", "gemma_tune", "--version"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert module.returncode == 0 and module.stdout.strip() == f"gemma-tune {gemma_tune.__version__}"
    assert cli("keys", "train").returncode == 0
    assert {"run", "load_recipe", "load_model", "RunResult"} <= set(dir(gemma_tune))


def test_list_shows_recipes_and_presets():
    out = cli("list")
    assert out.returncode == 0
    assert "recipes/quickstart.yaml" in out.stdout
    for preset in ("gemma_2b", "gemma2_27b", "gemma3_270m", "gemma3_27b", "codegemma_7b", "paligemma2_3b_448"):
        assert preset in out.stdout


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_validate_bundled_recipes(recipe):
    out = cli("validate", recipe)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


def test_user_error_is_one_message_exit_2_no_traceback(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({"name": "x", "model": {"preset": "gemma3_tiny"},
                                      "data": {"train": {"path": "missing.jsonl", "format": "chat"}},
                                      "train": {"batch_sise": 4}}))
    for command in ("validate", "run"):
        out = cli(command, recipe, "lora.rank=0", cwd=tmp_path)
        assert out.returncode == 2
        assert "Traceback" not in out.stderr
        assert "bad.yaml: train.batch_sise: unknown key 'batch_sise'; did you mean 'batch_size'?" in out.stderr
        assert "command-line override: lora.rank: expected a value greater than 0, got 0" in out.stderr


def test_missing_recipe_and_bad_backend(tmp_path):
    out = cli("validate", tmp_path / "none.yaml")
    assert out.returncode == 2 and "recipe file not found" in out.stderr and "Traceback" not in out.stderr
    out = cli("run", ROOT / "recipes" / "quickstart.yaml", "--backend", "mxnet")
    assert out.returncode == 2 and "invalid choice: 'mxnet'" in out.stderr


def test_overrides_may_follow_options():
    from gemma_tune.cli import parse

    args = parse(["run", "recipes/quickstart.yaml", "--backend", "torch", "train.max_steps=5", "lora.rank=8"])
    assert args.backend == "torch" and args.overrides == ["train.max_steps=5", "lora.rank=8"]
    with pytest.raises(SystemExit):
        parse(["run", "recipes/quickstart.yaml", "--bogus"])
    with pytest.raises(SystemExit):
        parse(["list", "train.max_steps=5"])
