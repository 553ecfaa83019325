"""The run directory: one run of one recipe, held by one process at a time.

`RunDirectory.open(output_dir)` creates it if needed, takes its lock (`gemma_tune.runlock`), removes the
temporaries that dead processes left in it (`gemma_tune.tempfiles`), and buffers the log. Nothing in it
changes until the run is known to go ahead: then `commit(recipe, backend, fresh)` moves a previous
run's results aside when starting afresh over them (`NAME.previous-N` beside the directory; nothing is
deleted), writes the resolved recipe (re-runnable as is) and the manifest atomically, and starts
`logs/run.log` with the buffered lines. A run that stops before `commit` leaves the directory as it was
(a directory it created is removed again).

manifest.json holds what is needed to reproduce or audit a run: package versions, backend and
devices (`gemma_tune.environment`), seed, git commit (when the working directory is inside a git repository), the command, and
SHA-256 fingerprints of the local data files and tokenizer.

What a run directory holds (`MANAGED`): recipe.yaml, manifest.json, logs/run.log, metrics.jsonl and
metrics.csv, tensorboard/, samples.jsonl, completions.jsonl (online RL), loss_curve.png, summary.json, checkpoints/step_N/,
exports/<format>/.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import logging.handlers
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from gemma_tune.config.paths import is_remote
from gemma_tune.config.schema import Recipe
from gemma_tune.console import use_console
from gemma_tune.environment import environment
from gemma_tune.errors import environment_error
from gemma_tune.runlock import LOCK_FILE, RunLock
from gemma_tune.tempfiles import atomic_file, remove_stale

MANAGED = ("recipe.yaml", "manifest.json", "logs", "metrics.jsonl", "metrics.csv", "tensorboard", "samples.jsonl",
           "completions.jsonl", "reference",
           "loss_curve.png", "summary.json", "checkpoints", "exports")
RESULTS = ("checkpoints", "exports")  # what a fresh start moves aside rather than overwrites
log = logging.getLogger("gemma_tune")


def resolved_recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def is_run_dir(path: Path) -> bool:
    """A directory a run has committed to (its recipe and manifest are written)."""
    return (Path(path) / "recipe.yaml").is_file() and (Path(path) / "manifest.json").is_file()


class RunDirectory:
    """A run directory held by this process (see the module docstring). Use as a context manager."""

    def __init__(self, path: Path, created: bool, lock: RunLock):
        self.path, self._created, self._lock = path, created, lock
        self.committed = False
        self._buffer = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
        self._buffer.setFormatter(_FILE_FORMAT)
        use_console(log)
        log.addHandler(self._buffer)

    @classmethod
    def open(cls, output_dir: str | Path) -> "RunDirectory":
        path = Path(output_dir).absolute()
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            lock = RunLock(path)
            lock.acquire()
        except OSError as e:
            raise (environment_error(e, "output_dir") or e) from None
        for where in (path, path / "checkpoints", path / "exports", path / "logs"):
            for stale in remove_stale(where):
                log.info("removed %s, left by a process that no longer runs", stale)
        return cls(path, created, lock)

    def __enter__(self) -> "RunDirectory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def previous_recipe(self) -> dict | None:
        """The resolved recipe a previous run committed here, or None (none, or unreadable)."""
        try:
            loaded = yaml.safe_load((self.path / "recipe.yaml").read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return None
        return loaded if isinstance(loaded, dict) else None

    def has_results(self) -> bool:
        """Whether a previous run left checkpoints or exports here."""
        return any(p.is_dir() and any(p.iterdir()) for p in (self.path / name for name in RESULTS))

    def commit(self, recipe: Recipe, backend: str, fresh: bool) -> None:
        """The run goes ahead: set the directory up for it (see the module docstring)."""
        try:
            if fresh:
                self._clear()
            (self.path / "logs").mkdir(exist_ok=True)
            atomic_write_text(self.path / "recipe.yaml", resolved_recipe_yaml(recipe))
            atomic_write_text(self.path / "manifest.json", json.dumps(manifest(recipe, backend), indent=2) + "\n")
            file_log = logging.FileHandler(self.path / "logs" / "run.log", encoding="utf-8")
        except OSError as e:
            raise (environment_error(e, "output_dir") or e) from None
        file_log.setFormatter(_FILE_FORMAT)
        for handler in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
            log.removeHandler(handler)
            handler.close()
        log.addHandler(file_log)
        self._buffer.setTarget(file_log)
        self._buffer.flush()
        log.removeHandler(self._buffer)
        self.committed = True

    def _clear(self) -> None:
        """Make room for a fresh run: a previous run's results move aside, its other files go."""
        if self.has_results():
            aside = self._aside_path()
            aside.mkdir()
            for name in MANAGED:
                if (self.path / name).exists():
                    os.replace(self.path / name, aside / name)
            log.warning("starting afresh: the previous run in %s was moved to %s (nothing was deleted)",
                        self.path, aside)
            return
        for name in MANAGED:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()

    def _aside_path(self) -> Path:
        n = 1
        while (candidate := self.path.with_name(f"{self.path.name}.previous-{n}")).exists():
            n += 1
        return candidate

    def close(self) -> None:
        if self._buffer in log.handlers:
            log.removeHandler(self._buffer)
        self._buffer.close()
        self._lock.release()
        if self._created and not self.committed:  # nothing happened here: leave no empty directory behind
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            try:
                self.path.rmdir()
            except OSError:
                pass


_FILE_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def manifest(recipe: Recipe, backend: str) -> dict:
    return {
        "name": recipe.name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "seed": recipe.seed,
        **environment(backend),
        "git": _git_state(Path.cwd()),
        "data": {split: fingerprint(source.path) for split in ("train", "eval")
                 if (source := getattr(recipe.data, split)) is not None},
        "tokenizer": fingerprint(recipe.model.tokenizer) if recipe.model.tokenizer else None,
        "weights": recipe.model.weights,
    }


def _git_state(where: Path) -> dict | None:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return None


def fingerprint(path: str) -> dict:
    """SHA-256 over a local file, or over a directory's files (names and contents, sorted)."""
    if is_remote(path) or not Path(path).exists():
        return {"source": path}
    target = Path(path)
    files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(target if target.is_dir() else target.parent)).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return {"source": path, "sha256": digest.hexdigest(), "files": len(files),
            "bytes": sum(f.stat().st_size for f in files)}


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it and a rename: never half-written."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
