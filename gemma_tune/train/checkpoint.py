"""Training checkpoints: `run_dir/checkpoints/step_N/`, written atomically, the last `KEEP` kept.

A checkpoint directory holds
  model.safetensors       every variable of the GemmaCausalLM by its Keras path (`keyed_variables`): base weights, LoRA
                          adapters, quantised kernels and scales, and the dropout seed generators'
                          states (Keras' `save_weights` would merge LoRA into the kernels: see
                          docs/CONTRACTS.md), bfloat16 variables stored as float32
  optimizer.safetensors   every optimiser variable (iterations, moments, gradient accumulators), the same way
  state.json              step, the data position (the next micro-batch index of
                          `Split.batches(batch_size, seed)`), run totals, and the global RNG states
                          of NumPy, Python and torch (on torch, Keras' unseeded dropout draws from
                          torch's global generator), the last as base64 bytes
No pickle anywhere. A checkpoint is written into `checkpoints/.tmp-step_N-<pid>` and renamed to
`step_N` only when complete, so a `step_N` directory is always whole.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from pathlib import Path

import keras
import numpy as np
from keras import ops

from gemma_tune.errors import CheckpointError

KEEP = 2
STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def _numpy(variable) -> np.ndarray:
    value = ops.convert_to_numpy(variable.value)
    if value.dtype.name == "bfloat16":
        value = value.astype(np.float32)
    return np.array(value, order="C")  # (np.ascontiguousarray would make scalars 1-D)


def keyed_variables(variables) -> dict:
    """Variables by Keras path; a path that several variables share (every LoRA dropout seed generator's
    state is `lora_dropout_seed/seed_generator_state`) gets `#1`, `#2`, … in order after the first."""
    keyed, seen = {}, {}
    for v in variables:
        n = seen[v.path] = seen.get(v.path, -1) + 1
        keyed[f"{v.path}#{n}" if n else v.path] = v
    return keyed


def save(run_dir: Path, step: int, lm, optimizer, state: dict) -> Path:
    """Write checkpoint `step` atomically and prune to the last `KEEP`; `state` goes to state.json
    with the global RNG states."""
    from safetensors.numpy import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp-step_{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({key: _numpy(v) for key, v in keyed_variables(lm.variables).items()}, str(tmp / "model.safetensors"))
    save_file({key: _numpy(v) for key, v in keyed_variables(optimizer.variables).items()},
              str(tmp / "optimizer.safetensors"))
    full_state = dict(state, step=step, rng=global_rng_state())
    (tmp / "state.json").write_text(json.dumps(full_state, indent=1), encoding="utf-8")
    if final.exists():  # a stale checkpoint of the same step (e.g. from before a resume): replace it
        stale = root / f".stale-step_{step}-{os.getpid()}"
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale)
    else:
        os.replace(tmp, final)
    for old in checkpoints(run_dir)[:-KEEP]:
        shutil.rmtree(old)
    return final


def restore_variables(variables: dict, tensors: dict, where: str, hint: str) -> None:
    """Assign `tensors` to `variables` (both keyed as `keyed_variables` keys them); a missing or
    unexpected tensor or a wrong shape is a CheckpointError naming `where`, with `hint`."""
    missing = sorted(set(variables) - set(tensors))
    extra = sorted(set(tensors) - set(variables))
    if missing or extra:
        raise CheckpointError(f"the checkpoint does not fit this run ({hint}): "
                              + "; ".join(f"{label} {names[:3]}{' …' if len(names) > 3 else ''}"
                                          for label, names in (("missing", missing), ("unexpected", extra))
                                          if names), where=where)
    for path, variable in variables.items():
        value = tensors[path]
        if tuple(value.shape) != tuple(variable.shape):
            raise CheckpointError(f"the checkpoint does not fit this run ({hint}): {path} has shape "
                                  f"{tuple(value.shape)} there, {tuple(variable.shape)} here", where=where)
        variable.assign(value)  # Keras casts to the variable's dtype (float32 -> bfloat16)


def load(path: Path, lm, optimizer) -> dict:
    """Restore the model's and optimiser's variables from checkpoint `path` and return its state.json.
    Its `rng` entry is for `set_global_rng_state`, to apply just before the first step (Keras' own
    set-up of `fit` draws from the global generators). A checkpoint that does not fit the run is a
    CheckpointError."""
    from safetensors.numpy import load_file

    path = Path(path)
    for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"incomplete checkpoint: {name} is missing", where=str(path))
    restore_variables(keyed_variables(lm.variables), load_file(str(path / "model.safetensors")),
             str(path / "model.safetensors"), "another model, lora or quantize setting?")
    restore_variables(keyed_variables(optimizer.variables), load_file(str(path / "optimizer.safetensors")), str(path / "optimizer.safetensors"),
             "another optimizer, or other trainable weights?")
    return json.loads((path / "state.json").read_text(encoding="utf-8"))


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
