"""Read and write Hugging Face Gemma checkpoints (config.json + safetensors, one file or sharded).

Reading (`load_hf_checkpoint`): the architecture comes from config.json (`hf_config`), the model from
`build_model(arch, dtype)`, and every tensor of the name map (`hf_names`) is read from the safetensors
file(s) — one `model.safetensors`, or the shards listed in `model.safetensors.index.json` — checked
for shape, transposed where HF stores [out, in], cast and assigned. A missing or unexpected tensor, a
wrong shape, or an untied `lm_head` is a CheckpointError naming the file and the tensor. Tensors are
read one at a time (bfloat16 through `ml_dtypes`), so peak memory is the model plus one tensor. A config
whose `architectures` is a one-label `*ForSequenceClassification` (a reward model) gives a
`gemma_tune.models.RewardModel`: the decoder's tensors and the head's `score.weight`.

Writing (`save_hf_checkpoint`): config.json, the weights as `model.safetensors` or, when larger than
`max_shard_size` bytes, `model-0000K-of-0000N.safetensors` shards with `model.safetensors.index.json`
(transformers' layout), generation_config.json and the tokenizer files. Projection kernels are
float32 first: dequantised when the base is int8/int4 and, with `merge_lora`, plus the LoRA update
(α/r)·A·B; only then cast to the output dtype, so merging adds no rounding of its own. A `RewardModel` is
written as transformers' `*ForSequenceClassification` (`hf_config(..., sequence_classifier=True)`): the
decoder's `model.*` tensors (no lm_head) and `score.weight` [1, hidden].
"""

from __future__ import annotations

import json
from pathlib import Path
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, for safetensors' NumPy reader/writer)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from gemma_tune.checkpoints import hf_names
from gemma_tune.checkpoints.hf_config import architecture_from_hf, hf_config, is_sequence_classifier, read_config_file
from gemma_tune.checkpoints.hf_tokenizer import generation_config, write_hf_tokenizer_files, write_json
from gemma_tune.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 5_000_000_000
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def is_hf_checkpoint(path: Path) -> bool:
    """Whether `path` holds a Hugging Face config.json (one with a `model_type`; which types are read is
    `hf_config`'s business, so another model type gets its error there)."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model_type" in data and "class_name" not in data


def tensor_files(checkpoint_dir: Path) -> dict[str, Path]:
    """{tensor name: safetensors file holding it} of a single-file or sharded checkpoint."""
    index = checkpoint_dir / INDEX_FILE
    if index.is_file():
        data = read_config_file(index)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError("expected a non-empty 'weight_map' {tensor: file}", where=str(index))
        files = {name: checkpoint_dir / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise CheckpointError(f"shard {file.name} listed in {INDEX_FILE} is missing", where=str(file))
        return files
    single = checkpoint_dir / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"no weights: expected {SINGLE_FILE} or {INDEX_FILE} with its shards",
                              where=str(checkpoint_dir))
    try:
        with safe_open(single, "np") as f:
            return {name: single for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"not a readable safetensors file ({e})", where=str(single)) from e


def _read(file: Path, name: str) -> np.ndarray:
    try:
        with safe_open(file, "np") as f:
            return f.get_tensor(name)
    except (SafetensorError, OSError, TypeError) as e:
        raise CheckpointError(f"cannot read tensor {name} ({e})", where=str(file)) from e


class _Reader:
    """The tensors of one checkpoint by HF name without prefix (plus the names that have none, lm_head and,
    when `score`, a reward model's head)."""

    def __init__(self, checkpoint_dir: Path, multimodal: bool, score: bool):
        self.files: dict[str, tuple[str, Path]] = {}
        self.unexpected: list[str] = []
        self.lm_head: tuple[str, Path] | None = None
        self.score: tuple[str, Path] | None = None
        for name, file in tensor_files(checkpoint_dir).items():
            if name in hf_names.LM_HEAD_NAMES:
                self.lm_head = (name, file)
            elif score and name == hf_names.SCORE.hf:
                self.score = (name, file)
            elif name.endswith(IGNORED_SUFFIXES) or (multimodal and name.startswith(hf_names.MULTIMODAL_PREFIXES)):
                continue
            elif (short := hf_names.strip_prefix(name)) is not None and short not in self.files:
                self.files[short] = (name, file)
            else:
                self.unexpected.append(name)

    def get(self, short: str) -> tuple[str, Path, np.ndarray]:
        name, file = self.files.pop(short)
        return name, file, _read(file, name)


def _assign(variable, value: np.ndarray, transpose: bool, name: str, file: Path) -> None:
    """variable <- value (HF layout; transposed first when `transpose`), after checking the shape."""
    from keras import ops

    expected = tuple(variable.shape)[::-1] if transpose else tuple(variable.shape)
    if tuple(value.shape) != expected:
        raise CheckpointError(f"tensor {name} has shape {list(value.shape)}, the architecture in config.json "
                              f"expects {list(expected)}", where=str(file))
    value = np.asarray(value, np.float32)
    variable.assign(ops.cast(value.T if transpose else value, variable.dtype))


def _listed(names: list[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def assign_hf_tensors(model, checkpoint_dir: Path, multimodal: bool = False) -> None:
    """Assign every tensor of `checkpoint_dir` to `model` (a GemmaCausalLM, or a RewardModel: also its
    head's `score.weight`), nothing missing or left over, checked before any tensor is read; shapes checked
    one by one."""
    from gemma_tune.models import get_variable, reward_parts

    lm, head = reward_parts(model)
    reader = _Reader(checkpoint_dir, multimodal, score=head is not None)
    tensors = hf_names.name_map(lm.architecture)
    wanted = {tensor.hf for tensor in tensors}
    missing = [hf_names.EXPORT_PREFIX + t.hf for t in tensors if t.hf not in reader.files]
    if head is not None and reader.score is None:
        missing.append(hf_names.SCORE.hf)
    if missing:
        raise CheckpointError(f"missing tensors for this architecture: {_listed(missing)}", where=str(checkpoint_dir))
    extra = reader.unexpected + [name for short, (name, _) in reader.files.items() if short not in wanted]
    if extra:
        arch = lm.architecture
        raise CheckpointError(f"unexpected tensors, not part of a {arch.family} decoder with {arch.num_layers} "
                              f"layers: {_listed(extra)}", where=str(checkpoint_dir))
    embedding = None
    for tensor in tensors:
        name, file, value = reader.get(tensor.hf)
        _assign(get_variable(lm, tensor.ours), value, tensor.transpose, name, file)
        if tensor.hf == hf_names.EMBEDDING_HF:
            embedding = value
    if head is not None:
        name, file = reader.score
        _assign(head.kernel, _read(file, name), True, name, file)
    if reader.lm_head is not None:
        name, file = reader.lm_head
        if not np.array_equal(np.asarray(_read(file, name), np.float32), np.asarray(embedding, np.float32)):
            raise CheckpointError(f"{name} differs from the token embedding; Gemma ties them", where=str(file))


def load_hf_checkpoint(checkpoint_dir: str | Path, dtype: str = "float32", architecture=None):
    """A `GemmaCausalLM` with the weights of the HF checkpoint in `checkpoint_dir` (a `RewardModel` for a
    one-label sequence classifier).

    `architecture` (optional) replaces the one read from config.json (the caller has cross-checked it).
    """
    from gemma_tune.models import RewardModel, build_model

    checkpoint_dir = Path(checkpoint_dir)
    config_path = checkpoint_dir / "config.json"
    config = read_config_file(config_path)
    arch = architecture or architecture_from_hf(config, where=str(config_path))
    model = build_model(arch, dtype=dtype)
    if is_sequence_classifier(config, where=str(config_path)):
        model = RewardModel(model)
    assign_hf_tensors(model, checkpoint_dir, multimodal=config.get("model_type") == "gemma3")
    return model


def model_dtype(model) -> str:
    """The dtype the model's (decoder's) weights are stored in ("float32", "bfloat16", ...)."""
    from gemma_tune.models import reward_parts

    return str(reward_parts(model)[0].token_embedding.embeddings.dtype)


class _Writer:
    """The HF tensors of a model, made one at a time (see the module docstring) in `dtype`: `names[i]` is
    the full name of `tensors[i]` (the decoder's under `model.`, then a reward model's `score.weight`)."""

    def __init__(self, model, merge_lora: bool, dtype: str):
        from gemma_tune.models import projections, reward_parts

        self.model, self.merge_lora, self.dtype = model, merge_lora, DTYPES[dtype]
        self.lm, head = reward_parts(model)
        self.layers = dict(projections(self.lm))
        self.tensors = hf_names.name_map(self.lm.architecture)
        self.names = [hf_names.EXPORT_PREFIX + t.hf for t in self.tensors]
        if head is not None:
            self.tensors.append(hf_names.SCORE)
            self.names.append(hf_names.SCORE.hf)

    def _owner(self, tensor: hf_names.Tensor):
        """The model whose path `tensor.ours` is: the reward model for its head, else the decoder."""
        return self.model if tensor is hf_names.SCORE else self.lm

    def nbytes(self, tensor: hf_names.Tensor) -> int:
        from gemma_tune.models import get_variable

        shape = tuple(get_variable(self._owner(tensor), tensor.ours).shape)
        if tensor.transpose:  # int4 kernels are packed along the output axis: take it from the layer
            layer = self.layers.get(tensor.ours.rsplit(".", 1)[0])
            shape = (layer.units, shape[0]) if layer is not None else shape[::-1]
        return int(np.prod(shape)) * np.dtype(self.dtype).itemsize

    def value(self, tensor: hf_names.Tensor) -> np.ndarray:
        from gemma_tune.models import float_weight

        value = float_weight(self._owner(tensor), tensor.ours, merge_lora=self.merge_lora)
        return np.ascontiguousarray((value.T if tensor.transpose else value).astype(self.dtype))


def _shards(sizes: list[int], max_shard_size: int) -> list[list[int]]:
    """Indices of consecutive tensors grouped so each group is at most `max_shard_size` bytes (a bigger
    tensor alone)."""
    shards: list[list[int]] = [[]]
    total = 0
    for i, size in enumerate(sizes):
        if shards[-1] and total + size > max_shard_size:
            shards.append([])
            total = 0
        shards[-1].append(i)
        total += size
    return shards


def write_weights(model, out_dir: Path, *, merge_lora: bool, dtype: str, max_shard_size: int) -> list[str]:
    """Write the model's HF tensors as one safetensors file, or as shards plus the index; returns the
    file names written. One shard's tensors are in memory at a time."""
    writer = _Writer(model, merge_lora, dtype)
    sizes = [writer.nbytes(t) for t in writer.tensors]
    shards = _shards(sizes, max_shard_size)
    metadata = {"format": "pt"}
    names, weight_map = [], {}
    for k, shard in enumerate(shards, start=1):
        file = SINGLE_FILE if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {writer.names[i]: writer.value(writer.tensors[i]) for i in shard}
        save_file(tensors, out_dir / file, metadata=metadata)
        names.append(file)
        weight_map.update({name: file for name in tensors})
    if len(shards) > 1:
        write_json(out_dir / INDEX_FILE, {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map})
        names.append(INDEX_FILE)
    return names


def save_hf_checkpoint(model, tokenizer, out_dir: str | Path, *, merge_lora: bool = True, dtype: str | None = None,
                       max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write an HF checkpoint of `model` (with `tokenizer`'s files) into the existing directory `out_dir`:
    a causal LM, or for a `RewardModel` a one-label sequence classifier (module docstring).

    Not atomic by itself: `gemma_tune.export.export_model` calls it on a temporary directory.
    """
    from gemma_tune.models import reward_parts

    out_dir = Path(out_dir)
    dtype = dtype or model_dtype(model)
    if dtype not in DTYPES:
        raise CheckpointError(f"cannot write {dtype} weights; expected one of {sorted(DTYPES)}", where="dtype")
    config = hf_config(model.architecture, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                       pad_id=tokenizer.pad_id, dtype=dtype, sequence_classifier=reward_parts(model)[1] is not None)
    write_weights(model, out_dir, merge_lora=merge_lora, dtype=dtype, max_shard_size=max_shard_size)
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "generation_config.json", generation_config(tokenizer))
    write_hf_tokenizer_files(tokenizer, out_dir)
    return out_dir
