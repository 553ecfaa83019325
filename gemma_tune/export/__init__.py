"""Export a model in one format, atomically (docs/CONTRACTS.md, "Export").

Formats:
  * "keras" — the native `.keras` archive and a keras-hub preset (`gemma_tune.export.keras`);
  * "safetensors" — a Hugging Face checkpoint transformers loads (`gemma_tune.checkpoints.hf`);
  * "peft" — the LoRA adapters as a PEFT adapter for the base model (`gemma_tune.checkpoints.peft`).
The directory is written under a temporary name beside `out_dir` and renamed at the end
(`gemma_tune.export.atomic`): an interrupted export leaves nothing that looks complete.
"""

from __future__ import annotations

from pathlib import Path

from gemma_tune.errors import UserError
from gemma_tune.export.atomic import atomic_dir, check_writable

FORMATS = ("keras", "safetensors", "peft")
EXPORT_DTYPES = ("float32", "bfloat16")


def base_model_name(model) -> str | None:
    """What the model was loaded from (`load_model` records it), as PEFT's `base_model_name_or_path`:
    `ORG/NAME` for `hf://ORG/NAME`, else the source as given (an absolute local path)."""
    source = getattr(model, "checkpoint_source", None)
    if not source:
        return None
    source = str(source)
    if source.startswith("hf://"):
        return source[len("hf://"):].partition("@")[0]
    if source.startswith("kaggle://"):
        return source
    return str(Path(source).absolute())


def export_model(model, tokenizer, out_dir: str | Path, fmt: str, *, merge_lora: bool = True,
                 dtype: str | None = None, force: bool = False, max_shard_size: int | None = None) -> Path:
    """Write `model` (and `tokenizer`'s files) as `fmt` into `out_dir`; returns `out_dir`.

    `merge_lora`: fold LoRA adapters into the exported weights (exact, in float32) or export the base
    alone (keras/safetensors; "peft" always writes the adapters only). `dtype`: "float32" or
    "bfloat16", None keeps the model's. `max_shard_size`: bytes per safetensors shard (default 5 GB).
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}", where="format")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise UserError(f"unknown export dtype {dtype!r}; expected one of {', '.join(EXPORT_DTYPES)}", where="dtype")
    out_dir = Path(out_dir)
    check_writable(out_dir, force)
    with atomic_dir(out_dir, force=force) as tmp:
        if fmt == "safetensors":
            from gemma_tune.checkpoints.hf import DEFAULT_MAX_SHARD_SIZE, save_hf_checkpoint

            save_hf_checkpoint(model, tokenizer, tmp, merge_lora=merge_lora, dtype=dtype,
                               max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE)
        elif fmt == "peft":
            from gemma_tune.checkpoints.hf_tokenizer import write_hf_tokenizer_files
            from gemma_tune.checkpoints.peft import save_peft_adapter

            save_peft_adapter(model, tmp, base_model_name_or_path=base_model_name(model), dtype=dtype)
            write_hf_tokenizer_files(tokenizer, tmp)
        else:
            from gemma_tune.export.keras import write_keras_export

            write_keras_export(model, tokenizer, tmp, merge_lora=merge_lora, dtype=dtype)
    return out_dir
