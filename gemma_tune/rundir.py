"""The run directory: the resolved recipe (re-runnable as is), the manifest, and the log file.

manifest.json holds what is needed to reproduce or audit a run: package versions, backend and
devices, seed, git commit (when the working directory is inside a git repository), the command, and
SHA-256 fingerprints of the local data files.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import yaml

from gemma_tune.config.paths import is_remote
from gemma_tune.config.schema import Recipe

PACKAGES = ("gemma_tune", "keras", "keras-hub", "jax", "jaxlib", "tensorflow", "torch", "numpy", "datasets",
            "safetensors", "sentencepiece", "huggingface_hub", "kagglehub", "pydantic")


def resolved_recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def prepare_run_dir(recipe: Recipe, backend: str) -> Path:
    """Create the run directory with recipe.yaml, manifest.json and logs/; set up file logging."""
    run_dir = Path(recipe.output_dir).resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "recipe.yaml", resolved_recipe_yaml(recipe))
    atomic_write_text(run_dir / "manifest.json", json.dumps(manifest(recipe, backend), indent=2) + "\n")
    _log_to(run_dir / "logs" / "run.log")
    return run_dir


def manifest(recipe: Recipe, backend: str) -> dict:
    return {
        "name": recipe.name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "seed": recipe.seed,
        "backend": backend,
        "devices": _devices(backend),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES if _version(name)},
        "git": _git_state(Path.cwd()),
        "data": {split: _fingerprint(source.path) for split in ("train", "eval")
                 if (source := getattr(recipe.data, split)) is not None},
        "weights": recipe.model.weights,
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _devices(backend: str) -> list[str]:
    """Devices the backend sees. Reads only libraries that are already imported or cheap to import."""
    if backend == "jax":
        import jax

        return [str(d) for d in jax.devices()]
    if backend == "torch":
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return gpus or ["cpu"]
    import tensorflow as tf

    return [d.name for d in tf.config.list_logical_devices()]


def _git_state(where: Path) -> dict | None:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return None


def _fingerprint(path: str) -> dict:
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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _log_to(path: Path) -> None:
    logger = logging.getLogger("gemma_tune")
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)
            handler.close()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    if not any(type(h) is logging.StreamHandler for h in logger.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
