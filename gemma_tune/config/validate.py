"""Recipe loading and validation: composed YAML -> a typed `Recipe`, or one `ConfigError` that lists
every problem with the file that set it, the key path and what was expected. Nothing is built here:
all checks run before any model or data is touched (of local `model.weights` only the config files are
read, to know the architecture; hf:// and kaggle:// weights are not downloaded)."""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

from pydantic import BaseModel, ValidationError

from gemma_tune.config import presets, schema
from gemma_tune.config.compose import Provenance, compose_file, deep_merge, parse_overrides
from gemma_tune.config.paths import is_remote, resolve_existing
from gemma_tune.errors import CheckpointError, ConfigError
from gemma_tune.methods import METHODS, method_options
from gemma_tune.models.config import Architecture

Problem = tuple[tuple[str, ...], str]
DISTRIBUTED = ("jax",)  # backends whose Keras trains under keras.distribution (check_backend_support)
OPTION_SECTIONS = ("preference", "reward", "rl")  # recipe sections that hold a method's options (MethodSpec.section)


def load_recipe(source: str | Path | Mapping[str, Any], overrides: Iterable[str] = (),
                check_files: bool = True) -> schema.Recipe:
    """Compose, override and validate a recipe (a YAML path or a dict, as in the YAML file).

    Relative paths (weights, tokenizer, data) are resolved to absolute ones, so the resolved recipe
    re-runs from anywhere. With `check_files=False` missing local files are not errors (for tools that
    only inspect a recipe).
    """
    provenance: Provenance = {}
    if isinstance(source, Mapping):
        origin, recipe_dir = "<recipe dict>", Path.cwd()
        data = dict(source)
        bases = data.pop("base", None) or []
        merged: dict = {}
        for entry in [bases] if isinstance(bases, str) else bases:
            path = resolve_existing(entry)
            if path is None:
                raise ConfigError(f"base file '{entry}' not found", where=f"{origin}: base")
            merged = deep_merge(merged, compose_file(path, provenance), provenance, str(path))
        raw = deep_merge(merged, data, provenance, origin)
    else:
        path = presets.recipe_file(source)
        origin, recipe_dir = str(path), path.resolve().parent
        raw = compose_file(path, provenance)
    raw = deep_merge(raw, parse_overrides(overrides), provenance, "command-line override")

    try:
        recipe = schema.Recipe.model_validate(raw)
    except ValidationError as e:
        raise _config_error([_describe(err, raw) for err in e.errors()], provenance, origin) from None
    problems = _check_semantics(recipe, recipe_dir, check_files)
    if problems:
        raise _config_error(problems, provenance, origin)
    return recipe


def recipe_architecture(recipe: schema.Recipe) -> Architecture | None:
    """The model architecture a (validated) recipe states: its preset with `model.architecture` applied, or
    `model.architecture` alone; None when it states neither (only `model.weights`: the architecture is the
    checkpoint's, `known_architecture`). With weights, a stated architecture must compute the checkpoint's
    decoder (checked here for local weights, when loading for all)."""
    overrides = recipe.model.architecture or {}
    if recipe.model.preset:
        return presets.preset_architecture(recipe.model.preset, **overrides)
    if recipe.model.architecture is None:
        return None
    return Architecture(**overrides)


def known_architecture(recipe: schema.Recipe) -> Architecture | None:
    """The architecture a validated recipe trains, as far as it is known without downloading anything: the
    one it states, else that of its local `model.weights` (read from config files), else None (hf:// or
    kaggle:// weights)."""
    from gemma_tune.loading import source_architecture  # loading builds on config: imported when needed

    stated = recipe_architecture(recipe)
    if stated is not None or recipe.model.weights is None:
        return stated
    return source_architecture(recipe.model.weights)


def check_backend_support(recipe: schema.Recipe, backend: str) -> None:
    """ConfigError when `backend` cannot train `recipe` on this machine: `model.dtype: float16` on JAX
    running on a CPU (XLA:CPU has no float16 x float16 -> float32 dot; TensorFlow and PyTorch train
    float16 on a CPU). Imports JAX only in that case, to ask which platform it runs on. And
    `distribution.mode` other than none on a backend without Keras' distribution support (`DISTRIBUTED`):
    Keras 3.15 distributes training only on JAX (its TensorFlow part lays out tensors but does not feed or
    train; torch has none)."""
    if recipe.distribution.mode != "none" and backend not in DISTRIBUTED:
        raise ConfigError(f"distribution.mode {recipe.distribution.mode} needs a backend with Keras' distribution "
                          f"support: {', '.join(DISTRIBUTED)} (this run uses {backend}); expected "
                          f"--backend {DISTRIBUTED[0]}, or distribution.mode: none", where="distribution.mode")
    if recipe.model.dtype == "float16" and backend == "jax" and jax_platform() == "cpu":
        raise ConfigError("float16 does not train with the JAX backend on a CPU (XLA:CPU has no float16 matrix "
                          "product); expected model.dtype: bfloat16 or float32, or choose --backend tensorflow or "
                          "torch", where="model.dtype")


def jax_platform() -> str:
    """The platform JAX computes on by default: "cpu", "gpu" or "tpu"."""
    import jax

    return jax.default_backend()


# ---------------------------------------------------------------------------------------------------
def _check_semantics(recipe: schema.Recipe, recipe_dir: Path, check_files: bool) -> list[Problem]:
    problems: list[Problem] = []
    add = lambda path, msg: problems.append((tuple(path.split(".")), msg))  # noqa: E731

    spec = METHODS.get(recipe.method)
    if spec is None:
        known = ", ".join(METHODS)
        add("method", f"unknown method '{recipe.method}'{_suggest(recipe.method, list(METHODS))}; "
                      f"expected one of: {known}")
    problems += _check_method_options(recipe, spec)

    for key in ("weights", "tokenizer"):
        value = getattr(recipe.model, key)
        if value is None:
            continue
        resolved = _resolve_local(value, recipe_dir, looks_local=True)
        if resolved is False and check_files:
            what = "checkpoint directory" if key == "weights" else "SentencePiece model file"
            add(f"model.{key}", f"{what} '{value}' not found (expected hf://ORG/NAME, kaggle://HANDLE or a local path)")
        elif isinstance(resolved, Path):
            setattr(recipe.model, key, str(resolved))
    problems += _check_model(recipe)
    for split in ("train", "eval"):
        source = getattr(recipe.data, split)
        if source is None:
            continue
        if source.format not in schema.DATA_FORMATS:
            add(f"data.{split}.format", f"unknown data format '{source.format}'"
                                        f"{_suggest(source.format, schema.DATA_FORMATS)}; expected one of: "
                                        f"{', '.join(schema.DATA_FORMATS)}")
        elif source.prefix is not None and source.format != "image_text":
            add(f"data.{split}.prefix", f"a fixed prefix is for image_text data, not {source.format}")
        elif source.system is not None and source.format != "prompt":
            add(f"data.{split}.system", f"a system message for every row is for prompt data (grpo/rloo), not "
                                        f"{source.format} (chat rows carry their own system messages)")
        elif spec is not None and source.format not in spec.formats:
            add(f"data.{split}.format", f"method {spec.name} trains on {' or '.join(spec.formats)} data, "
                                        f"not {source.format}")
        resolved = _resolve_local(source.path, recipe_dir, looks_local=_looks_like_file(source.path))
        if resolved is False and check_files:
            add(f"data.{split}.path", f"data file or directory '{source.path}' not found")
        elif isinstance(resolved, Path):
            source.path = str(resolved)
    for i, sample in enumerate(recipe.train.sample_prompts):
        for j, image in enumerate(getattr(sample, "images", ())):
            resolved = _resolve_local(image, recipe_dir, looks_local=True)
            if resolved is False and check_files:
                add(f"train.sample_prompts.{i}.images.{j}", f"image file '{image}' not found")
            elif isinstance(resolved, Path):
                sample.images[j] = str(resolved)
    if recipe.data.eval is not None and recipe.data.eval_fraction > 0:
        add("data.eval_fraction", "give either data.eval or data.eval_fraction, not both")

    if recipe.model.weights is None and recipe.model.tokenizer is None:
        add("model.tokenizer", "a randomly initialised model (model.weights: null) needs model.tokenizer: "
                               "a SentencePiece .model file")

    if recipe.quantize and recipe.lora is None:
        add("quantize", "quantising the base model freezes it: it needs `lora:` adapters to train (QLoRA)")
    if "peft" in recipe.export.formats and recipe.lora is None:
        add("export.formats", "the peft format writes LoRA adapters: it needs `lora:`")
    problems += _check_export_quantize(recipe)
    problems += _check_mesh(recipe.distribution)
    train = recipe.train
    if train.max_steps is not None and train.warmup_steps >= train.max_steps:
        add("train.warmup_steps", f"expected fewer warmup steps than train.max_steps ({train.max_steps}), "
                                  f"got {train.warmup_steps}")
    if train.max_steps is not None and train.epochs is not None:
        add("train.epochs", "give either train.max_steps or train.epochs, not both")
    if recipe.output_dir is None:
        recipe.output_dir = str(Path("runs") / recipe.name)
    return problems


def _check_export_quantize(recipe: schema.Recipe) -> list[Problem]:
    """export.quantize must be a quantisation of every format it applies to (all but peft, which has none)."""
    from gemma_tune.export import QUANTIZE

    quantize, formats = recipe.export.quantize, recipe.export.formats
    if quantize is None:
        return []
    applies = [fmt for fmt in formats if QUANTIZE[fmt]]
    if not applies:
        return [(("export", "quantize"), f"export.quantize {quantize} applies to gguf, keras or safetensors exports; "
                                         f"export.formats lists {', '.join(formats) or 'none'}")]
    wrong = [fmt for fmt in applies if quantize not in QUANTIZE[fmt]]
    return [(("export", "quantize"), f"{quantize} is not a {fmt} quantisation; expected one of "
                                     f"{', '.join(QUANTIZE[fmt])} (one export.quantize applies to every format)")
            for fmt in wrong]


def _check_mesh(section: schema.DistributionSection) -> list[Problem]:
    """A mesh that no device count makes with its mode (data_parallel with a model axis, none with a mesh, a
    product other than distribution.devices); the device count itself is checked when the run starts."""
    import math

    from gemma_tune.distribute.mesh import MeshError, mesh_shape

    if section.mesh is None or section.mode == "auto":
        return []
    try:
        mesh_shape(section.mode, section.mesh, section.devices or math.prod(section.mesh.values()))
    except MeshError as e:
        return [(tuple(e.key.split(".")), str(e))]
    return []


def _check_method_options(recipe: schema.Recipe, spec) -> list[Problem]:
    """Options are validated only for the chosen method: another method's section, or a key of its own
    section that it does not read, is a problem naming the key."""
    problems = []
    for section in OPTION_SECTIONS:
        values = getattr(recipe, section)
        if values is None:
            continue
        given = [k for k, v in values.model_dump().items() if v is not None]
        if spec is None:
            continue
        if spec.section != section:
            users = ", ".join(name for name, s in METHODS.items() if s.section == section)
            problems += [((section, key), f"an option of {users}, not of method {spec.name}") for key in given]
            continue
        problems += [((section, key), f"not an option of {spec.name} (its options: {', '.join(spec.defaults)})")
                     for key in given if key not in spec.defaults]
    if spec is not None and spec.check is not None:
        problems += [(tuple(key.split(".")), message) for key, message in spec.check(recipe, method_options(recipe))]
    return problems


def _check_model(recipe: schema.Recipe) -> list[Problem]:
    model = recipe.model
    if model.preset is None and model.architecture is None and model.weights is None:
        return [(("model", "preset"), "expected a model preset (see `gemma-tune list`) or model.architecture for a "
                 "randomly initialised model, or model.weights to take the architecture from a checkpoint")]
    if model.preset is not None and model.preset not in presets.preset_names():
        return [(("model", "preset"), f"unknown model preset '{model.preset}'"
                 f"{_suggest(model.preset, presets.preset_names())}; run `gemma-tune list` for all")]
    try:
        arch = recipe_architecture(recipe)
    except ValidationError as e:
        return [(("model", "architecture") + path, msg) for path, msg in
                (_describe(err, model.architecture or {}, Architecture) for err in e.errors())]
    if model.weights is not None and not is_remote(model.weights) and Path(model.weights).exists():
        from gemma_tune.loading import source_architecture

        try:  # local weights: their config says what they compute
            found = source_architecture(model.weights)
        except CheckpointError as e:
            return [(("model", "weights"), str(e))]
        problem = _weights_mismatch(recipe, found, arch)
        if problem is not None:
            return [problem]
        arch = found if arch is None else arch
    problems = _vision_data_problems(recipe, arch)
    if arch is not None and recipe.data.max_length > arch.max_position_embeddings:
        problems.append((("data", "max_length"), f"expected at most the model's context of "
                         f"{arch.max_position_embeddings} tokens, got {recipe.data.max_length}"))
    return problems


def _vision_data_problems(recipe: schema.Recipe, arch: Architecture | None) -> list[Problem]:
    """Image data for a model known to have no vision encoder, and pan-and-scan for anything but a Gemma 3
    vision model."""
    if arch is None:
        return []
    problems = []
    for split in ("train", "eval"):
        source = getattr(recipe.data, split)
        if source is not None and source.format == "image_text" and arch.vision is None:
            problems.append((("data", split, "format"), "image_text rows hold images but the model has no vision "
                             "encoder (expected PaliGemma, or Gemma 3 4B and larger)"))
    if recipe.data.pan_and_scan and (arch.vision is None or arch.family != "gemma3"):
        problems.append((("data", "pan_and_scan"), "pan-and-scan crops images for Gemma 3 vision models only; "
                         "expected false for this model"))
    return problems


def _weights_mismatch(recipe: schema.Recipe, found: Architecture | None, stated: Architecture | None) -> Problem | None:
    """A problem when the decoder the recipe states (its preset / model.architecture) is not the one its
    weights compute (`found`); None when they agree or either is unknown."""
    if found is None or stated is None:
        return None
    if recipe.model.preset:
        key = "preset"
        stated_as = f"model.preset '{recipe.model.preset}'" + (" with model.architecture" if recipe.model.architecture
                                                               else "")
    else:
        key, stated_as = "architecture", "model.architecture"
    from gemma_tune.loading import architecture_mismatch

    problem = architecture_mismatch(found, stated, stated_as, recipe=True)
    return None if problem is None else (("model", key), problem)


def _looks_like_file(value: str) -> bool:
    """A data `path` that is clearly local (an extension, ./, ~, /) rather than a hub dataset name."""
    return (value.startswith((".", "/", "~")) or Path(value).suffix.lower() in
            {".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow"} or value.count("/") >= 2)


def _resolve_local(value: str, recipe_dir: Path, looks_local: bool) -> Path | bool | None:
    """An existing local path (absolute), False if it should be local and is missing, None if remote."""
    if is_remote(value):
        return None
    found = resolve_existing(value, relative_to=recipe_dir)
    if found is not None:
        return found
    return False if looks_local else None


# ---------------------------------------------------------------------------------------------------
def _describe(err: dict, raw: Any, root: type[BaseModel] = schema.Recipe) -> Problem:
    loc = tuple(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        known = _fields_at(root, loc[:-1])
        return loc, f"unknown key '{loc[-1]}'{_suggest(loc[-1], known)}"
    if kind == "missing":
        return loc, "required key is missing"
    expected = (err["msg"].replace("Input should be greater", "expected a value greater")
                .replace("Input should be less", "expected a value less")
                .replace("Input should be", "expected").replace("Value error, ", ""))
    if "input" in err and kind not in ("model_type",) and not isinstance(err["input"], (dict, list)):
        return loc, f"{expected}, got {err['input']!r}"
    return loc, expected


def _fields_at(model: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    """Names of the fields of the (nested) schema model at `loc`."""
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _model_in(field.annotation)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _suggest(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _config_error(problems: list[Problem], provenance: Provenance, origin: str) -> ConfigError:
    lines = []
    for path, message in problems:
        source = origin
        for depth in range(len(path), 0, -1):
            setters = [src for key, src in provenance.items() if key[:depth] == path[:depth]]
            if setters:
                source = setters[-1]
                break
        lines.append(f"  {_display(source)}: {'.'.join(path)}: {message}")
    return ConfigError(f"invalid recipe ({len(lines)} problem{'s' if len(lines) > 1 else ''}):\n" + "\n".join(lines))


def _display(source: str) -> str:
    """A source file relative to the working directory when it lies below it."""
    try:
        return str(Path(source).resolve().relative_to(Path.cwd()))
    except ValueError:
        return source
