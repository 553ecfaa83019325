"""Model variables by their Keras paths: how gemma_tune's own checkpoints (training checkpoints, run
directories) name and restore them — never through Keras' `save_weights`, which would merge LoRA adapters
into the kernels (docs/CONTRACTS.md)."""

from __future__ import annotations

from gemma_tune.errors import CheckpointError


def keyed_variables(variables) -> dict:
    """Variables by Keras path; a path that several variables share (every LoRA dropout seed generator's
    state is `lora_dropout_seed/seed_generator_state`) gets `#1`, `#2`, … in order after the first."""
    keyed, seen = {}, {}
    for v in variables:
        n = seen[v.path] = seen.get(v.path, -1) + 1
        keyed[f"{v.path}#{n}" if n else v.path] = v
    return keyed


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
