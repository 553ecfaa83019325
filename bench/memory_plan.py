"""The memory plan (gemma_tune.plan) against measured peaks of the real trainer (JAX).

    python bench/memory_plan.py                 # every configuration of CONFIGS, one subprocess each (~10 min)
    python bench/memory_plan.py --only mid_lora_f32 --only dpo_lora_f32
    python bench/memory_plan.py --mesh          # also MESH_CONFIGS: data_parallel / fsdp on 8 virtual CPU devices
    python bench/memory_plan.py --list          # the configurations

Each configuration is `gemma_tune.run(recipe, overrides, backend="jax")` for one optimisation step (no eval,
no exports, no samples) in a subprocess of its own, with two measurements:

  xla  XLA's accounting of the compiled train step: a callback wraps `fit`'s train function so that its first
       call jits the trainer's `train_step` as Keras does (state donated; under a distribution the state's
       layouts kept), compiles it for the real state and batch, records `memory_analysis()` — argument +
       output − alias + temp bytes, per device (one partition of the SPMD program under a mesh) — and runs
       the step with that executable. What a device has to hold for the step.
  rss  the process's peak resident memory (VmHWM) after the step less its resident memory just before the
       model is built (VmRSS): the host's view, which also holds XLA's compiler, host copies of the initial
       weights and the data pipeline — meaningful for the larger models only.

The estimate is `plan_for_run(recipe, devices, None, platform=<the platform measured>).total()`: on a CPU, remat
as XLA:CPU schedules it (it saves nothing there) and 16-bit matmuls on float32 copies; on a GPU the flash
attention path where the trainer takes it. The accelerator plan (platform None) is printed beside it. A
table goes to stdout and one JSON line per configuration to bench/raw/memory_plan.jsonl (appended; --out).
Target: the estimate within 25% of XLA's figure for every configuration; exit status 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RAW = BENCH / "raw" / "memory_plan.jsonl"
TOLERANCE = 0.25

# A mid-size Gemma 3 shape on the bundled tiny tokenizer and data: large enough that activations dominate.
MID = ["model.architecture.hidden_size=256", "model.architecture.intermediate_size=1024",
       "model.architecture.num_kv_heads=1", "model.architecture.head_dim=64",
       "model.architecture.query_pre_attn_scalar=64", "model.architecture.num_layers=4",
       "train.batch_size=4", "data.max_length=256"]
GEMMA2 = ["model.architecture.family=gemma2", "model.architecture.use_qk_norm=false",
          "model.architecture.attn_logit_softcap=50.0", "model.architecture.final_logit_softcap=30.0",
          "model.architecture.sliding_window_pattern=2"]
QUICK = "recipes/quickstart.yaml"
LONG = "model.architecture.max_position_embeddings=32768"  # the tiny preset's context is 1024
# The quickstart on a real preset's architecture (random init, the tiny tokenizer and chat data).
PRESET = {"base": ["configs/data/tiny_chat.yaml"], "name": "memory_plan", "method": "sft",
          "model": {"preset": None, "tokenizer": "data/tiny/tokenizer.model", "dtype": "float32"},
          "lora": {"rank": 16, "alpha": 32}, "train": {"learning_rate": 1e-4}}
G270 = dict(PRESET, model={**PRESET["model"], "preset": "gemma3_270m"})
G1B = dict(PRESET, model={**PRESET["model"], "preset": "gemma3_1b", "architecture": {"num_layers": 3}})

# name: (recipe file or dict, overrides, devices)
CONFIGS: dict[str, tuple[str | dict, list[str], int]] = {
    "q_lora_f32": (QUICK, [], 1),
    "mid_lora_f32": (QUICK, MID, 1),
    "mid_lora_f32_remat": (QUICK, MID + ["train.remat=true"], 1),
    "mid_full_f32": (QUICK, MID + ["lora=null"], 1),
    "mid_full_bf16_remat": (QUICK, MID + ["lora=null", "model.dtype=bfloat16", "train.remat=true"], 1),
    "mid_lora_bf16_1x1024": (QUICK, MID + ["model.dtype=bfloat16", "train.batch_size=1", "data.max_length=1024"], 1),
    "mid_full_adafactor_accum2": (QUICK, MID + ["lora=null", "train.optimizer=adafactor", "train.grad_accum=2"], 1),
    "mid_qlora_int8_bf16": (QUICK, MID + ["model.dtype=bfloat16", "quantize=int8"], 1),
    "mid_gemma2_softcap_lora_f32": (QUICK, MID + GEMMA2, 1),
    "dpo_lora_f32": ("recipes/quickstart_dpo.yaml", [], 1),
    "reward_lora_f32": ("recipes/quickstart_dpo.yaml", ["method=reward", "preference=null"], 1),
    "grpo_lora_f32": ("recipes/quickstart_grpo.yaml", [], 1),
    "paligemma_lora_f32": ("recipes/paligemma_quickstart.yaml", [], 1),
    "g270m_lora_f32_2x256": (G270, ["train.batch_size=2", "data.max_length=256"], 1),
    "g270m_full_bf16_remat_2x256": (G270, ["train.batch_size=2", "data.max_length=256", "lora=null",
                                           "model.dtype=bfloat16", "train.remat=true"], 1),
    "g1b_3layers_lora_bf16_1x512": (G1B, ["train.batch_size=1", "data.max_length=512", "model.dtype=bfloat16"], 1),
    # attention "auto" from 2048 tokens on: tiles of 1024 queries, no [T, T] scores kept
    "mid_lora_f32_1x8192_chunked": (QUICK, MID + ["train.batch_size=1", "data.max_length=8192", LONG], 1),
    "mid_gemma2_softcap_lora_f32_1x8192_chunked": (QUICK, MID + GEMMA2 + ["train.batch_size=1",
                                                                         "data.max_length=8192", LONG], 1),
}
MESH_CONFIGS: dict[str, tuple[str | dict, list[str], int]] = {
    "mid_lora_f32_dp8": (QUICK, MID + ["train.batch_size=8", "distribution.mode=data_parallel"], 8),
    "mid_full_f32_fsdp8": (QUICK, MID + ["train.batch_size=8", "lora=null", "distribution.mode=fsdp"], 8),
    "mid_lora_bf16_fsdp2x4": (QUICK, MID + ["train.batch_size=8", "model.dtype=bfloat16", "distribution.mode=fsdp",
                                            "distribution.mesh={batch: 2, model: 4}"], 8),
}
RUN_OVERRIDES = ["train.max_steps=1", "train.warmup_steps=0", "train.eval_every=null", "data.eval=null",
                 "data.eval_fraction=0.0", "train.sample_prompts=[]", "export.formats=[]"]


# ---- one configuration, in its own process ---------------------------------------------------------------
def _status_bytes(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(recipe: str | dict, overrides: list[str]) -> dict:
    """Run the recipe for one step and return {xla: memory analysis, rss_before_model, rss_peak}."""
    import jax
    import keras

    import gemma_tune
    import gemma_tune.train.build as build

    marks: dict = {}
    build_for_recipe = build.build_for_recipe

    def marked_build(recipe_):
        marks["rss_before_model"] = _status_bytes("VmRSS")
        return build_for_recipe(recipe_)

    build.build_for_recipe = marked_build  # loop.py imports it from the module when a run starts

    class CompiledStepMemory(keras.callbacks.Callback):
        """Lowers and compiles the trainer's train step on the first (state, batch) `fit` passes it."""

        def on_train_begin(self, logs=None):
            model, train_function = self.model, self.model.train_function

            def measured(state, iterator):
                if "xla" in marks:
                    return train_function(state, iterator)
                data = next(iterator)
                compiled = _compiled_step(jax, keras, model, state, data)
                marks["xla"] = _memory_analysis(compiled)
                return compiled(state, data)  # the step itself: compiled once, not again by fit

            model.train_function = measured

        def on_train_batch_end(self, batch, logs=None):
            jax.block_until_ready(self.model._jax_state)
            marks["rss_peak"] = _status_bytes("VmHWM")

    with tempfile.TemporaryDirectory() as out:
        gemma_tune.run(recipe, [*overrides, *RUN_OVERRIDES, f"output_dir={out}/run"], backend="jax",
                       callbacks=[CompiledStepMemory()])
    marks["platform"] = jax.default_backend()
    return marks


def _compiled_step(jax, keras, model, state, data):
    """The trainer's train step jitted as Keras' make_train_function does (the state donated and, under a
    distribution, kept in its layout), lowered and compiled for this state and batch."""
    out_shardings = None
    if keras.distribution.distribution() is not None:
        out_shardings = (None, jax.tree_util.tree_map(lambda value: value.sharding, state))
    return jax.jit(model.train_step, donate_argnums=0, out_shardings=out_shardings).lower(state, data).compile()


def _memory_analysis(compiled) -> dict:
    analysis = compiled.memory_analysis()
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
    figures = {key.removesuffix("_size_in_bytes"): int(getattr(analysis, key)) for key in keys}
    figures["peak"] = figures["argument"] + figures["output"] - figures["alias"] + figures["temp"]
    return figures


# ---- the estimate ----------------------------------------------------------------------------------------
def estimated(recipe_path: str | dict, overrides: list[str], devices: int, platform: str) -> dict:
    """The plan of the configuration on the measured platform (`plan_for_run(..., platform=...)`: on a CPU,
    remat as XLA:CPU schedules it and 16-bit matmuls on float32 copies; on a GPU the flash path where the
    trainer takes it), and the accelerator plan (platform None) beside it."""
    from gemma_tune.config import load_recipe
    from gemma_tune.plan import plan_for_run

    recipe = load_recipe(recipe_path, [*overrides, *RUN_OVERRIDES])
    plan = plan_for_run(recipe, devices, None, platform=platform)
    accelerator = plan_for_run(recipe, devices, None)
    rows = {name: {"off": off, "on": on} for name, off, on in plan.rows()}
    return {"total": plan.total(), "accelerator_total": accelerator.total(), "platform": platform,
            "remat": recipe.train.remat, "mesh": plan.mesh.describe(), "params": plan.params,
            "trainable": plan.trainable, "components": rows, "summary": plan.summary_line()}


def run_child(name: str) -> dict:
    recipe, overrides, devices = {**CONFIGS, **MESH_CONFIGS}[name]
    env = dict(os.environ, KERAS_BACKEND="jax")
    if devices > 1:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    started = time.monotonic()
    done = subprocess.run([sys.executable, __file__, "--child", name], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    seconds = time.monotonic() - started
    result = next((json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines()
                   if line.startswith("RESULT ")), None)
    if result is None:
        raise RuntimeError(f"{name}: no result (exit {done.returncode})\n{done.stderr[-3000:]}")
    estimate = estimated(recipe, overrides, devices, result["platform"])
    xla, rss = result["xla"]["peak"], result["rss_peak"] - result["rss_before_model"]
    return {"name": name, "recipe": recipe if isinstance(recipe, str) else "bench/memory_plan.py " + name,
            "overrides": overrides, "devices": devices, "estimate": estimate,
            "measured": result, "xla_peak": xla, "rss_above_baseline": rss,
            "ratio_xla": estimate["total"] / xla, "ratio_rss": estimate["total"] / rss, "seconds": round(seconds, 1),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python bench/memory_plan.py --only " + name}


def mib(value: float) -> str:
    return f"{value / 2 ** 20:,.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| configuration | mesh | params | estimate MiB | XLA peak MiB | estimate / XLA | RSS above baseline MiB "
             "| estimate / RSS | accelerator plan MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        e = row["estimate"]
        shown = mib(e["total"])
        lines.append(f"| {row['name']} | {e['mesh']} | {e['params'] / 1e6:,.1f}M | {shown} | "
                     f"{mib(row['xla_peak'])} | {row['ratio_xla']:.2f} | {mib(row['rss_above_baseline'])} | "
                     f"{row['ratio_rss']:.2f} | {mib(e['accelerator_total'])} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=None, metavar="NAME", help="configurations to run")
    parser.add_argument("--mesh", action="store_true", help="also the data_parallel and fsdp configurations")
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    parser.add_argument("--out", type=Path, default=RAW,
                        help=f"JSON lines appended here (default {RAW.relative_to(ROOT)})")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        recipe, overrides, _ = {**CONFIGS, **MESH_CONFIGS}[args.child]
        print("RESULT " + json.dumps(measure(recipe, overrides)), flush=True)
        return 0
    names = args.only or list(CONFIGS) + (list(MESH_CONFIGS) if args.mesh else [])
    if args.list:
        for name in {**CONFIGS, **MESH_CONFIGS}:
            print(name)
        return 0
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        row = run_child(name)
        rows.append(row)
        with args.out.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: estimate {mib(row['estimate']['total'])} MiB, XLA {mib(row['xla_peak'])} MiB "
              f"({row['ratio_xla']:.2f}), RSS above baseline {mib(row['rss_above_baseline'])} MiB, "
              f"{row['seconds']:.0f} s", flush=True)
    print(table(rows))
    off = [r["name"] for r in rows if abs(r["ratio_xla"] - 1) > TOLERANCE]
    print(f"outside ±{TOLERANCE:.0%} of XLA's peak: {', '.join(off) or 'none'}")
    return 1 if off else 0


if __name__ == "__main__":
    sys.exit(main())
