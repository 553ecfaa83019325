"""`load_model(source)`: one entry point for every kind of weights gemma_tune reads.

`source` is resolved to a local directory (`hf://`, `kaggle://` are downloaded), then dispatched on what
the directory holds:
  * a Hugging Face checkpoint — config.json with a `model_type`, read if it is a Gemma one
    (`gemma_tune.checkpoints.hf`);
  * a PEFT adapter — adapter_config.json: its base model (`base_model_name_or_path`) is loaded the same
    way, then the adapter applied (`gemma_tune.checkpoints.peft`);
  * a keras-hub preset — config.json naming a keras-hub class (`gemma_tune.checkpoints.keras_hub`);
  * a gemma_tune export of either format (the same layouts, also one level down in a keras export);
  * a gemma_tune run directory (recipe.yaml + manifest.json): its latest training checkpoint
    (`checkpoints/step_N/model.safetensors`, keyed by Keras variable path) restored onto the model its
    recipe builds — base weights, quantisation and LoRA adapters as trained, unmerged — or, without a
    checkpoint, its exports in the order of `RUN_EXPORTS`.
`preset` names a configs/models preset: its architecture must agree with the checkpoint's (a
CheckpointError says which fields differ) and is the one used, which lets a preset supply fields a
checkpoint does not record.
"""

from __future__ import annotations

from pathlib import Path

from gemma_tune.errors import CheckpointError

RUN_EXPORTS = ("exports/safetensors", "exports/keras")
DECODER_FIELDS = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim")


def _is_run_dir(path: Path) -> bool:
    return (path / "recipe.yaml").is_file() and (path / "manifest.json").is_file()


def _meaning(arch) -> dict:
    """What a decoder computes, independent of how its architecture spells it."""
    layers = range(arch.num_layers)
    sliding = [arch.is_sliding(i) for i in layers]
    return {**{f: getattr(arch, f) for f in DECODER_FIELDS}, "query_scale": arch.query_scale,
            "rms_norm_eps": arch.rms_norm_eps, "sliding layers": sliding,
            "sliding_window": arch.sliding_window if any(sliding) else None,
            "rope (theta, scaling) per layer": [arch.rope_for_layer(i) for i in layers],
            "attn_logit_softcap": arch.attn_logit_softcap, "final_logit_softcap": arch.final_logit_softcap,
            "use_post_attention_norm": arch.use_post_attention_norm, "use_post_ffw_norm": arch.use_post_ffw_norm,
            "use_qk_norm": arch.use_qk_norm}


def enclosing_run_dir(path: str | Path) -> Path | None:
    """The gemma_tune run directory that `path` (resolved) is or lies inside, if any."""
    path = Path(path).expanduser().resolve()
    return next((p for p in (path, *path.parents) if _is_run_dir(p)), None)


def _check_preset(arch, preset: str | None, where: str):
    """The architecture to build: the checkpoint's, or the preset's when they compute the same."""
    if preset is None:
        return arch
    from gemma_tune.config.presets import preset_architecture

    expected = preset_architecture(preset)
    mine, theirs = _meaning(arch), _meaning(expected)
    differ = [f"{k}: checkpoint {mine[k]!r} vs preset {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]
    if differ:
        raise CheckpointError(f"the checkpoint does not match preset {preset!r} ({'; '.join(differ)})", where=where)
    return expected


def _load_dir(path: Path, preset: str | None, dtype: str, where: str):
    from gemma_tune.checkpoints.hf import is_hf_checkpoint, load_hf_checkpoint
    from gemma_tune.checkpoints.hf_config import read_hf_architecture
    from gemma_tune.checkpoints.keras_hub import is_keras_hub_preset, load_keras_hub_preset
    from gemma_tune.checkpoints.peft import adapter_base, is_peft_adapter, load_peft_adapter

    if is_peft_adapter(path):
        model = load_model(adapter_base(path), preset=preset, dtype=dtype)
        load_peft_adapter(model, path)
        return model
    if is_hf_checkpoint(path):
        arch = _check_preset(read_hf_architecture(path), preset, where)
        return load_hf_checkpoint(path, dtype=dtype, architecture=arch)
    if is_keras_hub_preset(path):  # also a keras export: model.keras beside the preset files
        model, _ = load_keras_hub_preset(path, dtype)
        _check_preset(model.architecture, preset, where)
        return model
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):  # a directory holding one checkpoint
        if is_keras_hub_preset(sub) or is_hf_checkpoint(sub):
            return _load_dir(sub, preset, dtype, where)
    if _is_run_dir(path):
        from gemma_tune.train.checkpoint import latest

        found = latest(path)
        if found is not None:
            return _load_run_checkpoint(path, found, preset, dtype)
        for export in RUN_EXPORTS:
            if (path / export).is_dir():
                return _load_dir(path / export, preset, dtype, where)
        raise CheckpointError(f"this run directory has no export yet (looked for {', '.join(RUN_EXPORTS)}); "
                              "export it or let the run finish", where=where)
    raise CheckpointError("not a checkpoint: expected config.json + *.safetensors (Hugging Face), "
                          "adapter_config.json (PEFT), config.json naming a keras-hub class (keras-hub preset or "
                          "keras export), or a gemma_tune run directory", where=where)


def run_recipe(run_dir: Path):
    """The resolved recipe of a run directory (schema-checked only: its data files may be gone)."""
    import yaml
    from pydantic import ValidationError

    from gemma_tune.config.schema import Recipe

    path = run_dir / "recipe.yaml"
    try:
        return Recipe.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError, ValidationError) as e:
        raise CheckpointError(f"not a readable resolved recipe ({e})", where=str(path)) from e


def _load_run_checkpoint(run_dir: Path, checkpoint_dir: Path, preset: str | None, dtype: str):
    """The model a run trained, as of `checkpoint_dir`: built as its recipe says, variables restored."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from gemma_tune.config import recipe_architecture
    from gemma_tune.models import build_model
    from gemma_tune.train.build import add_recipe_adapters
    from gemma_tune.train.checkpoint import keyed_variables, restore_variables

    recipe = run_recipe(run_dir)
    where = str(checkpoint_dir / "model.safetensors")
    if recipe.model.weights is not None:  # the base's architecture (and file layout) come from its weights
        model = load_model(recipe.model.weights, preset=recipe.model.preset, dtype=dtype)
    else:
        model = build_model(recipe_architecture(recipe), dtype=dtype)
    _check_preset(model.architecture, preset, str(run_dir))
    add_recipe_adapters(model, recipe)
    model.checkpoint_source = recipe.model.weights or ""  # a random-init base has no source
    try:
        tensors = load_file(where)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"not a readable checkpoint ({e})", where=where) from e
    restore_variables(keyed_variables(model.variables), tensors, where,  # the trainer's own keys
                      "does the run's recipe still build the model it trained?")
    return model


def load_model(source, preset: str | None = None, dtype: str = "float32"):
    """A `GemmaCausalLM` from `source` (see the module docstring). `dtype` is the Keras dtype policy
    ("float32", "bfloat16", "mixed_bfloat16").

    The model records `checkpoint_source`: the base weights a PEFT export of it applies to (the source
    itself; for a PEFT adapter its base; for a run directory its recipe's `model.weights`)."""
    from gemma_tune.checkpoints.sources import resolve_source

    return _load(resolve_source(source), source, preset, dtype)


def _load(path: Path, source, preset: str | None, dtype: str):
    model = _load_dir(path, preset, dtype, where=str(source))
    if not hasattr(model, "checkpoint_source"):
        model.checkpoint_source = str(source)
    return model


def load_model_and_tokenizer(source, preset: str | None = None, dtype: str = "float32", tokenizer=None):
    """(model, tokenizer): the tokenizer from `tokenizer` when given, else found next to the weights
    (for a run directory: its recipe's tokenizer)."""
    from gemma_tune.checkpoints.sources import resolve_source
    from gemma_tune.tokenizer import load_tokenizer

    path = resolve_source(source)
    model = _load(path, source, preset, dtype)
    if tokenizer is None and _is_run_dir(path):
        recipe = run_recipe(path)
        tokenizer = recipe.model.tokenizer or recipe.model.weights
    return model, load_tokenizer(tokenizer or _tokenizer_dir(path))


def _tokenizer_dir(path: Path) -> Path:
    """The directory beside the weights that holds the tokenizer (the export or adapter base for run dirs
    and adapters without their own copy)."""
    from gemma_tune.tokenizer import HF_FILE, KERAS_HUB_FILE

    if (path / HF_FILE).is_file() or (path / KERAS_HUB_FILE).is_file():
        return path
    candidates = [path / e for e in RUN_EXPORTS] + sorted(p for p in path.iterdir() if p.is_dir())
    for candidate in candidates:
        if (candidate / HF_FILE).is_file() or (candidate / KERAS_HUB_FILE).is_file():
            return candidate
    from gemma_tune.checkpoints.peft import adapter_base, is_peft_adapter
    from gemma_tune.checkpoints.sources import resolve_source

    if is_peft_adapter(path):
        return _tokenizer_dir(resolve_source(adapter_base(path)))
    return path
