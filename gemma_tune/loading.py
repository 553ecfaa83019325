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
    recipe builds — base weights, quantisation and LoRA adapters as trained, unmerged, and the layers its
    method adds (a reward run gives a `gemma_tune.models.RewardModel`: the decoder and its score head) —
    or, without a checkpoint, its exports in the order of `RUN_EXPORTS`.
`preset` names a configs/models preset, `architecture` is the one a recipe states (`recipe_architecture`):
either must compute the same decoder as the checkpoint (a CheckpointError says which fields differ, which
preset matches the checkpoint, if any, and what to change) and is then the one used, which lets a preset
supply fields a checkpoint does not record (max_position_embeddings). A stated vision tower must be the
checkpoint's too (every `VisionArchitecture` field); a stated architecture without one over a PaliGemma /
Gemma 3 vision checkpoint loads its text decoder alone (the vision tensors left aside).

`source_architecture(source)` reads the architecture of a local source from its config files alone (no
weights, no downloads), as recipe validation needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from gemma_tune.errors import CheckpointError
from gemma_tune.models.config import Architecture
from gemma_tune.rundir import is_run_dir

RUN_EXPORTS = ("exports/safetensors", "exports/keras")
NOT_A_CHECKPOINT = ("not a checkpoint: expected config.json + *.safetensors (Hugging Face), adapter_config.json "
                    "(PEFT), config.json naming a keras-hub class (keras-hub preset or keras export), or a "
                    "gemma_tune run directory")
DECODER_FIELDS = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim")
PER_LAYER = ("sliding layers", "rope (theta, scaling) per layer")  # left out of a message when num_layers differ


VISION_KEY = "vision"


def _meaning(arch) -> dict:
    """What a model computes, independent of how its architecture spells it: the decoder's fields, then
    `vision` (whether it has a vision tower) and each `vision.<field>` of one."""
    layers = range(arch.num_layers)
    sliding = [arch.is_sliding(i) for i in layers]
    vision = {} if arch.vision is None else {f"{VISION_KEY}.{k}": v for k, v in arch.vision.model_dump().items()}
    return {**{f: getattr(arch, f) for f in DECODER_FIELDS}, "query_scale": arch.query_scale,
            "rms_norm_eps": arch.rms_norm_eps, "sliding layers": sliding,
            "sliding_window": arch.sliding_window if any(sliding) else None,
            "rope (theta, scaling) per layer": [arch.rope_for_layer(i) for i in layers],
            "attn_logit_softcap": arch.attn_logit_softcap, "final_logit_softcap": arch.final_logit_softcap,
            "use_post_attention_norm": arch.use_post_attention_norm, "use_post_ffw_norm": arch.use_post_ffw_norm,
            "use_qk_norm": arch.use_qk_norm, VISION_KEY: arch.vision is not None, **vision}


def enclosing_run_dir(path: str | Path) -> Path | None:
    """The gemma_tune run directory that `path` (resolved) is or lies inside, if any."""
    path = Path(path).expanduser().resolve()
    return next((p for p in (path, *path.parents) if is_run_dir(p)), None)


def matching_presets(arch: Architecture) -> list[str]:
    """The presets of configs/models that compute the same model as `arch`: the same decoder and the same vision
    tower (PaliGemma and Gemma 3 4B+ presets match vision checkpoints), or none for both."""
    from gemma_tune.config.presets import preset_architecture, preset_names

    meaning = _meaning(arch)
    return [name for name in preset_names() if _meaning(preset_architecture(name)) == meaning]


def _differences(checkpoint: dict, stated: dict) -> list[str]:
    """The keys of `_meaning` that differ. A stated model without a vision tower loads a vision checkpoint's
    text decoder (its vision keys are not compared); one with a tower over a checkpoint without is one
    difference, `vision`."""
    tower = [k for k in checkpoint if k.startswith(VISION_KEY + ".")]
    keys = [k for k in checkpoint if k != VISION_KEY and k not in tower and checkpoint[k] != stated[k]]
    if not stated[VISION_KEY]:
        return keys
    if not checkpoint[VISION_KEY]:
        return keys + [VISION_KEY]
    return keys + [k for k in tower if checkpoint[k] != stated[k]]


def architecture_mismatch(checkpoint: Architecture, stated: Architecture, stated_as: str, *,
                          recipe: bool) -> str | None:
    """None when `stated` computes the same decoder as `checkpoint` (and, if it states one, the same vision
    tower), else what differs, which preset matches the checkpoint and how to fix it: as recipe keys
    (`recipe`) or as a preset to name."""
    mine, theirs = _meaning(checkpoint), _meaning(stated)
    label = "recipe" if recipe else "preset"
    keys = _differences(mine, theirs)
    if "num_layers" in keys:
        keys = [k for k in keys if k not in PER_LAYER]
    if not keys:
        return None
    differ = [f"{k}: checkpoint {mine[k]!r} vs {label} {theirs[k]!r}" if k != VISION_KEY else
              f"vision tower: the checkpoint has {'one' if mine[k] else 'none'}, the {label} "
              f"{'states one' if theirs[k] else 'none'}" for k in keys]
    matches = matching_presets(checkpoint)
    found = f"it matches preset {' or '.join(matches)}" if matches else "no configs/models preset matches it"
    if recipe:
        use = (f"set `model.preset: {matches[0]}` without model.architecture (override `model.preset={matches[0]} "
               "model.architecture=null`), or " if matches else "")
        fix = (f"{use}take the architecture from the checkpoint with `model.preset=null model.architecture=null`; "
               "a configs/models/*.yaml file in the recipe's `base:` sets both keys (overriding model.weights alone "
               "keeps its preset): remove it from `base:` or override both keys")
    else:
        fix = (f"use preset {matches[0]}, or " if matches else "") + ("give no preset to use the checkpoint's own "
                                                                      "architecture")
    return f"the checkpoint does not match {stated_as} ({'; '.join(differ)}); {found}. To fix: {fix}"


class _Stated(NamedTuple):
    """An architecture the caller states, which the checkpoint must compute (see the module docstring)."""

    architecture: Architecture
    name: str
    recipe: bool


def _stated(preset: str | None, architecture: Architecture | None) -> _Stated | None:
    if preset is not None and architecture is not None:
        raise ValueError("give a preset or an architecture, not both")
    if architecture is not None:
        return _Stated(architecture, "the recipe's model.preset / model.architecture", True)
    if preset is None:
        return None
    from gemma_tune.config.presets import preset_architecture

    return _Stated(preset_architecture(preset), f"preset {preset!r}", False)


def _check(arch, stated: _Stated | None, where: str):
    """The architecture to build: the checkpoint's, or the stated one when they compute the same."""
    if stated is None:
        return arch
    problem = architecture_mismatch(arch, stated.architecture, stated.name, recipe=stated.recipe)
    if problem:
        raise CheckpointError(problem, where=where)
    return stated.architecture


def _load_dir(path: Path, stated: _Stated | None, dtype: str, where: str):
    from gemma_tune.checkpoints.hf import is_hf_checkpoint, load_hf_checkpoint
    from gemma_tune.checkpoints.hf_config import read_hf_architecture
    from gemma_tune.checkpoints.keras_hub import (is_keras_hub_preset, load_keras_hub_preset,
                                                  read_keras_hub_architecture)
    from gemma_tune.checkpoints.peft import adapter_base, is_peft_adapter, load_peft_adapter
    from gemma_tune.checkpoints.sources import resolve_source

    if is_peft_adapter(path):
        base = adapter_base(path)
        # (a reward model's adapter gives a RewardModel around the base)
        return load_peft_adapter(_load(resolve_source(base), base, stated, dtype), path)
    if is_hf_checkpoint(path):
        arch = _check(read_hf_architecture(path), stated, where)
        return load_hf_checkpoint(path, dtype=dtype, architecture=arch)
    if is_keras_hub_preset(path):  # also a keras export: model.keras beside the preset files
        arch = _check(read_keras_hub_architecture(path), stated, where)
        model, _ = load_keras_hub_preset(path, dtype, text_only=arch.vision is None)
        return model
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):  # a directory holding one checkpoint
        if is_keras_hub_preset(sub) or is_hf_checkpoint(sub):
            return _load_dir(sub, stated, dtype, where)
    if is_run_dir(path):
        from gemma_tune.train.checkpoint import latest

        found = latest(path)
        if found is not None:
            return _load_run_checkpoint(path, found, stated, dtype)
        for export in RUN_EXPORTS:
            if (path / export).is_dir():
                return _load_dir(path / export, stated, dtype, where)
        raise CheckpointError(f"this run directory has no export yet (looked for {', '.join(RUN_EXPORTS)}); "
                              "export it or let the run finish", where=where)
    raise CheckpointError(NOT_A_CHECKPOINT, where=where)


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


def source_architecture(source) -> Architecture | None:
    """The architecture the weights at `source` hold, read from config files alone (nothing downloaded, no
    weights read), dispatched as `load_model` does: an HF config.json, a keras-hub config.json, a PEFT
    adapter's base, a run directory's recipe (or its `model.weights`). None for `hf://` / `kaggle://`
    sources (and adapters whose base is one): their architecture is known once they are downloaded.
    CheckpointError for a local directory that holds no readable checkpoint."""
    from gemma_tune.checkpoints.hf import is_hf_checkpoint
    from gemma_tune.checkpoints.hf_config import read_hf_architecture
    from gemma_tune.checkpoints.keras_hub import is_keras_hub_preset, read_keras_hub_architecture
    from gemma_tune.checkpoints.peft import adapter_base, is_peft_adapter
    from gemma_tune.checkpoints.sources import resolve_source
    from gemma_tune.config.paths import is_remote

    if is_remote(str(source)):
        return None
    path = resolve_source(source)
    if is_peft_adapter(path):
        return source_architecture(adapter_base(path))
    if is_hf_checkpoint(path):
        return read_hf_architecture(path)
    if is_keras_hub_preset(path):
        return read_keras_hub_architecture(path)
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        if is_keras_hub_preset(sub) or is_hf_checkpoint(sub):
            return source_architecture(sub)
    if is_run_dir(path):
        from gemma_tune.config import recipe_architecture

        recipe = run_recipe(path)
        stated = recipe_architecture(recipe)
        return source_architecture(recipe.model.weights) if stated is None else stated
    raise CheckpointError(NOT_A_CHECKPOINT, where=str(source))


def _load_run_checkpoint(run_dir: Path, checkpoint_dir: Path, stated: _Stated | None, dtype: str):
    """The model a run trained, as of `checkpoint_dir`: built as its recipe says, variables restored."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from gemma_tune.config import recipe_architecture
    from gemma_tune.methods import build_method
    from gemma_tune.models import build_model, trained_model
    from gemma_tune.checkpoints.variables import keyed_variables, restore_variables
    from gemma_tune.models.adapters import add_recipe_adapters

    recipe = run_recipe(run_dir)
    where = str(checkpoint_dir / "model.safetensors")
    if recipe.model.weights is not None:  # the base's architecture (and file layout) come from its weights
        model = load_model(recipe.model.weights, dtype=dtype, architecture=recipe_architecture(recipe))
    else:
        model = build_model(recipe_architecture(recipe), dtype=dtype, random_init=False)
    _check(model.architecture, stated, str(run_dir))
    add_recipe_adapters(model, recipe)
    model.checkpoint_source = recipe.model.weights or ""  # a random-init base has no source
    try:
        tensors = load_file(where)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"not a readable checkpoint ({e})", where=where) from e
    heads = build_method(recipe).layers(model)  # what the method adds (a reward model's score head)
    variables = list(model.variables) + [v for layer in heads.values() for v in layer.variables]
    restore_variables(keyed_variables(variables), tensors, where,  # the trainer's own keys (model_variables)
                      "does the run's recipe still build the model it trained?")
    return trained_model(model, heads)


def load_model(source, preset: str | None = None, dtype: str = "float32", *,
               architecture: Architecture | None = None):
    """A `GemmaCausalLM` from `source` (see the module docstring). `dtype` is the Keras dtype policy
    ("float32", "bfloat16", "mixed_bfloat16"). `preset` (a configs/models name) or `architecture` (what a
    recipe states, `recipe_architecture(recipe)`) is what the checkpoint must compute.

    The model records `checkpoint_source`: the base weights a PEFT export of it applies to (the source
    itself; for a PEFT adapter its base; for a run directory its recipe's `model.weights`, "" when that
    was a random init)."""
    from gemma_tune.checkpoints.sources import resolve_source

    return _load(resolve_source(source), source, _stated(preset, architecture), dtype)


def _load(path: Path, source, stated: _Stated | None, dtype: str):
    model = _load_dir(path, stated, dtype, where=str(source))
    if not hasattr(model, "checkpoint_source"):
        model.checkpoint_source = str(source)
    return model


def load_model_and_tokenizer(source, preset: str | None = None, dtype: str = "float32", tokenizer=None, *,
                             architecture: Architecture | None = None):
    """(model, tokenizer): `load_model`'s model; the tokenizer from `tokenizer` when given, else found next
    to the weights (for a run directory: its recipe's tokenizer)."""
    from gemma_tune.checkpoints.sources import resolve_source
    from gemma_tune.tokenizer import load_tokenizer

    path = resolve_source(source)
    model = _load(path, source, _stated(preset, architecture), dtype)
    if tokenizer is None and is_run_dir(path):
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
