"""gemma-tune repro / gemma_tune.repro: a stored run re-run and compared step by step — the golden quickstart run
(tests/golden/quickstart, scripts/make_golden_run.py) on this backend, a perturbed copy of it, a fresh run made
here, and bad input (exit 2) or a different environment under --strict (exit 1, nothing re-run)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import pytest
import yaml

import gemma_tune
from gemma_tune import cli
from gemma_tune.reproduce import DEFAULT_RTOL

GOLDEN = Path(__file__).parent / "golden" / "quickstart"
BACKEND = keras.backend.backend()
STORED = ("recipe.yaml", "manifest.json", "metrics.jsonl")


def repro_cli(run_dir, *args, cwd) -> subprocess.CompletedProcess:
    """`python -m gemma_tune repro RUN_DIR ARGS` on this backend, in its own process."""
    return subprocess.run([sys.executable, "-m", "gemma_tune", "repro", str(run_dir), "--backend", BACKEND, *args],
                          capture_output=True, text=True, cwd=cwd, env={**os.environ, "KERAS_BACKEND": BACKEND},
                          timeout=600)


def stored_copy(source: Path, target: Path) -> Path:
    """The files a stored run is made of, copied to `target`."""
    target.mkdir(parents=True)
    for name in STORED:
        shutil.copy(source / name, target / name)
    return target


def edit_json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def edit_recipe(run_dir: Path, edit) -> None:
    path = run_dir / "recipe.yaml"
    recipe = yaml.safe_load(path.read_text())
    edit(recipe)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


def rewrite_metrics(run_dir: Path, edit) -> None:
    path = run_dir / "metrics.jsonl"
    rows = [edit(json.loads(line)) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def golden():
    """The golden run re-run in this process on this backend."""
    return gemma_tune.repro(GOLDEN, backend=BACKEND)


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory):
    """A tiny run made here on this backend: accumulation, LoRA dropout (the backend's RNG), an eval split."""
    run_dir = tmp_path_factory.mktemp("fresh") / "run"
    gemma_tune.run({
        "name": "fresh", "seed": 5, "output_dir": str(run_dir),
        "model": {"preset": "gemma3_tiny", "weights": None, "tokenizer": "data/tiny/tokenizer.model",
                  "dtype": "float32",
                  "architecture": {"num_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4,
                                   "num_kv_heads": 2, "head_dim": 8, "query_pre_attn_scalar": 8}},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train": {"path": "data/tiny/chat.jsonl", "format": "chat"},
                 "eval": {"path": "data/tiny/chat_eval.jsonl", "format": "chat"}, "max_length": 64},
        "train": {"max_steps": 4, "batch_size": 4, "grad_accum": 2, "learning_rate": 5e-3, "schedule": "cosine",
                  "warmup_steps": 1, "log_every": 1, "eval_every": 2, "save_every": 1000},
        "export": {"formats": []},
    }, backend=BACKEND)
    return run_dir


def test_golden_run_reproduces_on_this_backend(golden):
    """The project's cross-backend first-loss test: the golden run was made on JAX; initial weights, LoRA A and
    the data order are drawn on the host with NumPy, so every backend's first loss is the recorded one within
    1e-5. The whole run reproduces: on JAX/CPU with the recorded versions and CPU bit-identically, elsewhere
    within the default 1e-3."""
    assert golden.rerun and golden.passed, golden.failures
    first = golden.rows[0]
    assert (first.step, first.metric) == (1, "loss")
    assert abs(first.now - first.recorded) <= 1e-5
    assert {row.metric for row in golden.rows} >= {"loss", "accuracy", "learning_rate", "tokens", "eval_loss",
                                                   "eval_accuracy", "eval_perplexity"}
    assert not {row.metric for row in golden.rows} & {"tokens_per_s", "elapsed_s", "mfu", "peak_memory_gib"}
    assert {row.step for row in golden.rows} == set(range(1, 13))
    same_numerics = not [d for d in golden.differences if d.key in ("backend", "cpu", "devices")
                         or d.key.startswith("packages.")]
    assert golden.rtol == (0.0 if same_numerics else DEFAULT_RTOL), golden.why_rtol
    if BACKEND != "jax":
        assert "backend: recorded jax, now " + BACKEND in golden.why_rtol


def test_a_perturbed_record_fails_at_its_step_and_paths_are_relocated(tmp_path):
    """A copy whose recorded loss at step 3 is 5% off, its paths recorded on another machine: exit 1, step 3
    named as the first divergence; the data and tokenizer found among the bundled files, the same files."""
    copy = stored_copy(GOLDEN, tmp_path / "copy")
    rewrite_metrics(copy, lambda row: {**row, "loss": row["loss"] * 1.05} if row["step"] == 3 else row)
    elsewhere = "/machine/that/made/it/gemma_tune/bundled/"
    edit_recipe(copy, lambda recipe: (recipe["data"]["train"].update(path=elsewhere + "data/tiny/chat.jsonl"),
                                      recipe["model"].update(tokenizer=elsewhere + "data/tiny/tokenizer.model")))
    done = repro_cli(copy, "--steps", "4", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "first divergence: step 3 loss" in done.stdout
    assert "NOT reproduced: 1 of" in done.stdout and "at 4 steps" in done.stdout
    assert f"relocated data.train.path: {elsewhere}data/tiny/chat.jsonl" in done.stderr
    assert "relocated model.tokenizer" in done.stderr
    assert "environment differs: data.train" not in done.stderr and "tokenizer: recorded" not in done.stderr


def test_a_fresh_run_reproduces_bit_identically_through_the_cli(fresh_run, tmp_path):
    """Same backend, CPU and versions: rtol 0. Three of its four steps (a stop inside the schedule, with
    accumulation), the re-run kept in --out; the stored run untouched."""
    before = {name: (fresh_run / name).read_bytes() for name in STORED}
    done = repro_cli(fresh_run, "--steps", "3", "--out", str(tmp_path / "again"), "--all", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tolerance: rtol 0 (bit-identical)" in done.stdout
    assert "reproduced:" in done.stdout and "at 3 steps within rtol 0" in done.stdout
    assert "eval_loss" in done.stdout  # the eval at step 2, compared
    kept = [json.loads(line) for line in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["split"]) for row in kept] == [(1, "train"), (2, "train"), (2, "eval"), (3, "train")]
    assert {name: (fresh_run / name).read_bytes() for name in STORED} == before


def test_strict_stops_on_a_different_package_version_before_any_compute(fresh_run, tmp_path, capsys):
    copy = stored_copy(fresh_run, tmp_path / "copy")
    edit_json(copy / "manifest.json", lambda m: {**m, "packages": {**m["packages"], "numpy": "1.0.0"}})
    out = tmp_path / "never"
    assert cli.main(["repro", str(copy), "--strict", "--backend", BACKEND, "--out", str(out)]) == 1
    printed = capsys.readouterr()
    assert "packages.numpy: recorded 1.0.0, now " in printed.err
    assert "the environment differs" in printed.out and "nothing was re-run" in printed.out
    assert not out.exists()  # no training: it would have made its run directory


@pytest.mark.parametrize("case", ["not a run dir", "data found nowhere", "steps beyond the record"])
def test_bad_input_is_exit_2_with_one_message(case, tmp_path, capsys):
    args = []
    if case == "not a run dir":
        run_dir, expected = tmp_path, "not a run directory"
    elif case == "data found nowhere":
        run_dir = stored_copy(GOLDEN, tmp_path / "copy")
        missing = "/gone/for/good/unfindable_3f9e.jsonl"
        edit_recipe(run_dir, lambda recipe: recipe["data"]["train"].update(path=missing))
        expected = f"data.train.path = {missing} does not exist here"
    else:
        run_dir, args, expected = GOLDEN, ["--steps", "13"], "the run recorded metrics at steps 1 to 12"
    assert cli.main(["repro", str(run_dir), "--backend", BACKEND, *args]) == 2
    printed = capsys.readouterr()
    assert expected in printed.err and "Traceback" not in printed.err
