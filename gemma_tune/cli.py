"""The `gemma-tune` command line. Each subcommand is a thin shell over the Python API.

User errors (a bad recipe, a missing file, bad data) print one clear message and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys

from gemma_tune import __version__
from gemma_tune.errors import EXIT_USER_ERROR, UserError, environment_error

EPILOG = """examples:
  gemma-tune list
  gemma-tune init my-project
  gemma-tune env --backend torch
  gemma-tune keys train
  gemma-tune validate recipes/quickstart.yaml
  gemma-tune plan recipes/quickstart.yaml distribution.mode=fsdp --devices 8 --device "TPU v5e"
  gemma-tune run recipes/quickstart.yaml --backend torch train.max_steps=50 lora.rank=8
  gemma-tune export runs/quickstart --format safetensors --out exports/quickstart-hf
  gemma-tune generate runs/quickstart --prompt "What is 2 plus 3?"
  gemma-tune score runs/reward --data pairs.jsonl
  gemma-tune repro tests/golden/quickstart --steps 6
"""


IMAGES_HELP = """images (--image PATH, repeatable):
  one --prompt:                         every image goes with it, in the order given
  several prompts and one --image:      that image goes with each prompt
  several prompts, as many --image:     the i-th image goes with the i-th prompt
  any other count is an error (the Python API, generate(..., images=[[...], ...]), takes any lists per prompt).
  PaliGemma: a prompt's images come first, then <bos>, the prompt and "\\n" (the prompt is a prefix).
  Gemma 3: each <start_of_image> in a prompt places one of its images (as many markers as images), a prompt
  without markers gets its images before its text.
example:
  gemma-tune generate runs/paligemma --image cat.png --prompt "caption en" --prompt "answer en what is this?"
"""


def _add_backend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("jax", "tensorflow", "torch"), default=None,
                        help="Keras backend (wins over the recipe's `backend:` and KERAS_BACKEND; default jax)")


def _add_model_loading(parser: argparse.ArgumentParser) -> None:
    """How `generate` and `score` load MODEL: its tokenizer, compute dtype, a preset it must match, the backend."""
    parser.add_argument("--tokenizer", default=None, help="a SentencePiece .model file (default: beside the weights)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument("--preset", default=None, help="a configs/models preset the checkpoint must match")
    _add_backend(parser)


def _add_recipe(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe YAML file (see recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides typed by the recipe schema, e.g. train.learning_rate=1e-4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-tune", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Fine-tune Gemma models with Keras 3 on JAX, TensorFlow or PyTorch, driven by YAML recipes.")
    parser.add_argument("--version", action="version", version=f"gemma-tune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a recipe and print what it would run; builds nothing",
                       description="Compose, override and validate a recipe. Every problem is reported with "
                                   "the file, the key and what was expected; exit code 2 if any.")
    _add_recipe(p)
    _add_backend(p)
    p.set_defaults(handler=_validate)

    p = sub.add_parser("plan", help="estimate a recipe's memory per device and the devices it fits; builds nothing",
                       description="Estimate, from arithmetic alone (no model built, no backend started), the "
                                   "parameters, trainable parameters and memory per device of a recipe's training "
                                   "step — weights, gradients, optimizer state, activations with and without remat, "
                                   "the loss chunk — on the recipe's mesh, and which accelerators it fits "
                                   "(gemma_tune.plan). Exit code 2 on a bad recipe.")
    _add_recipe(p)
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="devices the run uses (default: distribution.devices, else the product of distribution.mesh, "
                        "else 1)")
    p.add_argument("--device", default=None, metavar="NAME",
                   help="the accelerator to check, e.g. H100, 'A100 40 GB', 'TPU v5e': its memory decides "
                        "distribution.mode auto and the warning")
    p.add_argument("--platform", choices=("gpu", "tpu", "cpu"), default=None,
                   help="where the run computes (default: the --device's, else an accelerator with dense attention): "
                        "gpu plans the cuDNN flash attention path where the trainer takes it (bfloat16, text, no "
                        "soft-cap); cpu plans XLA:CPU, where remat saves nothing and 16-bit matmuls use float32 copies")
    p.set_defaults(handler=_plan)

    p = sub.add_parser("run", help="train (and export) as a recipe says",
                       description="Run a recipe: the run directory (output_dir) receives the resolved "
                                   "recipe, a manifest, logs, metrics, checkpoints and exports. A run "
                                   "directory with a checkpoint is resumed automatically.")
    _add_recipe(p)
    _add_backend(p)
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="resume", action="store_true", default=None,
                        help="require a checkpoint in the run directory and continue from it")
    resume.add_argument("--no-resume", dest="resume", action="store_false",
                        help="start afresh even if the run directory has a checkpoint")
    p.set_defaults(handler=_run)

    p = sub.add_parser("export", help="write a model as a keras archive/preset, HF safetensors, a PEFT adapter "
                                      "or GGUF (llama.cpp, Ollama)",
                       description="Load SOURCE — a run directory (its latest checkpoint), a local Hugging Face "
                                   "checkpoint or keras-hub preset, a gemma_tune export, hf://ORG/NAME or "
                                   "kaggle://OWNER/MODEL/FRAMEWORK/VARIATION — and write it in one format. The "
                                   "output directory appears only when complete.")
    p.add_argument("source", help="what to export (anything gemma_tune.load_model accepts)")
    p.add_argument("--format", dest="fmt", required=True, choices=("keras", "safetensors", "peft", "gguf"),
                   help="keras: .keras archive + keras-hub preset; safetensors: Hugging Face checkpoint; "
                        "peft: the LoRA adapters alone; gguf: model.gguf for llama.cpp + an Ollama Modelfile")
    p.add_argument("--quantize", default=None, metavar="TYPE",
                   help="gguf: f32 | f16 | bf16 | q8_0 | q4_0 (default f32; K-quants: llama.cpp's llama-quantize "
                        "on an f16 export); keras, safetensors: int8 | int4 (default: float weights)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="the tokenizer to export with (a SentencePiece .model file or a directory holding one; "
                        "default: beside the weights; gguf needs one)")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent unless --force; never "
                                                "the source, inside it or around it, nor inside a run directory "
                                                "except below RUN/exports/)")
    merge = p.add_mutually_exclusive_group()
    merge.add_argument("--merge-lora", dest="merge_lora", action="store_true", default=True,
                       help="fold LoRA adapters into the weights, exactly in float32 (default)")
    merge.add_argument("--no-merge-lora", dest="merge_lora", action="store_false",
                       help="export the base weights without the adapters")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="dtype of the exported weights (default: float32, the dtype it is loaded in)")
    p.add_argument("--preset", default=None, help="a configs/models preset the checkpoint must match")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--base-model", default=None, metavar="NAME_OR_PATH",
                   help="peft: the base model the adapter applies to (hub id ORG/NAME, hf://ORG/NAME or a local "
                        "directory; default: what SOURCE was trained from, when known)")
    _add_backend(p)
    p.set_defaults(handler=_export)

    p = sub.add_parser("generate", help="sample completions from a model with a KV cache",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Load MODEL (anything `gemma-tune export` accepts as SOURCE) and complete each\n"
                                   "--prompt, wrapped in Gemma's chat template unless --raw (PaliGemma prompts are\n"
                                   "never wrapped: e.g. --prompt 'caption en'). Greedy by default.",
                       epilog=IMAGES_HELP)
    p.add_argument("model", help="a run directory, HF checkpoint or keras-hub preset dir, an export, hf://, kaggle://")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="an image file for a vision model (PaliGemma, Gemma 3 4B+); repeat for several (how images "
                        "go with prompts: below)")
    p.add_argument("--pan-and-scan", action="store_true",
                   help="Gemma 3: add each image's pan-and-scan crops (large or non-square images), as "
                        "data.pan_and_scan does in training")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--raw", action="store_true",
                   help="continue the prompt text as is (no chat template; PaliGemma never uses one)")
    _add_model_loading(p)
    p.set_defaults(handler=_generate)

    p = sub.add_parser("score", help="a reward model's score of each row of a data file",
                       description="Load MODEL (a reward run directory, or an export of one: safetensors or peft) and "
                                   "score each row of --data, rendered with Gemma's chat template as training does: "
                                   "prompt + completion (or response) rows or messages ending with a model turn, one "
                                   "score a line; preference rows (prompt, chosen, rejected): the chosen and the "
                                   "rejected score a line, tab-separated, then the accuracy (share of pairs with "
                                   "chosen > rejected).")
    p.add_argument("model", help="a reward run directory, its safetensors or peft export, hf://, kaggle://")
    p.add_argument("--data", required=True, help="a jsonl/json/parquet/csv file (or a hub dataset ORG/NAME)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--max-length", type=int, default=None,
                   help="cut longer sequences to their first N tokens (default: the model's context)")
    _add_model_loading(p)
    p.set_defaults(handler=_score)

    p = sub.add_parser("repro", help="re-run a stored run and compare its metrics step by step",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Re-run RUN_DIR's resolved recipe (recipe.yaml) in a fresh directory, exports off,\n"
                                   "and compare every recorded metric (metrics.jsonl: loss, eval and method metrics,\n"
                                   "learning rate; not timing or memory) step by step. First, before any compute,\n"
                                   "manifest.json is checked against this environment (package versions, CPU,\n"
                                   "devices, backend, seed, data and tokenizer fingerprints): each difference is a\n"
                                   "warning, with --strict an error. Recorded paths missing here are looked up by\n"
                                   "their trailing parts under the current directory, RUN_DIR's parents and the\n"
                                   "bundled files. Exit 0: within tolerance; 1: outside it (or, with --strict, a\n"
                                   "different environment); 2: bad input.",
                       epilog="tolerance (relative difference = |now - recorded| / max(|recorded|, 1e-12)):\n"
                              "  rtol 0 (bit-identical) when the backend, the CPU model, the devices and every\n"
                              "  package version are the recorded ones and the devices are CPUs; otherwise\n"
                              "  (another backend, version or CPU, or an accelerator) 1e-3. The report says\n"
                              "  which applies and why; --rtol always wins.\n"
                              "example:\n"
                              "  gemma-tune repro tests/golden/quickstart --steps 6 --backend torch")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory: recipe.yaml, manifest.json, metrics.jsonl")
    p.add_argument("--steps", type=int, default=None,
                   help="re-run the first N optimisation steps (the schedule unchanged; default: every recorded step)")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance (default: 0 or 1e-3, above)")
    p.add_argument("--strict", action="store_true",
                   help="an environment difference is an error: exit 1 before anything is re-run")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="run directory of the re-run, kept (default: a temporary one, removed)")
    p.add_argument("--all", action="store_true", help="print every compared value (default: loss and failures)")
    p.add_argument("--backend", choices=("jax", "tensorflow", "torch"), default=None,
                   help="Keras backend of the re-run (default: the recorded one)")
    p.set_defaults(handler=_repro)

    p = sub.add_parser("keys", help="every recipe key with its type, default and meaning",
                       description="Print the recipe schema: each key's dotted path, type, default and meaning. "
                                   "SECTION narrows it to a section (train, data, lora, ...) or a dotted prefix.")
    p.add_argument("section", nargs="?", default=None, help="a section or dotted key prefix (default: all)")
    p.set_defaults(handler=_keys)

    p = sub.add_parser("list", help="list the bundled recipes and model presets",
                       description="List recipes/ and configs/models/ presets with a line on each.")
    p.set_defaults(handler=_list)

    p = sub.add_parser("init", help="start a project: a recipe and the data it trains on, in DIR",
                       description="Copy a bundled recipe (its base files merged in) and the bundled data it "
                                   "names into DIR: DIR/recipe.yaml, DIR/data/. Then: cd DIR && gemma-tune run "
                                   "recipe.yaml. Nothing already in DIR is overwritten.")
    p.add_argument("directory", help="the project directory (created if needed)")
    p.add_argument("--recipe", default="quickstart",
                   help="the bundled recipe to start from (gemma-tune list; default quickstart)")
    p.set_defaults(handler=_init)

    p = sub.add_parser("env", help="the backend, its devices and the library versions gemma_tune would use",
                       description="Print the Keras backend (as `run` chooses it: --backend, else KERAS_BACKEND, "
                                   "else jax), the devices it sees with their memory, the host and the versions "
                                   "of keras, keras-hub, jax, torch, tensorflow and gemma_tune.")
    _add_backend(p)
    p.set_defaults(handler=_env)
    return parser


def _validate(args: argparse.Namespace) -> int:
    import os

    from gemma_tune.config import load_recipe
    from gemma_tune.config.validate import check_backend_support, known_architecture

    recipe = load_recipe(args.recipe, args.overrides)
    backend = args.backend or recipe.backend or os.environ.get("KERAS_BACKEND") or "jax"  # as `run` chooses
    check_backend_support(recipe, backend)
    arch = known_architecture(recipe)
    shape = (f"{arch.family}, {arch.num_layers} layers, hidden {arch.hidden_size}" if arch is not None
             else "architecture read from the checkpoint once downloaded")
    name = recipe.model.preset or ("custom" if recipe.model.architecture else "from the checkpoint")
    lora = (f"LoRA rank {recipe.lora.rank} on {','.join(recipe.lora.targets)}" if recipe.lora
            else "full fine-tuning")
    length = (f"{recipe.train.max_steps} steps" if recipe.train.max_steps else f"{recipe.train.epochs:g} epochs")
    print(f"{args.recipe}: OK")
    print(f"  run      {recipe.name} -> {recipe.output_dir} (backend {backend})")
    print(f"  model    {name} ({shape}) weights={recipe.model.weights or 'random init'} dtype={recipe.model.dtype}")
    print(f"  method   {recipe.method}, {lora}" + (f", base quantised {recipe.quantize}" if recipe.quantize else ""))
    print(f"  data     {recipe.data.train.format}: {recipe.data.train.path} (max_length {recipe.data.max_length}, "
          f"packing {_packing(recipe)})")
    print(f"  train    {length}, batch {recipe.train.batch_size} x accum {recipe.train.grad_accum}, "
          f"{recipe.train.optimizer} lr {recipe.train.learning_rate:g} {recipe.train.schedule}")
    section = recipe.distribution
    if section.mode != "none":
        mesh = section.mesh or {}
        print(f"  devices  distribution {section.mode}"
              + (f", mesh batch {mesh.get('batch', 1)} × model {mesh.get('model', 1)}" if mesh else ", every device")
              + (f", the first {section.devices}" if section.devices else ""))
    if recipe.data.train.format == "prompt":
        from gemma_tune.methods import method_options

        o = method_options(recipe)
        rewards = ", ".join(r if isinstance(r, str) else (r.name or f"model {r.model}") for r in recipe.rl.rewards)
        print(f"  rl       {o['num_generations']} completions per prompt of at most {o['max_completion_length']} "
              f"tokens, temperature {o['temperature']:g}; rewards {rewards}")
    if recipe.export.formats:
        print(f"  export   {', '.join(recipe.export.formats)}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import math

    from gemma_tune.config import load_recipe
    from gemma_tune.errors import ConfigError
    from gemma_tune.plan import find_device, plan_for_run

    if args.devices is not None and args.devices < 1:
        raise ConfigError("--devices must be >= 1")
    recipe = load_recipe(args.recipe, args.overrides)
    device = find_device(args.device) if args.device else None
    section = recipe.distribution
    count = args.devices or section.devices or (math.prod(section.mesh.values()) if section.mesh else 1)
    platform = args.platform or (device.platform if device else None)
    plan = plan_for_run(recipe, count, device.memory_bytes if device else None, platform=platform)
    print(plan.report(device))
    return 0


def _packing(recipe) -> str:
    if recipe.data.train.format == "prompt":
        return "off: prompts, completed in the run"
    if recipe.data.train.format == "preference":
        return "off: one pair per row"
    if recipe.data.train.format == "image_text":
        return "off: rows with images are never packed"
    return "on" if recipe.data.packing else "off"


def _run(args: argparse.Namespace) -> int:
    from gemma_tune.runner import run

    result = run(args.recipe, args.overrides, backend=args.backend, resume=args.resume)
    print(f"run directory: {result.run_dir}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from gemma_tune.backend import select_backend

    select_backend(args.backend)
    from gemma_tune.checkpoints.sources import resolve_source
    from gemma_tune.export import check_output, check_quantize, export_model, find_tokenizer
    from gemma_tune.export.gguf import NO_TOKENIZER
    from gemma_tune.loading import load_model

    check_quantize(args.fmt, args.quantize, where="--quantize")
    source_dir = resolve_source(args.source)
    check_output(args.out, force=args.force, source_dir=source_dir)  # before the (long) loading
    tokenizer = find_tokenizer(args.source, args.tokenizer)
    if tokenizer is None and args.fmt == "gguf":
        raise UserError(NO_TOKENIZER, where=args.source)
    model = load_model(args.source, preset=args.preset)
    out = export_model(model, tokenizer, args.out, args.fmt, merge_lora=args.merge_lora, dtype=args.dtype,
                       force=args.force, base_model=args.base_model, source_dir=source_dir, quantize=args.quantize,
                       sampling=_export_sampling(source_dir))
    print(f"exported {args.source} as {args.fmt} -> {out}")
    return 0


def _export_sampling(source_dir) -> dict | None:
    """A run directory's sampling settings for a GGUF export's Modelfile (None elsewhere: Gemma's defaults)."""
    from gemma_tune.export.modelfile import sampling_defaults
    from gemma_tune.loading import enclosing_run_dir, run_recipe

    run = enclosing_run_dir(source_dir)
    return sampling_defaults(run_recipe(run)) if run is not None else None


def _prompt_images(prompts: list[str], images: list[str] | None) -> list[list[str]] | None:
    """Each prompt's --image paths, by the rule of IMAGES_HELP."""
    from gemma_tune.errors import ConfigError

    if not images:
        return None
    if len(prompts) == 1:
        return [list(images)]
    if len(images) == 1:
        return [list(images) for _ in prompts]
    if len(images) == len(prompts):
        return [[image] for image in images]
    raise ConfigError(f"{len(images)} --image for {len(prompts)} --prompt: give one image (it goes with every "
                      "prompt), one image per prompt, or a single prompt (it gets every image)")


def _generate(args: argparse.Namespace) -> int:
    from gemma_tune.backend import select_backend

    select_backend(args.backend)
    from gemma_tune.data.images import ImageError, check_image_value
    from gemma_tune.errors import CheckpointError, ConfigError
    from gemma_tune.generate import generate
    from gemma_tune.loading import load_model_and_tokenizer
    from gemma_tune.vision_prompt import NO_VISION, VisionPromptError

    if args.max_new_tokens < 1 or args.temperature < 0 or (args.top_k is not None and args.top_k < 1) or (
            args.top_p is not None and not 0 < args.top_p <= 1):
        raise ConfigError("--max-new-tokens and --top-k must be >= 1, --temperature >= 0, --top-p in (0, 1]")
    images = _prompt_images(args.prompt, args.image)
    try:
        for path in args.image or ():  # before the (long) loading: a missing file is reported at once
            check_image_value(path, None)
    except ImageError as e:
        raise UserError(str(e)) from e
    model, tokenizer = load_model_and_tokenizer(args.model, preset=args.preset, dtype=args.dtype,
                                                tokenizer=args.tokenizer)
    from gemma_tune.models import RewardModel

    if isinstance(model, RewardModel):
        raise CheckpointError("a reward model scores sequences (gemma-tune score), it does not generate",
                              where=args.model)
    if images and model.architecture.vision is None:
        raise CheckpointError(f"--image given, but {NO_VISION}", where=args.model)
    try:
        completions = generate(model, tokenizer, args.prompt, images=images, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                               chat=False if args.raw else None, pan_and_scan=args.pan_and_scan)
    except (ImageError, VisionPromptError) as e:
        raise UserError(str(e)) from e
    for b, (prompt, completion) in enumerate(zip(args.prompt, completions)):
        shown = f" [{', '.join(images[b])}]" if images else ""
        print(f"### {prompt}{shown}\n{completion}\n")
    return 0


def _score(args: argparse.Namespace) -> int:
    from gemma_tune.backend import select_backend

    select_backend(args.backend)
    from gemma_tune.errors import ConfigError
    from gemma_tune.scoring import score

    if args.batch_size < 1 or (args.max_length is not None and args.max_length < 2):
        raise ConfigError("--batch-size must be >= 1 and --max-length >= 2")
    result = score(args.model, args.data, batch_size=args.batch_size, max_length=args.max_length,
                   tokenizer=args.tokenizer, dtype=args.dtype, preset=args.preset)
    if result.scores is not None:
        print("\n".join(f"{value:.6f}" for value in result.scores))
        return 0
    print("\n".join(f"{chosen:.6f}\t{rejected:.6f}" for chosen, rejected in zip(result.chosen, result.rejected)))
    right = sum(chosen > rejected for chosen, rejected in zip(result.chosen, result.rejected))
    print(f"accuracy {result.accuracy:.6f} ({right} of {len(result.chosen)} pairs scored chosen > rejected)")
    return 0


def _repro(args: argparse.Namespace) -> int:
    from gemma_tune.reproduce import repro, report

    result = repro(args.run_dir, steps=args.steps, rtol=args.rtol, backend=args.backend, strict=args.strict,
                   out=args.out)
    print(report(result, all_rows=args.all))
    return 0 if result.passed else 1


def _keys(args: argparse.Namespace) -> int:
    from gemma_tune.config.keys import describe_keys

    print(describe_keys(args.section))
    return 0


def _list(args: argparse.Namespace) -> int:
    from gemma_tune.config.presets import RECIPES_DIR, preset_description, preset_names

    print("recipes:")
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        first = next((line.lstrip("# ").strip() for line in path.read_text(encoding="utf-8").splitlines()
                      if line.startswith("#")), "")
        print(f"  {path.relative_to(RECIPES_DIR.parent)!s:<40} {first}")
    print("model presets (configs/models/):")
    for name in preset_names():
        print(f"  {name:<22} {preset_description(name)}")
    return 0


def _init(args: argparse.Namespace) -> int:
    from gemma_tune.starter import init_project

    written = init_project(args.directory, args.recipe)
    print(f"wrote {written} and its data in {written.parent / 'data'}")
    print(f"next: cd {written.parent} && gemma-tune run {written.name}")
    return 0


def _env(args: argparse.Namespace) -> int:
    from gemma_tune.backend import select_backend
    from gemma_tune.environment import report

    print("\n".join(report(select_backend(args.backend))))
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; `key=value` overrides may also follow options
    (`gemma-tune run RECIPE --backend torch train.max_steps=50`), which argparse alone rejects."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return args.handler(args)
    except UserError as e:
        print(f"gemma-tune: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:
        sys.stderr.close()
        return 0
    except OSError as e:  # a full or read-only disk, a path that is a file: the user's to fix, no traceback
        problem = environment_error(e)
        if problem is None:
            raise
        print(f"gemma-tune: error: {problem}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("gemma-tune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
