"""Export a model in one format, atomically (docs/CONTRACTS.md, "Export").

Formats:
  * "keras" — the native `.keras` archive and a keras-hub preset (`gemma_tune.export.keras`);
  * "safetensors" — a Hugging Face checkpoint transformers loads (`gemma_tune.checkpoints.hf`);
  * "peft" — the LoRA adapters as a PEFT adapter for the base model (`gemma_tune.checkpoints.peft`).
A vision model (PaliGemma, Gemma 3 4B+) exports as safetensors — its `*ForConditionalGeneration` in the hub's
layout with the processor files — or as peft (the decoder's adapters, named as PEFT names them on that class).
A reward model (`gemma_tune.models.RewardModel`) exports as safetensors — transformers'
`*ForSequenceClassification` with one label — or as peft (SEQ_CLS, its score head saved whole); the keras
format holds a causal LM and refuses it.
The directory is written under a temporary name beside `out_dir` and renamed at the end
(`gemma_tune.export.atomic`): an interrupted export leaves nothing that looks complete, and the
temporaries of exports killed mid-way are deleted by the next export into the same parent directory.
Exported files get ordinary permissions (0o666 & ~umask, directories 0o777 & ~umask).
"""

from __future__ import annotations

import logging
from pathlib import Path

from gemma_tune.errors import UserError
from gemma_tune.export.atomic import atomic_dir, check_destination, check_writable

FORMATS = ("keras", "safetensors", "peft")
EXPORT_DTYPES = ("float32", "bfloat16")
log = logging.getLogger("gemma_tune")
UNKNOWN_BASE = ("the PEFT adapter's base model is unknown (the model was not loaded from a checkpoint: its base is "
                "randomly initialised), so adapter_config.json has base_model_name_or_path: null and PEFT cannot "
                "find the base. Export the base with `gemma-tune export SOURCE --format safetensors --no-merge-lora "
                "--out BASE_DIR` and pass `--base-model BASE_DIR` (export_model(..., base_model=BASE_DIR)) when "
                "exporting the adapter")


def check_output(out_dir: str | Path, *, force: bool = False, source_dir: str | Path | None = None) -> None:
    """UserError when `out_dir` cannot receive an export: a file, a non-empty directory without `force`
    (`atomic.check_writable`), or — given `source_dir`, the directory the model is loaded from — a place that
    would replace or nest with the source or its run directory (`atomic.check_destination`). The CLI calls
    it before loading the model; `export_model` calls it again."""
    check_writable(Path(out_dir), force)
    if source_dir is not None:
        check_destination(out_dir, source_dir)


def base_model_name(source: str | Path | None) -> str | None:
    """A base model's source as PEFT's `base_model_name_or_path`: `ORG/NAME` for `hf://ORG/NAME[@REV]`,
    an existing local path made absolute, anything else (a hub id, `kaggle://…`) as given; None when
    unknown (None or empty)."""
    if not source:
        return None
    source = str(source)
    if source.startswith("hf://"):
        return source[len("hf://"):].partition("@")[0]
    local = Path(source).expanduser()
    return str(local.resolve()) if local.exists() else source


def export_model(model, tokenizer, out_dir: str | Path, fmt: str, *, merge_lora: bool = True,
                 dtype: str | None = None, force: bool = False, max_shard_size: int | None = None,
                 base_model: str | None = None, source_dir: str | Path | None = None) -> Path:
    """Write `model` (a GemmaCausalLM or a RewardModel; and `tokenizer`'s files) as `fmt` into `out_dir`;
    returns `out_dir`.

    `merge_lora`: fold LoRA adapters into the exported weights (exact, in float32) or export the base
    alone (keras/safetensors; "peft" always writes the adapters only). `dtype`: "float32" or
    "bfloat16", None keeps the model's. `max_shard_size`: bytes per safetensors shard (default 5 GB).
    `base_model` ("peft"): the base's hub id, `hf://` name or local path for `base_model_name_or_path`
    (default: the model's `checkpoint_source`; a warning says what to do when neither is known).
    `source_dir`: the directory the model was loaded from, which `out_dir` must not replace or nest with
    (`check_output`).
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}", where="format")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise UserError(f"unknown export dtype {dtype!r}; expected one of {', '.join(EXPORT_DTYPES)}", where="dtype")
    if fmt == "keras":
        from gemma_tune.models import reward_parts

        if reward_parts(model)[1] is not None:
            raise UserError("a reward model exports as safetensors (transformers' *ForSequenceClassification) or "
                            "peft (adapters and score head); the keras format holds a causal LM", where="format keras")
    out_dir = Path(out_dir)
    check_output(out_dir, force=force, source_dir=source_dir)
    with atomic_dir(out_dir, force=force) as tmp:
        if fmt == "safetensors":
            from gemma_tune.checkpoints.hf import DEFAULT_MAX_SHARD_SIZE, save_hf_checkpoint

            save_hf_checkpoint(model, tokenizer, tmp, merge_lora=merge_lora, dtype=dtype,
                               max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE)
        elif fmt == "peft":
            from gemma_tune.checkpoints.hf_tokenizer import write_hf_tokenizer_files
            from gemma_tune.checkpoints.peft import save_peft_adapter

            base = base_model_name(base_model or getattr(model, "checkpoint_source", None))
            save_peft_adapter(model, tmp, base_model_name_or_path=base, dtype=dtype)
            if model.architecture.vision is None:
                write_hf_tokenizer_files(tokenizer, tmp)
            else:  # with the image tokens
                write_hf_tokenizer_files(tokenizer, tmp, model.architecture)
            if base is None:
                log.warning(UNKNOWN_BASE)
        else:
            from gemma_tune.console import without_native_start_up_lines
            from gemma_tune.export.keras import write_keras_export

            with without_native_start_up_lines():  # Keras' saving and keras-hub import TensorFlow
                write_keras_export(model, tokenizer, tmp, merge_lora=merge_lora, dtype=dtype)
    return out_dir
