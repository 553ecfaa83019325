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
"""

from __future__ import annotations

import shutil
from pathlib import Path

from gemma_tune.checkpoints.keras_hub import has_lora, tensors, write_keras_hub_preset
from gemma_tune.errors import CheckpointError, UserError

MODEL_FILE = "model.keras"
TOKENIZER_FILE = "tokenizer.model"


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


def write_keras_export(model, tokenizer, out_dir, *, merge_lora: bool = True, dtype: str | None = None) -> Path:
    """Write `model.keras`, `tokenizer.model` and the keras-hub preset files into `out_dir` (an existing,
    normally temporary, directory: `gemma_tune.export.export_model` makes the write atomic)."""
    import keras

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UserError("the export directory does not exist", where=str(out_dir))
    if not merge_lora and has_lora(model):
        raise CheckpointError("the keras format cannot keep LoRA adapters unmerged (Keras saving folds them "
                              "into the kernels); export with merge_lora=True, or use the peft format for "
                              "separate adapters", where=str(out_dir))
    clone = exported_model(model, dtype=dtype)
    keras.saving.save_model(clone, str(out_dir / MODEL_FILE))
    del clone
    shutil.copyfile(tokenizer.model_path, out_dir / TOKENIZER_FILE)
    write_keras_hub_preset(model, tokenizer, out_dir, merge_lora=True, dtype=dtype)
    return out_dir
