"""Training checkpoints: `run_dir/checkpoints/step_N/`, written atomically, verified before use, the last
`KEEP` kept.

A checkpoint directory holds
  model.safetensors       every variable of the GemmaCausalLM and of its method's layers (a reward head) by its
                          Keras path (`keyed_variables`): base weights, LoRA adapters, quantised kernels and
                          scales, and the dropout seed generators' states (Keras' `save_weights` would merge LoRA into the kernels: see
                          docs/CONTRACTS.md), bfloat16 variables stored as float32
  optimizer.safetensors   every optimiser variable (iterations, moments, gradient accumulators), the same way
  state.json              step, the data position (the next micro-batch index of
                          `Split.batches(batch_size, seed)`), run totals, and the global RNG states
                          of NumPy, Python and torch (on torch, Keras' unseeded dropout draws from
                          torch's global generator), the last as base64 bytes
  method.safetensors      only when the method keeps state of its own with the checkpoint (`Method.state`: online
                          RL's rollouts of a round still being optimised)
  checkpoint.json         written last: the size and SHA-256 of each file above (`verify` checks them)
No pickle anywhere. A checkpoint is written into a temporary `checkpoints/.step_N.tmp-<pid>-…`, flushed
to disk, and renamed to `step_N` only when complete; a failed write (a full disk) removes its temporary.
`latest(run_dir)` is the newest checkpoint that verifies: a torn or truncated newer one is skipped with
a warning naming what is wrong. Non-finite weights are never saved (`save` raises `NonFiniteWeights`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import keras
import numpy as np
from keras import ops

from gemma_tune.checkpoints.variables import keyed_variables, restore_variables
from gemma_tune.export.atomic import share_permissions
from gemma_tune.tempfiles import temp_path

KEEP = 2
STEP_DIR = re.compile(r"^step_(\d+)$")
FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
METHOD_FILE = "method.safetensors"
MANIFEST = "checkpoint.json"
log = logging.getLogger("gemma_tune")


class NonFiniteWeights(Exception):
    """Trained variables hold NaN or infinity: such weights are not saved. `names` lists them."""

    def __init__(self, names: list[str], total: int):
        self.names, self.total = names, total
        super().__init__(f"{len(names)} of {total} trained tensors are not finite (e.g. {names[0]})")


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies (newer ones that do not are skipped, each with a warning)."""
    for path in reversed(checkpoints(run_dir)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def verify(path: Path) -> str | None:
    """None when checkpoint `path` is whole (every file has the size and SHA-256 its checkpoint.json
    records), else what is wrong."""
    path = Path(path)
    try:
        recorded = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is missing or unreadable (an incomplete write?)"
    for name in FILES + tuple(n for n in recorded if n not in FILES):
        entry, file = recorded.get(name), path / name
        if entry is None or not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, {entry['bytes']} were written (truncated?)"
        if _sha256(file) != entry["sha256"]:
            return f"{name} does not have the content that was written (SHA-256 differs)"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def nonfinite(variables) -> list[str]:
    """Paths of the floating-point variables holding a NaN or an infinity."""
    bad = []
    for v in variables:
        if "float" in str(v.dtype) and not bool(ops.convert_to_numpy(ops.all(ops.isfinite(v.value)))):
            bad.append(v.path)
    return bad


def _numpy(variable) -> np.ndarray:
    """The whole variable (on a multi-host job gathered from every host: every process calls this)."""
    from gemma_tune.distribute.hosts import to_numpy

    value = to_numpy(variable.value)
    if value.dtype.name == "bfloat16":
        value = value.astype(np.float32)
    return np.array(value, order="C")  # (np.ascontiguousarray would make scalars 1-D)


def save(run_dir: Path, step: int, trainer, state: dict, method_state: dict | None = None) -> Path:
    """Write checkpoint `step` of `trainer` (a `MethodTrainer`: its `model_variables` and its optimiser's)
    atomically and prune to the last `KEEP`; `state` goes to state.json with the global RNG states,
    `method_state` (arrays by name; None or {} = none) to method.safetensors.
    Raises NonFiniteWeights, writing nothing, when a trained variable is not finite. On a multi-host job
    every process gathers the arrays and only the writer (`gemma_tune.distribute.hosts.is_writer`) writes."""
    from safetensors.numpy import save_file

    from gemma_tune.distribute.hosts import is_writer

    bad = nonfinite(trainer.trainable_variables)
    if bad:
        raise NonFiniteWeights(bad, len(trainer.trainable_variables))
    writer = is_writer()
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step}"
    tmp = temp_path(final)
    try:
        if writer:
            root.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        for name, variables in ((FILES[0], trainer.model_variables), (FILES[1], trainer.optimizer.variables)):
            arrays = {key: _numpy(v) for key, v in keyed_variables(variables).items()}  # on every process
            if writer:
                save_file(arrays, str(tmp / name))
        if not writer:
            return final
        full_state = dict(state, step=step, rng=global_rng_state())
        (tmp / FILES[2]).write_text(json.dumps(full_state, indent=1), encoding="utf-8")
        names = FILES
        if method_state:
            save_file({k: np.ascontiguousarray(v) for k, v in method_state.items()}, str(tmp / METHOD_FILE))
            names = FILES + (METHOD_FILE,)
        files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in names}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1), encoding="utf-8")
        share_permissions(tmp)  # safetensors writes 0600
        for name in names + (MANIFEST,):
            _fsync(tmp / name)
        if final.exists():  # a stale checkpoint of the same step (e.g. from before a resume): replace it
            stale = temp_path(final, kind="old")
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale)
        else:
            os.replace(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoints(run_dir)[:-KEEP]:
        shutil.rmtree(old)
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_aside_invalid(run_dir: Path, valid: Path | None) -> list[Path]:
    """Rename the checkpoints newer than `valid` (all, when None) to `checkpoints/invalid-step_N`, so that
    a resumed run neither trusts nor prunes by them; returns the new paths."""
    newer = checkpoints(run_dir)
    if valid is not None:
        newer = newer[newer.index(valid) + 1:]
    moved = []
    for path in newer:
        target = path.with_name(f"invalid-{path.name}")
        if target.exists():
            shutil.rmtree(target)
        os.replace(path, target)
        moved.append(target)
    return moved


def load(path: Path, trainer) -> dict:
    """Restore `trainer`'s model and optimiser variables from checkpoint `path` (one that `verify`d) and
    return its state.json. Its `rng` entry is for `set_global_rng_state`, to apply just before the
    first step (Keras' own set-up of `fit` draws from the global generators). A checkpoint that does
    not fit the run is a CheckpointError."""
    from safetensors.numpy import load_file

    path = Path(path)
    restore_variables(keyed_variables(trainer.model_variables), load_file(str(path / FILES[0])), str(path / FILES[0]),
                      "another model, lora or quantize setting?")
    restore_variables(keyed_variables(trainer.optimizer.variables), load_file(str(path / FILES[1])),
                      str(path / FILES[1]), "another optimizer, or other trainable weights?")
    return read_state(path)


def method_state(path: Path) -> dict[str, np.ndarray]:
    """The method's arrays kept with checkpoint `path` ({} when it kept none)."""
    from safetensors.numpy import load_file

    file = Path(path) / METHOD_FILE
    return load_file(str(file)) if file.is_file() else {}


def read_state(path: Path) -> dict:
    """state.json of checkpoint `path`."""
    return json.loads((Path(path) / FILES[2]).read_text(encoding="utf-8"))


def global_rng_state() -> dict:
    """NumPy's, Python's and (on torch) torch's global random generator states, as JSON values."""
    kind, keys, *rest = np.random.get_state()
    state = {"numpy": [kind, keys.tolist(), *rest], "python": _jsonable(random.getstate())}
    if keras.backend.backend() == "torch":
        import torch

        state["torch"] = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
        if torch.cuda.is_available():
            state["torch_cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_global_rng_state(state: dict) -> None:
    if "numpy" in state:
        kind, keys, *rest = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    if "python" in state:
        random.setstate(_tuples(state["python"]))
    if "torch" in state and keras.backend.backend() == "torch":
        import torch

        def tensor(text):
            return torch.from_numpy(np.frombuffer(base64.b64decode(text), np.uint8).copy())

        torch.set_rng_state(tensor(state["torch"]))
        if "torch_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([tensor(t) for t in state["torch_cuda"]])


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
