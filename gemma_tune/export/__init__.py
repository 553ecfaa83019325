"""Export a model in one format, atomically (docs/CONTRACTS.md, "Export").

Formats:
  * "keras" — the native `.keras` archive and a keras-hub preset (`gemma_tune.export.keras`);
  * "safetensors" — a Hugging Face checkpoint transformers loads (`gemma_tune.checkpoints.hf`);
  * "peft" — the LoRA adapters as a PEFT adapter for the base model (`gemma_tune.checkpoints.peft`);
  * "gguf" — `model.gguf` for llama.cpp / Ollama (`gemma_tune.export.gguf`) and an Ollama `Modelfile` beside
    it (`gemma_tune.export.modelfile`).
`quantize` (`QUANTIZE`): gguf f32 | f16 | bf16 | q8_0 | q4_0 (None: f32, or bf16 for `dtype="bfloat16"` or a
bfloat16 model); keras int8 | int4 (Keras' quantisation of the projections, `gemma_tune.export.keras`);
safetensors int8 | int4 (transformers' built-in Gemma quantisation layout, `gemma_tune.export.safetensors`);
peft none.
Without a tokenizer (`tokenizer=None`: a checkpoint directory holding weights alone) keras, safetensors and
peft write the weights and a warning says what is missing; gguf, whose file holds the tokenizer, is a
UserError that says how to give one.
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

from gemma_tune.errors import CheckpointError, UserError
from gemma_tune.export.atomic import atomic_dir, check_destination, check_writable

FORMATS = ("keras", "safetensors", "peft", "gguf")
EXPORT_DTYPES = ("float32", "bfloat16")
QUANTIZE = {"gguf": ("f32", "f16", "bf16", "q8_0", "q4_0"), "keras": ("int8", "int4"),
            "safetensors": ("int8", "int4"), "peft": ()}
NO_TOKENIZER = ("no tokenizer was found beside the weights, so the {fmt} export holds the weights without one "
                "({missing}); give one with --tokenizer PATH (export_model(..., tokenizer)) to include it")
MISSING = {"keras": "model.keras alone, no tokenizer.model and no keras-hub preset",
           "safetensors": "no tokenizer files; config.json has Gemma's ids bos 2, eos 1, pad 0",
           "peft": "no tokenizer files"}
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


def check_quantize(fmt: str, quantize: str | None, where: str = "quantize") -> None:
    """UserError when `quantize` is not one of `fmt`'s types (`QUANTIZE`)."""
    if quantize is None:
        return
    allowed = QUANTIZE.get(fmt, ())
    if quantize not in allowed:
        expected = f"one of {', '.join(allowed)}" if allowed else "none (the format has no quantised form)"
        hint = " (K-quants: llama.cpp's llama-quantize on an f16 GGUF export)" if fmt == "gguf" else ""
        raise UserError(f"{quantize!r} is not a {fmt} quantisation; expected {expected}{hint}", where=where)


def gguf_type(quantize: str | None, dtype: str | None, model) -> str:
    """The GGUF type of an export: `quantize`, else what `dtype` (else the model's weights) is."""
    if quantize is not None:
        return quantize
    from gemma_tune.checkpoints.hf import model_dtype

    return "bf16" if (dtype or model_dtype(model)) == "bfloat16" else "f32"


def recipe_export_options(recipe, fmt: str) -> dict:
    """The `export_model` keywords a recipe gives the export of `fmt` (one of its `export.formats`): its
    `export.quantize` where the format has quantised forms (not peft), and its sampling settings for gguf's
    Modelfile."""
    from gemma_tune.export.modelfile import sampling_defaults

    quantize = recipe.export.quantize if QUANTIZE.get(fmt) else None
    return {"quantize": quantize, "sampling": sampling_defaults(recipe) if fmt == "gguf" else None}


def find_tokenizer(source, tokenizer=None):
    """The tokenizer of an export's source: `tokenizer` (a path) when given, else the one beside the weights
    (a run directory's recipe tokenizer), else None when there is none — a corrupt one is an error."""
    from gemma_tune.checkpoints.sources import resolve_source
    from gemma_tune.loading import _tokenizer_dir, run_recipe
    from gemma_tune.rundir import is_run_dir
    from gemma_tune.tokenizer import GemmaTokenizer, find_tokenizer_file, load_tokenizer

    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    path = resolve_source(source)
    candidates = []
    if is_run_dir(path):
        recipe = run_recipe(path)
        candidates += [c for c in (recipe.model.tokenizer, recipe.model.weights) if c]
    candidates.append(_tokenizer_dir(path))
    for candidate in candidates:
        try:
            found = find_tokenizer_file(candidate)
        except CheckpointError:
            continue
        return GemmaTokenizer(found)
    return None


def export_model(model, tokenizer, out_dir: str | Path, fmt: str, *, merge_lora: bool = True,
                 dtype: str | None = None, force: bool = False, max_shard_size: int | None = None,
                 base_model: str | None = None, source_dir: str | Path | None = None, quantize: str | None = None,
                 sampling: dict | None = None) -> Path:
    """Write `model` (a GemmaCausalLM or a RewardModel; and `tokenizer`'s files) as `fmt` into `out_dir`;
    returns `out_dir`. `tokenizer` may be None (module docstring).

    `merge_lora`: fold LoRA adapters into the exported weights (exact, in float32) or export the base
    alone (keras/safetensors; "peft" always writes the adapters only). `dtype`: "float32" or
    "bfloat16", None keeps the model's. `max_shard_size`: bytes per safetensors shard (default 5 GB).
    `base_model` ("peft"): the base's hub id, `hf://` name or local path for `base_model_name_or_path`
    (default: the model's `checkpoint_source`; a warning says what to do when neither is known).
    `source_dir`: the directory the model was loaded from, which `out_dir` must not replace or nest with
    (`check_output`). `quantize`: the format's quantised type (module docstring). `sampling` ("gguf"): the
    Modelfile's temperature / top_k / top_p (default: Gemma's, `modelfile.GEMMA_SAMPLING`).
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}", where="format")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise UserError(f"unknown export dtype {dtype!r}; expected one of {', '.join(EXPORT_DTYPES)}", where="dtype")
    check_quantize(fmt, quantize)
    if fmt == "gguf":
        from gemma_tune.export.gguf import check_gguf_expressible, NO_TOKENIZER as GGUF_NO_TOKENIZER

        if tokenizer is None:
            raise UserError(GGUF_NO_TOKENIZER, where="format gguf")
        check_gguf_expressible(model)
    if fmt == "keras":
        from gemma_tune.models import reward_parts

        if reward_parts(model)[1] is not None:
            raise UserError("a reward model exports as safetensors (transformers' *ForSequenceClassification) or "
                            "peft (adapters and score head); the keras format holds a causal LM", where="format keras")
    out_dir = Path(out_dir)
    check_output(out_dir, force=force, source_dir=source_dir)
    if tokenizer is None and fmt in MISSING:
        log.warning(NO_TOKENIZER.format(fmt=fmt, missing=MISSING[fmt]))
    with atomic_dir(out_dir, force=force) as tmp:
        if fmt == "gguf":
            from gemma_tune.export.gguf import GGUF_FILE, write_gguf
            from gemma_tune.export.modelfile import write_modelfile

            write_gguf(model, tokenizer, tmp / GGUF_FILE, quantize=gguf_type(quantize, dtype, model),
                       merge_lora=merge_lora)
            write_modelfile(tmp, GGUF_FILE, sampling)
        elif fmt == "safetensors":
            _write_safetensors(model, tokenizer, tmp, merge_lora=merge_lora, dtype=dtype, quantize=quantize,
                               max_shard_size=max_shard_size)
        elif fmt == "peft":
            from gemma_tune.checkpoints.hf_tokenizer import write_hf_tokenizer_files
            from gemma_tune.checkpoints.peft import save_peft_adapter

            base = base_model_name(base_model or getattr(model, "checkpoint_source", None))
            save_peft_adapter(model, tmp, base_model_name_or_path=base, dtype=dtype)
            if tokenizer is not None and model.architecture.vision is None:
                write_hf_tokenizer_files(tokenizer, tmp)
            elif tokenizer is not None:  # with the image tokens
                write_hf_tokenizer_files(tokenizer, tmp, model.architecture)
            if base is None:
                log.warning(UNKNOWN_BASE)
        else:
            from gemma_tune.console import without_native_start_up_lines
            from gemma_tune.export.keras import write_keras_export

            with without_native_start_up_lines():  # Keras' saving and keras-hub import TensorFlow
                write_keras_export(model, tokenizer, tmp, merge_lora=merge_lora, dtype=dtype, quantize=quantize)
    return out_dir


def _write_safetensors(model, tokenizer, out_dir: Path, *, merge_lora: bool, dtype: str | None, quantize: str | None,
                       max_shard_size: int | None) -> None:
    from gemma_tune.checkpoints.hf import DEFAULT_MAX_SHARD_SIZE, save_hf_checkpoint
    from gemma_tune.export.safetensors import INT_TYPES, write_hf_weights, write_quantized_hf_checkpoint

    if quantize is not None:
        write_quantized_hf_checkpoint(model, tokenizer, out_dir, bits=INT_TYPES[quantize], merge_lora=merge_lora,
                                      dtype=dtype)
    elif tokenizer is None:
        write_hf_weights(model, out_dir, merge_lora=merge_lora, dtype=dtype,
                         max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE)
    else:
        save_hf_checkpoint(model, tokenizer, out_dir, merge_lora=merge_lora, dtype=dtype,
                           max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE)
