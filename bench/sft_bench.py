"""SFT training throughput, peak memory and MFU: gemma_tune's trainer next to keras-hub's Gemma3CausalLM.

    python bench/sft_bench.py --preset gemma3_1b --batch 4 --length 2048 --dtype bfloat16 \
        --lora-rank 16 --lora-targets q,v --steps 10 --warmup 3          # LoRA (default), both systems
    python bench/sft_bench.py --preset gemma3_1b --full ...             # full fine-tuning
    python bench/sft_bench.py --preset gemma3_1b --quantize int4 ...    # QLoRA (int8 or int4 base)
    python bench/sft_bench.py --preset gemma3_1b --arch hidden_size=256 --arch num_layers=4 ...

Each system trains in its own subprocess (so each peak memory is its own; KERAS_BACKEND from
--backend, XLA_PYTHON_CLIENT_PREALLOCATE=false) for `warmup + steps` steps on the same packed batches
of random tokens (bench/workload.py); the last `steps` are timed (bench/systems.py). Each process
prints one JSON line; this script prints them and a side-by-side table with ours / keras-hub ratios,
and appends the lines to --out when given.

tokens/s = batch·length·steps / seconds. TFLOP/s and MFU use 4N + 2N_trainable + attention per token
(bench/workload.py); "model TFLOP/s" is the anchors' 6N (full) / 4N (LoRA). MFU needs a known peak:
the accelerator's dense bf16 rate from gemma_tune.train.measure, or --peak-tflops; on CPU only TFLOP/s.
Peak memory: the accelerator allocator's peak where the backend reports one (JAX memory_stats,
torch.cuda.max_memory_allocated, TF get_memory_info), else the process's peak RSS (host).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path


BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# ours' variants: the same trainer with one option set (a column each, beside "ours" and keras-hub in one run)
OURS_VARIANTS = {"ours": {}, "ours-eager": {"jit": False}, "ours-compiled": {"jit": True},
                 "ours-dense": {"attention": "fused"}, "ours-chunked": {"attention": "chunked"},
                 "ours-flex": {"attention": "flex"}}
SYSTEMS = (*OURS_VARIANTS, "keras-hub")
DEFAULT_SYSTEMS = ("ours", "keras-hub")
ERROR_LINE = re.compile(r"^\s*[\w.]*(Error|Exception|Exhausted)\b")  # "ValueError: …", "XlaRuntimeError: …"
RATIOS = ("tokens_per_s", "step_s_median", "cpu_s_per_step", "peak_memory_gib", "peak_memory_above_baseline_gib")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gemma3_1b", help="configs/models/<preset>.yaml")
    p.add_argument("--arch", action="append", default=[], metavar="KEY=VALUE",
                   help="override an Architecture field (YAML value), repeatable")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=None, help="default: the rank (scale 1, as keras-hub)")
    p.add_argument("--lora-targets", default="q,v", help="comma-separated: q,k,v,o,gate,up,down")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="QLoRA: the base's projections quantised by Keras (int4 per channel) before the adapters")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16",
                   help="the recipe's model.dtype; ours maps it as the trainer does (bfloat16 -> "
                        "mixed_bfloat16), keras-hub gets it as its dtype (bfloat16: bf16 weights, as the anchor)")
    p.add_argument("--keras-hub-dtype", default=None, help="keras-hub's dtype policy instead (e.g. mixed_bfloat16)")
    p.add_argument("--ours-policy", default=None, help="ours' Keras dtype policy instead of the trainer's mapping")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--jit", default="auto", choices=("auto", "true", "false"), help="compile(jit_compile=…)")
    p.add_argument("--remat", action="store_true", help="ours: rematerialise each block (train.remat)")
    p.add_argument("--loss-chunk-size", type=int, default=1024, help="ours: train.loss_chunk_size")
    p.add_argument("--attention", default="auto", choices=("auto", "plain", "fused", "chunked", "flex"),
                   help="ours: attention path")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help="comma-separated subset of: " + ", ".join(SYSTEMS) + " (ours-eager / ours-compiled: --jit "
                        "false / true for ours alone; ours-dense / ours-chunked / ours-flex: --attention fused / "
                        "chunked / flex)")
    p.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "jax"), choices=("jax", "tensorflow", "torch"))
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by device name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1,
                   help="run the systems this many times, alternating (noisy machines); the table shows "
                        "each system's run of median tokens/s")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per system")
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    p.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    return p


def config(args) -> dict:
    targets = [t for t in args.lora_targets.split(",") if t]
    jit = {"auto": "auto", "true": True, "false": False}[args.jit]
    return {"full": args.full, "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha or float(args.lora_rank),
            "lora_targets": targets, "quantize": args.quantize, "batch": args.batch, "length": args.length, "dtype": args.dtype,
            "keras_hub_dtype": args.keras_hub_dtype, "ours_policy": args.ours_policy, "steps": args.steps,
            "warmup": args.warmup, "jit": jit, "remat": args.remat, "loss_chunk_size": args.loss_chunk_size,
            "attention": args.attention, "peak_tflops": args.peak_tflops, "seed": args.seed,
            "systems": [s for s in args.systems.split(",") if s]}


def architecture(args):
    from workload import architecture as preset_architecture  # bench/ is the script's directory

    return preset_architecture(args.preset, args.arch)


def child(args) -> None:
    """Runs one system in this process and prints its JSON line."""
    sys.path[:0] = [str(BENCH), str(ROOT)]
    from systems import run_system

    record = run_system(args.child, {**config(args), **OURS_VARIANTS.get(args.child, {})}, architecture(args))
    record["preset"] = args.preset
    record["arch_overrides"] = args.arch
    print("BENCH " + json.dumps(record), flush=True)


def run_child(system: str, argv: list[str], backend: str, timeout: float | None) -> dict:
    """Runs `system` in a subprocess; its record, or {"system", "error"} when it produced none."""
    env = dict(os.environ, KERAS_BACKEND=backend, XLA_PYTHON_CLIENT_PREALLOCATE="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", system]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"system": system, "backend": backend, "error": f"no result within {timeout:g} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("BENCH "):
            return json.loads(line[len("BENCH "):])
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    sys.stderr.write(f"--- {system} failed (exit {done.returncode}):\n" + "\n".join(lines[-15:]) + "\n")
    errors = [line.strip() for line in lines if ERROR_LINE.match(line)]
    return {"system": system, "backend": backend,
            "error": (errors or lines or [f"exit {done.returncode}"])[-1]}


def _num(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def table(records: list[dict]) -> str:
    """Markdown table, one column per system, plus ours / keras-hub where both ran."""
    rows = [("tokens/s", "tokens_per_s", ",.0f"), ("median step s", "step_s_median", ".3f"),
            ("CPU s per step (all threads)", "cpu_s_per_step", ".3f"),
            ("peak memory GiB", "peak_memory_gib", ".2f"), ("  of which above RSS before the model (host)",
                                                           "peak_memory_above_baseline_gib", ".2f"),
            ("TFLOP/s (4N+2Nt+attn)", "tflops_per_s", ".2f"),
            ("MFU", "mfu", ".1%"), ("model TFLOP/s (anchor 6N/4N)", "model_tflops_per_s", ".2f"),
            ("params / trainable", None, None), ("dtype policy", "policy", "s"),
            ("first step s (compile)", "first_step_s", ".1f"),
            ("slowest warm-up step s (torch: compiles in the 2nd)", "slowest_warmup_step_s", ".1f"),
            ("loss first → last", None, None)]
    by = {r["system"]: r for r in records}
    if any("repeats_tokens_per_s" in r for r in records):
        rows.insert(1, ("tokens/s of each repeat", None, None))
    both = all(s in by and "error" not in by[s] for s in DEFAULT_SYSTEMS)
    head = ["", *by] + (["ours / keras-hub"] if both else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key, fmt in rows:
        cells = []
        for r in by.values():
            if "error" in r:
                cells.append("failed: " + r["error"][:60] if label == "tokens/s" else "")
            elif label.startswith("params"):
                cells.append(f"{r['params_total']:,} / {r['params_trainable']:,}")
            elif label.endswith("repeat"):
                cells.append(", ".join(f"{v:,}" for v in r.get("repeats_tokens_per_s", [])))
            elif label.startswith("loss"):
                cells.append(f"{r['loss_first']:.3f} → {r['loss_last']:.3f}")
            else:
                cells.append(_num(r.get(key), fmt))
        if both:
            ours, ref = by["ours"].get(key), by["keras-hub"].get(key)
            ratio = key in RATIOS and ours and ref
            cells.append(f"{ours / ref:.2f}×" if ratio else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.child:
        child(args)
        return 0
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", "bench/sft_bench.py", *argv])
    records = []
    for attempt in range(args.repeat):
        for system in systems:
            record = run_child(system, argv, args.backend, args.timeout)
            record.update(date=when, command=command, repeat=attempt)
            print(json.dumps(record), flush=True)
            records.append(record)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    print(table([median_run([r for r in records if r["system"] == s]) for s in systems]))
    return 0 if all("error" not in r for r in records) else 1


def median_run(runs: list[dict]) -> dict:
    """The run of median tokens/s (the lower middle one of an even count); a failure if all failed."""
    done = sorted((r for r in runs if "error" not in r), key=lambda r: r["tokens_per_s"])
    if not done:
        return runs[-1]
    chosen = dict(done[(len(done) - 1) // 2])
    if len(runs) > 1:
        chosen["repeats_tokens_per_s"] = [round(r["tokens_per_s"]) for r in done]
    return chosen


if __name__ == "__main__":
    sys.exit(main())
