"""The native Keras export: `model.keras`, `tokenizer.model` and a keras-hub preset, in one directory.

    out_dir/model.keras          our GemmaCausalLM as a Keras archive:
                                 keras.saving.load_model(path, safe_mode=True) once the model classes are
                                 registered (`from gemma_tune.models import GemmaCausalLM`)
    out_dir/tokenizer.model      the SentencePiece file
    out_dir/config.json, model.weights.h5, task.json, preprocessor.json, tokenizer.json, metadata.json,
    out_dir/assets/tokenizer/vocabulary.spm
                                 a keras-hub CausalLM preset (`checkpoints.keras_hub.write_keras_hub_preset`):
                                 keras_hub.models.GemmaCausalLM / Gemma3CausalLM.from_preset(out_dir), for
                                 a vision model PaliGemmaCausalLM / Gemma3CausalLM with its vision encoder

The archived model is rebuilt from the architecture, so no optimizer or compile state travels with it, and
holds the exported weights: a quantised base dequantised, every LoRA adapter folded into its kernel in
float32, W + (α/r)·A·B, then cast to `dtype`. Unmerged adapters cannot be kept: Keras' Dense saving
writes W + (α/r)·A·B and zeroes A and B on load, and `GemmaCausalLM.from_config` does not re-enable LoRA,
so `merge_lora=False` on a model with LoRA is refused (the PEFT export keeps adapters separate).

Quantised (`quantize="int8" | "int4"`, `export --format keras --quantize …`): the archived model's projections
(q/k/v/o, gate/up/down) are quantised with Keras' own quantisation (`Dense.quantize`: int8 per output channel
with int8 activations at run time; int4 in Keras' default groups of 128 inputs), from the merged float
weights. The tied embedding — also the output head — and the norms stay in the export dtype (Keras'
`Model.quantize` would quantise the embedding too, which the tied head reads as a float matrix). The model's
dtype is a `keras.dtype_policies.DTypePolicyMap` naming each quantised layer's policy, so its config rebuilds
the quantised layers: `keras.saving.load_model(out_dir / "model.keras", safe_mode=True)` (and
`load_keras_archive`) give the quantised `GemmaCausalLM`. keras-hub's preset loader cannot map quantised
variables onto ours, so a quantised export holds `model.keras` and `tokenizer.model` only.

Without a tokenizer (`tokenizer=None`) the export holds `model.keras` alone: the keras-hub preset carries a
preprocessor built from the tokenizer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gc
import logging
from contextlib import contextmanager

from gemma_tune.checkpoints.keras_hub import has_lora, tensors, write_keras_hub_preset
from gemma_tune.errors import CheckpointError, UserError

MODEL_FILE = "model.keras"
TOKENIZER_FILE = "tokenizer.model"
QUANT_MODES = ("int8", "int4")
log = logging.getLogger("gemma_tune")


def exported_model(model, dtype: str | None = None):
    """A fresh `GemmaCausalLM` computing `model` with plain float weights: dequantised, LoRA merged
    (`float_weight`). `dtype`: a Keras dtype policy name; None keeps the model's policy."""
    import keras

    from gemma_tune.models import build_model, float_weight, get_variable

    clone = build_model(model.architecture, dtype=dtype or model.dtype_policy.name,
                        attention_implementation=model.attention_implementation, random_init=False)
    for path, _, _ in tensors(model.architecture):
        target = get_variable(clone, path)
        target.assign(keras.ops.cast(float_weight(model, path), target.dtype))
    return clone


@contextmanager
def _one_garbage_collection():
    """Keras' Layer.__delattr__ runs a full `gc.collect()` for every variable it drops, as `Dense.quantize` drops
    each float kernel: on a large heap that is seconds per projection. Within the block collections are skipped;
    one runs at its end."""
    collect = gc.collect
    gc.collect = lambda *args, **kwargs: 0
    try:
        yield
    finally:
        gc.collect = collect
        gc.collect()


def quantized_model(model, mode: str, dtype: str | None = None):
    """A fresh `GemmaCausalLM` computing `model` (plain float weights in `dtype`: see `exported_model`) with its
    projections quantised to `mode` by Keras, whose config rebuilds the quantised layers (module docstring)."""
    from keras.dtype_policies import DTypePolicyMap

    from gemma_tune.models import projections
    from gemma_tune.models.decoder import GemmaCausalLM

    if mode not in QUANT_MODES:
        raise UserError(f"unknown keras quantisation {mode!r}; expected one of {', '.join(QUANT_MODES)}",
                        where="quantize")
    source = exported_model(model, dtype=dtype)
    with _one_garbage_collection():
        for _, layer in projections(source):
            layer.quantize(mode, type_check=False)
    policies = DTypePolicyMap(default_policy=source.dtype_policy)
    for _, layer in projections(source):
        policies[layer.path] = layer.dtype_policy
    quantized = GemmaCausalLM(source.architecture, attention_implementation=source.attention_implementation,
                              dtype=policies, name=source.name)
    for _, layer in projections(quantized):
        # Keras 3.15's Dense.save_own_variables asks `self.dtype_policy` (the map, not the layer's entry) for
        # the quantisation mode: give each quantised layer its own policy; the model keeps the map.
        layer._dtype_policy = policies[layer.path]
    values = {v.path: v for v in source.variables}
    for variable in quantized.variables:
        variable.assign(values[variable.path])
    return quantized


def load_keras_archive(path, dtype: str | None = None):
    """The `GemmaCausalLM` in a keras export's `model.keras` (`path`: the archive or its directory), quantised
    projections as exported, through Keras' safe-mode loader. `dtype` must be None or the archive's own
    variable dtype (a CheckpointError otherwise: an archive is loaded as it was saved)."""
    import keras

    from gemma_tune.models.decoder import GemmaCausalLM  # registers the classes

    path = Path(path)
    archive = path / MODEL_FILE if path.is_dir() else path
    try:
        model = keras.saving.load_model(str(archive), safe_mode=True)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"not a readable Keras archive ({e})", where=str(archive)) from e
    if not isinstance(model, GemmaCausalLM):
        raise CheckpointError(f"the archive holds a {type(model).__name__}, not a gemma_tune GemmaCausalLM",
                              where=str(archive))
    stored = str(model.token_embedding.embeddings.dtype)
    if dtype is not None and keras.DTypePolicy(dtype).variable_dtype != stored:
        raise CheckpointError(f"the archive's weights are {stored}; it loads as saved (asked for {dtype})",
                              where=str(archive))
    return model


def archive_architecture(path):
    """The `Architecture` a keras export's `model.keras` holds, read from the archive's config.json alone."""
    import json
    import zipfile

    from pydantic import ValidationError

    from gemma_tune.models.config import Architecture

    path = Path(path)
    archive = path / MODEL_FILE if path.is_dir() else path
    try:
        with zipfile.ZipFile(archive) as z:
            config = json.loads(z.read("config.json"))
        return Architecture.model_validate(config["config"]["architecture"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, ValidationError) as e:
        raise CheckpointError(f"not a gemma_tune Keras archive ({e})", where=str(archive)) from e


def write_keras_export(model, tokenizer, out_dir, *, merge_lora: bool = True, dtype: str | None = None,
                       quantize: str | None = None) -> Path:
    """Write `model.keras`, `tokenizer.model` and the keras-hub preset files into `out_dir` (an existing,
    normally temporary, directory: `gemma_tune.export.export_model` makes the write atomic); with `quantize`,
    the quantised archive and the tokenizer only; with `tokenizer=None`, the archive alone."""
    import keras

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UserError("the export directory does not exist", where=str(out_dir))
    if not merge_lora and has_lora(model):
        raise CheckpointError("the keras format cannot keep LoRA adapters unmerged (Keras saving folds them "
                              "into the kernels); export with merge_lora=True, or use the peft format for "
                              "separate adapters", where=str(out_dir))
    if quantize is not None:
        clone = quantized_model(model, quantize, dtype=dtype)
    else:
        clone = exported_model(model, dtype=dtype)
    keras.saving.save_model(clone, str(out_dir / MODEL_FILE))
    del clone
    if tokenizer is not None:
        shutil.copyfile(tokenizer.model_path, out_dir / TOKENIZER_FILE)
    if quantize is not None:
        log.info("keras %s export: model.keras and the tokenizer only (keras-hub's preset loader reads float "
                 "weights)", quantize)
    elif tokenizer is not None:
        write_keras_hub_preset(model, tokenizer, out_dir, merge_lora=True, dtype=dtype)
    return out_dir
