"""The safetensors export's two variants beside `checkpoints.hf.save_hf_checkpoint`: integer-quantised
weights in the layout transformers loads itself, and weights without a tokenizer.

Quantised (`write_quantized_hf_checkpoint`, `export --format safetensors --quantize int8|int4`):
transformers (5.x) has a built-in quantisation method for pre-quantised Gemma checkpoints,
`quantization_config: {"quant_method": "gemma", "num_bits": 8|4}` (`GemmaQuantizer`,
`transformers.integrations.gemma_quant.QuantizedLinear`): it needs no other package, no custom code and no
GPU. Every projection (q/k/v/o, gate/up/down) is stored as

    …_proj.weight                   int8 [out, in] (num_bits 8), or uint8 [out, ⌈in/2⌉] (num_bits 4: two
                                    values a byte, the first in the low nibble, each stored + 8 in [0, 15])
    …_proj.weight_scale             float32 [out, 1]: weight = integer · scale (symmetric, per output row)
    …_proj.input_activation_scale   float32 scalar 0 (and output_activation_scale): 0 = no activation
                                    rounding (transformers' static range quantisation, uncalibrated)

with scale = max |w| over the row / 127 (int8, integers in [−127, 127]) or / 7 (int4, [−7, 7]). The
embedding (also the tied output head), the norms and a vision tower stay in the export dtype, and
`modules_to_not_convert: ["lm_head"]` keeps the tied head a plain Linear. Activations stay float: this is
weight-only quantisation (transformers dequantises each weight in the forward pass). The weights are those
`save_hf_checkpoint` writes (LoRA merged in float32, a quantised base dequantised), quantised only then.
A reward model (its score head) is refused: transformers' sequence classifiers are not covered by the layout.
gemma_tune's own `load_model` reads float checkpoints; these are for transformers (and what loads through it).

Without a tokenizer (`write_hf_weights`): config.json with Gemma's special ids (bos 2, eos 1, pad 0),
generation_config.json and the weights; no tokenizer files. A vision model needs its tokenizer (the
processor files name the image tokens) and is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from gemma_tune.errors import CheckpointError

INT_TYPES = {"int8": 8, "int4": 4}
GEMMA_IDS = {"bos_id": 2, "eos_id": 1, "pad_id": 0}


def quantize_rows(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(integers, scale [out, 1]) of a float [out, in] matrix: symmetric per row (module docstring);
    int4 values are packed two a byte."""
    top = 127 if bits == 8 else 7
    scale = np.abs(weight).max(axis=1, keepdims=True).astype(np.float32) / np.float32(top)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    integers = np.clip(np.rint(weight / safe), -top, top).astype(np.int8)
    if bits == 4:
        unsigned = (integers.astype(np.int16) + 8).astype(np.uint8)
        if unsigned.shape[1] % 2:
            unsigned = np.pad(unsigned, ((0, 0), (0, 1)), constant_values=8)
        integers = (unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)).astype(np.uint8)
    return integers, scale


def dequantize_rows(integers: np.ndarray, scale: np.ndarray, bits: int, columns: int) -> np.ndarray:
    """The float [out, in] matrix that `quantize_rows` stands for (what transformers computes with)."""
    if bits == 4:
        low = (integers & 0x0F).astype(np.int16) - 8
        high = (integers >> 4).astype(np.int16) - 8
        integers = np.stack([low, high], axis=-1).reshape(integers.shape[0], -1)[:, :columns]
    return integers.astype(np.float32) * scale


def _config(model, dtype: str, tokenizer_ids: dict) -> dict:
    from gemma_tune.checkpoints.hf_config import hf_config
    from gemma_tune.models import reward_parts

    return hf_config(model.architecture, dtype=dtype, sequence_classifier=reward_parts(model)[1] is not None,
                     **tokenizer_ids)


def write_quantized_hf_checkpoint(model, tokenizer, out_dir: str | Path, *, bits: int, merge_lora: bool = True,
                                  dtype: str | None = None) -> Path:
    """Write `model` into the existing directory `out_dir` as an HF checkpoint with `bits`-bit projections
    (module docstring), with `tokenizer`'s files (none when it is None)."""
    from gemma_tune.checkpoints import hf_names
    from gemma_tune.checkpoints.hf import DTYPES, SINGLE_FILE, _Writer, model_dtype
    from gemma_tune.checkpoints.hf_tokenizer import write_json
    from gemma_tune.models import float_weight, reward_parts

    if reward_parts(model)[1] is not None:
        raise CheckpointError("a reward model cannot be written with quantised weights (transformers' Gemma "
                              "quantisation covers causal LMs); export it without --quantize", where="quantize")
    if model.architecture.vision is not None:
        raise CheckpointError("a vision model cannot be written with quantised weights here (transformers' Gemma "
                              "quantisation would also convert the vision tower's layers); export it without "
                              "--quantize", where="quantize")
    out_dir = Path(out_dir)
    dtype = dtype or model_dtype(model)
    if dtype not in DTYPES:
        raise CheckpointError(f"cannot write {dtype} weights; expected one of {sorted(DTYPES)}", where="dtype")
    writer = _Writer(model, merge_lora, dtype)
    projection_names = {hf_names.EXPORT_PREFIX + hf.format(i=i) + ".weight"
                        for i in range(model.architecture.num_layers) for _, hf in hf_names.projection_names()}
    tensors = {}
    for name, tensor in zip(writer.names, writer.tensors):
        if name not in projection_names:
            tensors[name] = writer.value(tensor)
            continue
        weight = tensor.to_hf(float_weight(model, tensor.ours, merge_lora=merge_lora))
        integers, scale = quantize_rows(np.asarray(weight, np.float32), bits)
        base = name[: -len(".weight")]
        tensors[name] = np.ascontiguousarray(integers)
        tensors[base + ".weight_scale"] = scale
        tensors[base + ".input_activation_scale"] = np.array(0.0, np.float32)
        tensors[base + ".output_activation_scale"] = np.array(0.0, np.float32)
    save_file(tensors, out_dir / SINGLE_FILE, metadata={"format": "pt"})
    ids = GEMMA_IDS if tokenizer is None else {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
                                                "pad_id": tokenizer.pad_id}
    config = _config(model, dtype, ids)
    config["quantization_config"] = {"quant_method": "gemma", "num_bits": bits, "quantize_embeddings": False,
                                     "modules_to_not_convert": ["lm_head"]}
    write_json(out_dir / "config.json", config)
    _write_generation_and_tokenizer(out_dir, tokenizer, ids)
    return out_dir


def _write_generation_and_tokenizer(out_dir: Path, tokenizer, ids: dict) -> None:
    from gemma_tune.checkpoints.hf_tokenizer import generation_config, write_hf_tokenizer_files, write_json

    if tokenizer is None:
        write_json(out_dir / "generation_config.json", {"bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"],
                                                        "pad_token_id": ids["pad_id"], "do_sample": False})
        return
    write_json(out_dir / "generation_config.json", generation_config(tokenizer))
    write_hf_tokenizer_files(tokenizer, out_dir)


def write_hf_weights(model, out_dir: str | Path, *, merge_lora: bool = True, dtype: str | None = None,
                     max_shard_size: int) -> Path:
    """An HF checkpoint of `model` without tokenizer files, into the existing directory `out_dir` (module
    docstring)."""
    from gemma_tune.checkpoints.hf import DTYPES, model_dtype, write_weights
    from gemma_tune.checkpoints.hf_tokenizer import write_json

    if model.architecture.vision is not None:
        raise CheckpointError("a vision model's safetensors export needs its tokenizer (the processor files name "
                              "the image tokens); give one with --tokenizer PATH", where="tokenizer")
    out_dir = Path(out_dir)
    dtype = dtype or model_dtype(model)
    if dtype not in DTYPES:
        raise CheckpointError(f"cannot write {dtype} weights; expected one of {sorted(DTYPES)}", where="dtype")
    config = _config(model, dtype, GEMMA_IDS)
    write_weights(model, out_dir, merge_lora=merge_lora, dtype=dtype, max_shard_size=max_shard_size)
    write_json(out_dir / "config.json", config)
    _write_generation_and_tokenizer(out_dir, None, GEMMA_IDS)
    return out_dir
