"""Read and write Hugging Face Gemma checkpoints (config.json + safetensors, one file or sharded).

Reading (`load_hf_checkpoint`): the architecture comes from config.json (`hf_config`), the model from
`build_model(arch, dtype)`, and every tensor of the name map (`hf_names`) is read from the safetensors
file(s) — one `model.safetensors`, or the shards listed in `model.safetensors.index.json` — checked
for shape, transposed where HF stores [out, in], cast and assigned. A missing or unexpected tensor, a
wrong shape, or an untied `lm_head` is a CheckpointError naming the file and the tensor. Tensors are
read one at a time (bfloat16 through `ml_dtypes`), so peak memory is the model plus one tensor. A config
whose `architectures` is a one-label `*ForSequenceClassification` (a reward model) gives a
`gemma_tune.models.RewardModel`: the decoder's tensors and the head's `score.weight`. A PaliGemma or Gemma 3
vision-language checkpoint (`hf_config.is_multimodal`) gives a model with `.vision`: its tensors are found by
part (`hf_names.split_name`: the hub's `language_model.model.` / `vision_tower.vision_model.` /
`multi_modal_projector.` layout, transformers 5's `vision_tower.` and the in-memory `model.language_model.` ...
names alike; SigLIP's unused pooling head is ignored). Given an architecture without vision (a recipe that
asks for the text decoder alone), the vision tower and projector of a multimodal checkpoint are left aside.

Writing (`save_hf_checkpoint`): config.json, the weights as `model.safetensors` or, when larger than
`max_shard_size` bytes, `model-0000K-of-0000N.safetensors` shards with `model.safetensors.index.json`
(transformers' layout), generation_config.json and the tokenizer files. Projection kernels are
float32 first: dequantised when the base is int8/int4 and, with `merge_lora`, plus the LoRA update
(α/r)·A·B; only then cast to the output dtype, so merging adds no rounding of its own. A `RewardModel` is
written as transformers' `*ForSequenceClassification` (`hf_config(..., sequence_classifier=True)`): the
decoder's `model.*` tensors (no lm_head) and `score.weight` [1, hidden]. A vision model is written as its
`*ForConditionalGeneration` in the hub's layout (`hf_names.MULTIMODAL_EXPORT_PREFIXES`), with the files
`transformers.AutoProcessor` needs (`hf_tokenizer.write_processor_files`, the image tokens in the tokenizer
files).
"""

from __future__ import annotations

import json
from pathlib import Path
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, for safetensors' NumPy reader/writer)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from gemma_tune.checkpoints import hf_names
from gemma_tune.checkpoints.hf_config import (architecture_from_hf, hf_config, is_multimodal, is_sequence_classifier,
                                              read_config_file)
from gemma_tune.checkpoints.hf_tokenizer import (BOI, EOI, generation_config, image_token_ids, write_hf_tokenizer_files,
                                                 write_json, write_processor_files)
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
    """The tensors of one checkpoint by (part, HF name inside the part) (`hf_names.split_name`), plus the names
    that have no part: lm_head and, when `score`, a reward model's head. `skip_vision`: leave a multimodal
    checkpoint's vision tower and projector aside (a text decoder alone is loaded)."""

    def __init__(self, checkpoint_dir: Path, skip_vision: bool, score: bool):
        self.files: dict[tuple[str, str], tuple[str, Path]] = {}
        self.unexpected: list[str] = []
        self.lm_head: tuple[str, Path] | None = None
        self.score: tuple[str, Path] | None = None
        for name, file in tensor_files(checkpoint_dir).items():
            found = hf_names.split_name(name)
            if name in hf_names.LM_HEAD_NAMES:
                self.lm_head = (name, file)
            elif score and name == hf_names.SCORE.hf:
                self.score = (name, file)
            elif name.endswith(IGNORED_SUFFIXES):
                continue
            elif found is not None and found[0] == hf_names.VISION and found[1].startswith(hf_names.IGNORED_VISION):
                continue
            elif found is not None and found[0] != hf_names.TEXT and skip_vision:
                continue
            elif found is not None and found not in self.files:
                self.files[found] = (name, file)
            else:
                self.unexpected.append(name)

    def get(self, tensor: hf_names.Tensor) -> tuple[str, Path, np.ndarray]:
        name, file = self.files.pop((tensor.part, tensor.hf))
        return name, file, _read(file, name)


def _assign(variable, value: np.ndarray, tensor: hf_names.Tensor, name: str, file: Path) -> None:
    """variable <- value (HF layout; permuted to ours by `tensor.from_hf`), after checking the shape."""
    from keras import ops

    expected = tensor.hf_shape(variable.shape)
    if tuple(value.shape) != expected:
        raise CheckpointError(f"tensor {name} has shape {list(value.shape)}, the architecture in config.json "
                              f"expects {list(expected)}", where=str(file))
    value = tensor.from_hf(np.asarray(value, np.float32))
    variable.assign(ops.cast(np.ascontiguousarray(value), variable.dtype))


def _listed(names: list[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def assign_hf_tensors(model, checkpoint_dir: Path, multimodal: bool = False) -> None:
    """Assign every tensor of `checkpoint_dir` to `model` (a GemmaCausalLM — with its vision tower and projector
    when it has `.vision` — or a RewardModel: also its head's `score.weight`), nothing missing or left over,
    checked before any tensor is read; shapes checked one by one. `multimodal`: the checkpoint is a
    vision-language model's, whose vision tensors a model without vision leaves aside."""
    from gemma_tune.models import get_variable, reward_parts

    lm, head = reward_parts(model)
    arch = lm.architecture
    layout = multimodal or arch.vision is not None
    reader = _Reader(checkpoint_dir, skip_vision=multimodal and arch.vision is None, score=head is not None)
    tensors = hf_names.checkpoint_map(arch)
    wanted = {(tensor.part, tensor.hf) for tensor in tensors}
    missing = [hf_names.export_name(t, layout) for t in tensors if (t.part, t.hf) not in reader.files]
    if head is not None and reader.score is None:
        missing.append(hf_names.SCORE.hf)
    if missing:
        raise CheckpointError(f"missing tensors for this architecture: {_listed(missing)}", where=str(checkpoint_dir))
    extra = reader.unexpected + [name for key, (name, _) in reader.files.items() if key not in wanted]
    if extra:
        tower = f" and a vision tower of {arch.vision.num_layers} layers" if arch.vision is not None else ""
        raise CheckpointError(f"unexpected tensors, not part of a {arch.family} decoder with {arch.num_layers} "
                              f"layers{tower}: {_listed(extra)}", where=str(checkpoint_dir))
    embedding = None
    for tensor in tensors:
        name, file, value = reader.get(tensor)
        _assign(get_variable(lm, tensor.ours), value, tensor, name, file)
        if tensor.part == hf_names.TEXT and tensor.hf == hf_names.EMBEDDING_HF:
            embedding = value
    if head is not None:
        name, file = reader.score
        _assign(head.kernel, _read(file, name), hf_names.SCORE, name, file)
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
    model = build_model(arch, dtype=dtype, random_init=False)
    if is_sequence_classifier(config, where=str(config_path)):
        model = RewardModel(model)
    assign_hf_tensors(model, checkpoint_dir, multimodal=is_multimodal(config))
    return model


def model_dtype(model) -> str:
    """The dtype the model's (decoder's) weights are stored in ("float32", "bfloat16", ...)."""
    from gemma_tune.models import reward_parts

    return str(reward_parts(model)[0].token_embedding.embeddings.dtype)


class _Writer:
    """The HF tensors of a model, made one at a time (see the module docstring) in `dtype`: `names[i]` is
    the full name of `tensors[i]` (the decoder's under `model.` — a vision model's in the hub's multimodal
    layout, with its vision tower and projector — then a reward model's `score.weight`)."""

    def __init__(self, model, merge_lora: bool, dtype: str):
        from gemma_tune.models import projections, reward_parts

        self.model, self.merge_lora, self.dtype = model, merge_lora, DTYPES[dtype]
        self.lm, head = reward_parts(model)
        self.layers = dict(projections(self.lm))
        self.tensors = hf_names.checkpoint_map(self.lm.architecture)
        multimodal = self.lm.architecture.vision is not None
        self.names = [hf_names.export_name(t, multimodal) for t in self.tensors]
        if head is not None:
            self.tensors.append(hf_names.SCORE)
            self.names.append(hf_names.SCORE.hf)

    def _owner(self, tensor: hf_names.Tensor):
        """The model whose path `tensor.ours` is: the reward model for its head, else the decoder."""
        return self.model if tensor is hf_names.SCORE else self.lm

    def nbytes(self, tensor: hf_names.Tensor) -> int:
        from gemma_tune.models import get_variable

        layer = self.layers.get(tensor.ours.rsplit(".", 1)[0]) if tensor.ours.endswith(".kernel") else None
        if layer is not None:  # int4 kernels are packed along the output axis: take it from the layer
            shape = (layer.units, int(get_variable(self.lm, tensor.ours).shape[0]))
        else:
            shape = tensor.hf_shape(get_variable(self._owner(tensor), tensor.ours).shape)
        return int(np.prod(shape)) * np.dtype(self.dtype).itemsize

    def value(self, tensor: hf_names.Tensor) -> np.ndarray:
        from gemma_tune.models import float_weight

        value = float_weight(self._owner(tensor), tensor.ours, merge_lora=self.merge_lora)
        return np.ascontiguousarray(tensor.to_hf(value).astype(self.dtype))


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
    a causal LM, a vision-language model with its processor files, or for a `RewardModel` a one-label
    sequence classifier (module docstring).

    Not atomic by itself: `gemma_tune.export.export_model` calls it on a temporary directory.
    """
    from gemma_tune.models import reward_parts

    out_dir = Path(out_dir)
    dtype = dtype or model_dtype(model)
    if dtype not in DTYPES:
        raise CheckpointError(f"cannot write {dtype} weights; expected one of {sorted(DTYPES)}", where="dtype")
    arch = model.architecture
    markers = {}
    if arch.vision is not None:  # checked before anything is written
        ids = image_token_ids(tokenizer, arch)
        markers = {"boi_id": ids.get(BOI), "eoi_id": ids.get(EOI)}
    config = hf_config(arch, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, dtype=dtype,
                       sequence_classifier=reward_parts(model)[1] is not None, **markers)
    write_weights(model, out_dir, merge_lora=merge_lora, dtype=dtype, max_shard_size=max_shard_size)
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "generation_config.json", generation_config(tokenizer))
    if arch.vision is None:
        write_hf_tokenizer_files(tokenizer, out_dir)
    else:  # with the image tokens, and what transformers' AutoProcessor reads
        write_hf_tokenizer_files(tokenizer, out_dir, arch)
        write_processor_files(arch, out_dir)
    return out_dir
