"""Run directories never lose work: a refused or failed run changes nothing, a fresh start moves the old
run aside, damaged checkpoints and metrics are detected and passed over, dead processes' temporaries go,
one run at a time holds a directory, and environment faults are clear errors (exit 2)."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gemma_tune
from gemma_tune.cli import main
from gemma_tune.errors import ConfigError, DataError, UserError
from gemma_tune.loading import load_model
from gemma_tune.runlock import RunDirBusy, RunLock

TINY = {"num_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "num_kv_heads": 1,
        "head_dim": 16, "query_pre_attn_scalar": 16}


def recipe(run_dir, data="data/tiny/chat.jsonl", **train):
    return {
        "name": "safety", "seed": 1, "output_dir": str(run_dir),
        "model": {"preset": "gemma3_tiny", "architecture": TINY, "tokenizer": "data/tiny/tokenizer.model",
                  "dtype": "float32"},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"train": {"path": str(data), "format": "chat"}, "max_length": 64},
        "train": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "log_every": 1, "save_every": 1,
                  **train},
        "export": {"formats": ["safetensors"]},
    }


def contents(run_dir: Path) -> dict:
    """Every file of a run directory (but its lock) -> its bytes."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    gemma_tune.run(recipe(run_dir))
    return run_dir


@pytest.fixture
def run_dir(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def test_a_refused_or_failed_run_changes_nothing(run_dir, tmp_path):
    before = contents(run_dir)
    with pytest.raises(ConfigError, match="lora.rank: 4 -> 8"):  # another run: refused, with the remedy
        gemma_tune.run({**recipe(run_dir), "lora": {"rank": 8, "alpha": 8}})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"oops": 1}\n')
    with pytest.raises(DataError):  # --no-resume checks the data before touching the old run
        gemma_tune.run(recipe(run_dir, data=bad), resume=False)
    offline = recipe(run_dir)
    offline["model"] = {**offline["model"], "weights": "hf://google/gemma-3-1b-it", "preset": None,
                        "architecture": None}
    with pytest.raises(UserError):  # a download that fails (offline here) happens before the commit
        gemma_tune.run(offline, resume=False)
    assert contents(run_dir) == before
    load_model(run_dir)  # the run still loads as it trained


def test_no_resume_moves_the_previous_run_aside(run_dir, caplog):
    before = contents(run_dir)
    result = gemma_tune.run(recipe(run_dir, max_steps=1), resume=False)
    aside = run_dir.with_name("run.previous-1")
    assert contents(aside) == before and f"moved to {aside}" in caplog.text
    assert result.history["step"] == [1]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_1"]


def test_the_run_length_may_change_but_not_below_the_step_reached(run_dir):
    with pytest.raises(ConfigError, match="already at step 2, past the 1 steps"):
        gemma_tune.run(recipe(run_dir, max_steps=1))
    assert gemma_tune.run(recipe(run_dir, max_steps=3)).history["step"] == [1, 2, 3]


def test_optimisation_settings_change_only_with_resume(run_dir, caplog):
    changed = recipe(run_dir, max_steps=3, learning_rate=1e-4)
    with pytest.raises(ConfigError, match=r"train.learning_rate: 0.001 -> 0.0001\); to continue it with these "
                                          r"settings, pass --resume"):
        gemma_tune.run(changed)
    assert gemma_tune.run(changed, resume=True).history["step"] == [1, 2, 3]
    assert "continuing" in caplog.text and "train.learning_rate" in caplog.text


@pytest.mark.parametrize("damaged", ["model.safetensors", "state.json"])
def test_a_truncated_checkpoint_is_passed_over_for_the_previous_one(run_dir, damaged, caplog):
    target = run_dir / "checkpoints" / "step_2" / damaged
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with open(run_dir / "metrics.jsonl", "a") as f:  # and a torn last line of the metrics
        f.write('{"step": 3, "split": "tr')
    assert load_model(run_dir) is not None  # loading skips it too
    result = gemma_tune.run(recipe(run_dir, max_steps=3))
    assert result.history["step"] == [1, 2, 3]
    assert f"skipping checkpoint {run_dir / 'checkpoints' / 'step_2'}" in caplog.text and "truncated" in caplog.text
    assert (run_dir / "checkpoints" / "invalid-step_2").is_dir()
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_temporaries_of_dead_processes_are_removed_and_live_ones_kept(run_dir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [run_dir / "checkpoints" / f".step_3.tmp-{dead.pid}-0a1b", run_dir / "exports" / f".keras.tmp-{dead.pid}-2c",
             run_dir / f".metrics.jsonl.tmp-{dead.pid}-3d"]
    live = run_dir / "checkpoints" / f".step_9.tmp-{os.getpid()}-4e"
    for path in stale[:2] + [live]:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
    stale[2].write_text("partial")
    gemma_tune.run(recipe(run_dir, max_steps=3))
    assert not any(p.exists() for p in stale) and live.is_dir()


def test_one_run_at_a_time_holds_a_run_directory(run_dir):
    holder = RunLock(run_dir)
    holder.acquire()
    try:
        with pytest.raises(RunDirBusy, match=f"another run is using this run directory \\(pid {os.getpid()} on"):
            gemma_tune.run(recipe(run_dir, max_steps=3))
    finally:
        holder.release()
    assert gemma_tune.run(recipe(run_dir, max_steps=3)).history["step"] == [1, 2, 3]


def _recipe_file(tmp_path, run_dir, **train) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe(run_dir, **train)))
    return str(path)


def test_an_output_dir_that_cannot_be_a_run_directory_is_a_clear_error(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for output_dir in (a_file, a_file / "run", Path("/sys/gemma_tune_run")):
        assert main(["run", _recipe_file(tmp_path, output_dir)]) == 2
        err = capsys.readouterr().err
        assert f"gemma-tune: error: {output_dir}" in err and "(set by output_dir)" in err, err
        assert "Traceback" not in err


def test_a_read_only_location_is_a_clear_error(tmp_path, capsys, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert main(["run", _recipe_file(tmp_path, tmp_path / "run")]) == 2
    assert "Read-only file system: choose a location on a writable file system" in capsys.readouterr().err


def test_a_full_disk_is_a_clear_error_and_leaves_no_temporary(run_dir, tmp_path, capsys, monkeypatch):
    import safetensors.numpy

    def full(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    assert main(["run", _recipe_file(tmp_path, run_dir, max_steps=3)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device: free some space" in err and "Traceback" not in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_1", "step_2"]


def test_the_summary_counts_the_rows_skipped(tmp_path):
    data = tmp_path / "chat.jsonl"
    good = Path("data/tiny/chat.jsonl").read_text().splitlines()[:6]
    data.write_text("\n".join(good[:3] + ['{"messages": "not a list"}'] + good[3:]) + "\n")
    spec = recipe(tmp_path / "run", data=data, max_steps=1)
    spec["data"]["skip_invalid"] = True
    summary = json.loads((gemma_tune.run(spec).run_dir / "summary.json").read_text())
    assert summary["data"]["train"]["invalid"] == 1 and summary["data"]["train"]["rows"] == 6
