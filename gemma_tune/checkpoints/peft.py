"""PEFT LoRA adapters: write ours as `adapter_model.safetensors` + `adapter_config.json`, read one back.

Keras' Dense LoRA on a kernel W [in, out] adds (α/r)·A·B with A [in, r], B [r, out]. PEFT's LoRA on an
`nn.Linear` with weight Wᵀ [out, in] adds scaling·(lora_B.weight @ lora_A.weight) with
lora_A.weight [r, in], lora_B.weight [out, r] and scaling = lora_alpha / r (lora_alpha / √r with
`use_rslora`). So lora_A.weight = Aᵀ, lora_B.weight = Bᵀ, and r, lora_alpha carry over unchanged:
`peft.PeftModel.from_pretrained(transformers_base, DIR)` computes our model's function. Tensor names are
`base_model.model.model.layers.{i}.<module>.lora_{A,B}.weight` with the modules of `hf_names`.

A vision model's adapters (PaliGemma, Gemma 3: LoRA on the text decoder) are named as PEFT names them on
transformers 5's `*ForConditionalGeneration`, `base_model.model.model.language_model.layers.{i}.<module>…`,
and the config excludes the vision tower (`exclude_modules: ".*vision_tower.*"`), whose SigLIP attention
also has q/k/v_proj modules that the target names would otherwise reach. Reading accepts the decoder under
any of `hf_names.IMPORT_PREFIXES` (transformers 4's `language_model.model.` too); LoRA on the vision tower
(a PEFT adapter trained with those target names and no exclusion) is refused: gemma_tune's LoRA is on the
decoder's projections.

A reward model's adapter (`gemma_tune.models.RewardModel`) is PEFT's sequence classification: `task_type:
SEQ_CLS`, and its trained head saved whole beside the adapters (`modules_to_save: ["score"]`, the tensor
`base_model.model.score.weight` [1, hidden]), so that `AutoPeftModelForSequenceClassification.from_pretrained(
DIR, num_labels=1)` — or `PeftModel.from_pretrained` over the base loaded with
`AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=1)` — computes our scores. Loading one
back gives a RewardModel (around the base, which may itself be a causal LM).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from gemma_tune.checkpoints import hf_names
from gemma_tune.checkpoints.hf_config import read_config_file
from gemma_tune.checkpoints.hf_tokenizer import write_json
from gemma_tune.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
VISION_EXCLUDED = ".*vision_tower.*"  # PEFT's exclude_modules of a vision model's adapter (a full-match regex)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
SEQ_CLS = "SEQ_CLS"
HEAD_MODULES = {"score", "classifier"}  # PEFT's modules_to_save of SEQ_CLS (Gemma's head is `score`)
MODULE_TARGETS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
                  "up_proj": "up", "down_proj": "down"}


def is_peft_adapter(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def _lora_settings(model) -> tuple[int, float, float, list[str]]:
    """(rank, alpha, dropout, HF module names) shared by every LoRA projection of `model`."""
    from gemma_tune.models import lora_projections

    layers = list(lora_projections(model))
    if not layers:
        raise CheckpointError("the model has no LoRA adapters to export; enable LoRA or export "
                              "--format safetensors|keras", where="format peft")
    settings = {(layer.lora_rank, float(layer.lora_alpha), float(getattr(layer, "lora_dropout", 0.0)))
                for _, layer in layers}
    if len(settings) > 1:
        raise CheckpointError(f"LoRA adapters with different rank/alpha/dropout {sorted(settings)} cannot be "
                              "described by one adapter_config.json", where="format peft")
    modules_by_block: dict[str, set[str]] = {}
    for path, _ in layers:  # path: blocks.{i}.attention.q_proj
        modules_by_block.setdefault(path.split(".")[1], set()).add(path.rsplit(".", 1)[-1])
    targets = set.union(*modules_by_block.values())
    if len(modules_by_block) != model.architecture.num_layers or any(m != targets for m in modules_by_block.values()):
        raise CheckpointError("LoRA must be on the same projections in every layer for a PEFT adapter",
                              where="format peft")
    rank, alpha, dropout = settings.pop()
    return rank, alpha, dropout, sorted(targets)


def module_prefix(model) -> str:
    """The prefix PEFT gives the decoder's modules (after `base_model.model.`): `model.` for a causal LM,
    `model.language_model.` for a vision model."""
    return "model.language_model." if model.architecture.vision is not None else hf_names.EXPORT_PREFIX


def adapter_config(model, base_model_name_or_path: str | None, score_head: bool = False) -> dict:
    """adapter_config.json of `model`'s (a decoder's) adapters; `score_head`: a reward model's (SEQ_CLS, the
    head saved whole)."""
    rank, alpha, dropout, targets = _lora_settings(model)
    vision = {"exclude_modules": VISION_EXCLUDED} if model.architecture.vision is not None else {}
    return {**vision,
        "peft_type": "LORA", "task_type": SEQ_CLS if score_head else "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "lora_dropout": dropout, "target_modules": targets, "base_model_name_or_path": base_model_name_or_path,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": ["score"] if score_head else None,
        "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def adapter_tensors(model, dtype: str = "float32") -> dict[str, np.ndarray]:
    """{PEFT name: array} of every LoRA projection: lora_A.weight = Aᵀ, lora_B.weight = Bᵀ."""
    from keras import ops

    from gemma_tune.checkpoints.hf import DTYPES
    from gemma_tune.models import lora_projections

    tensors = {}
    for path, layer in lora_projections(model):
        name = PEFT_PREFIX + module_prefix(model) + hf_names.hf_projection_name(path)
        for key, variable in (("lora_A", layer.lora_kernel_a), ("lora_B", layer.lora_kernel_b)):
            value = ops.convert_to_numpy(ops.cast(variable, "float32")).T
            tensors[f"{name}.{key}.weight"] = np.ascontiguousarray(value.astype(DTYPES[dtype]))
    return tensors


def save_peft_adapter(model, out_dir: str | Path, *, base_model_name_or_path: str | None = None,
                      dtype: str | None = None) -> Path:
    """Write the model's LoRA adapters as a PEFT adapter into the existing directory `out_dir` (a
    RewardModel's with its score head: module docstring)."""
    from gemma_tune.checkpoints.hf import DTYPES
    from gemma_tune.models import float_weight, reward_parts

    out_dir = Path(out_dir)
    lm, head = reward_parts(model)
    config = adapter_config(lm, base_model_name_or_path, score_head=head is not None)
    tensors = adapter_tensors(lm, dtype or "float32")
    if head is not None:
        score = float_weight(model, hf_names.SCORE.ours).T
        tensors[PEFT_PREFIX + hf_names.SCORE.hf] = np.ascontiguousarray(score.astype(DTYPES[dtype or "float32"]))
    save_file(tensors, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    write_json(out_dir / ADAPTER_CONFIG, config)
    return out_dir


def _targets(config: dict, where: str) -> list[str]:
    modules = config.get("target_modules")
    if isinstance(modules, str) or not modules:
        raise CheckpointError(f"target_modules {modules!r}: expected a list of projection names "
                              f"{sorted(MODULE_TARGETS)}", where=where)
    unknown = [m for m in modules if m not in MODULE_TARGETS]
    if unknown:
        raise CheckpointError(f"target_modules {unknown} are not Gemma projections {sorted(MODULE_TARGETS)}",
                              where=where)
    return [MODULE_TARGETS[m] for m in modules]


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json, checked to be a plain LoRA adapter gemma_tune can apply."""
    path = adapter_dir / ADAPTER_CONFIG
    config = read_config_file(path)
    where = str(path)
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"peft_type {config.get('peft_type')!r}: only LORA adapters are supported", where=where)
    unsupported = [key for key in ("use_dora", "modules_to_save", "layers_to_transform", "rank_pattern",
                                   "alpha_pattern", "fan_in_fan_out") if config.get(key)]
    if _saves_head(config):  # a reward model's head, saved whole
        unsupported.remove("modules_to_save")
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise CheckpointError(f"{', '.join(unsupported)} set: only plain LoRA (one rank and alpha, on "
                              "projections, no bias) is supported", where=where)
    _targets(config, where)
    return config


def _saves_head(config: dict) -> bool:
    """A sequence classification adapter whose `modules_to_save` are the classifier head alone."""
    modules = config.get("modules_to_save") or []
    return config.get("task_type") == SEQ_CLS and "score" in modules and set(modules) <= HEAD_MODULES


def load_peft_adapter(model, adapter_dir: str | Path):
    """Enable LoRA on `model` as `adapter_dir` describes and assign its weights; returns the model, which for
    a reward model's adapter (SEQ_CLS with its score head) is a RewardModel around a causal LM `model`."""
    from keras import ops

    from gemma_tune.models import RewardModel, enable_lora, lora_projections, reward_parts

    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    lm, head = reward_parts(model)
    if config.get("task_type") == SEQ_CLS and head is None and not _saves_head(config):
        raise CheckpointError("a sequence classification adapter without its score head (modules_to_save), over a "
                              "base without one: there is no reward head to score with", where=str(adapter_dir))
    if _saves_head(config) and head is None:
        model = RewardModel(lm)
        head = model.score
    if any(True for _ in lora_projections(lm)):
        raise CheckpointError("the model already has LoRA adapters", where=str(adapter_dir))
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    if config.get("use_rslora"):  # PEFT scales by alpha/sqrt(r); Keras by alpha/r
        alpha *= math.sqrt(rank)
    enable_lora(lm, rank=rank, alpha=alpha, dropout=float(config.get("lora_dropout") or 0.0),
                targets=_targets(config, str(adapter_dir / ADAPTER_CONFIG)))
    file = adapter_dir / ADAPTER_WEIGHTS
    try:
        with safe_open(file, "np") as f:
            names = set(f.keys())
            if _saves_head(config):
                name = PEFT_PREFIX + hf_names.SCORE.hf
                if name not in names:
                    raise CheckpointError(f"missing tensor {name} (modules_to_save: score)", where=str(file))
                names.discard(name)
                value = np.asarray(f.get_tensor(name), np.float32)
                if tuple(value.shape) != tuple(head.kernel.shape)[::-1]:
                    raise CheckpointError(f"tensor {name} has shape {list(value.shape)}, expected "
                                          f"{list(head.kernel.shape)[::-1]}", where=str(file))
                head.kernel.assign(ops.cast(value.T, head.kernel.dtype))
            for path, layer in lora_projections(lm):
                base = hf_names.hf_projection_name(path)
                for key, variable in (("lora_A", layer.lora_kernel_a), ("lora_B", layer.lora_kernel_b)):
                    name = next((PEFT_PREFIX + prefix + f"{base}.{key}.weight" for prefix in hf_names.IMPORT_PREFIXES
                                 if PEFT_PREFIX + prefix + f"{base}.{key}.weight" in names), None)
                    if name is None:
                        raise CheckpointError(f"missing tensor {PEFT_PREFIX}{module_prefix(lm)}{base}.{key}.weight",
                                              where=str(file))
                    names.discard(name)
                    value = np.asarray(f.get_tensor(name), np.float32).T
                    if tuple(value.shape) != tuple(variable.shape):
                        raise CheckpointError(f"tensor {name} has shape {list(value.T.shape)}, expected "
                                              f"{list(variable.shape)[::-1]}", where=str(file))
                    variable.assign(ops.cast(value, variable.dtype))
    except (SafetensorError, FileNotFoundError) as e:
        raise CheckpointError(f"not a readable safetensors file ({e})", where=str(file)) from e
    vision = sorted(name for name in names if _in_vision_tower(name))
    if vision:
        shown = ", ".join(vision[:3]) + (" …" if len(vision) > 3 else "")
        raise CheckpointError(f"LoRA on the vision tower ({shown}) is not "
                              "supported: gemma_tune's LoRA is on the text decoder's projections (a PEFT adapter for "
                              f"a vision model needs exclude_modules: {VISION_EXCLUDED!r})", where=str(file))
    if names:
        raise CheckpointError(f"unexpected tensors: {', '.join(sorted(names)[:5])}", where=str(file))
    return model


def _in_vision_tower(name: str) -> bool:
    """Whether an adapter tensor's module lies in a vision model's vision tower or projector."""
    found = hf_names.split_name(name.removeprefix(PEFT_PREFIX))
    return found is not None and found[0] != hf_names.TEXT


def adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter names (`base_model_name_or_path`), as a load_model source."""
    base = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not base:
        raise CheckpointError("base_model_name_or_path is empty; load the base model and apply the adapter "
                              "with gemma_tune.checkpoints.peft.load_peft_adapter", where=str(adapter_dir / ADAPTER_CONFIG))
    if Path(base).expanduser().is_dir() or base.startswith(("hf://", "kaggle://")):
        return base
    relative = (adapter_dir / base)
    if relative.is_dir():
        return str(relative)
    return f"hf://{base}"
