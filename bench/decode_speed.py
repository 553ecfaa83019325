"""Greedy decode speed: gemma_tune's on-device sampler next to the old host loop, keras-hub and transformers.

    python bench/decode_speed.py --backend jax                      # gemma3_tiny, batches 8 and 64, 32 + 64 tokens
    python bench/decode_speed.py --backend torch --systems ours,ours-compiled,transformers
    python bench/decode_speed.py --preset gemma3_1b --batch 64 --new-tokens 256 --dtype bfloat16   # a GPU run

One random Gemma 3 (`--preset`, `--arch KEY=VALUE` overrides, `--seed`: Keras' initialisers, then the projection
kernels ×5 and the norm scales drawn from N(0, 2), so that greedy decoding does not settle on one repeated token
as it does with the plain initialisation) is written once, in `--dtype`, as an HF
checkpoint (`gemma_tune.checkpoints.hf.save_hf_checkpoint`) and as a keras-hub preset
(`checkpoints.keras_hub.write_keras_hub_preset`); each system then loads those same weights in its own
subprocess (KERAS_BACKEND from --backend; transformers is PyTorch itself) and completes the same prompts:
`--batch` rows of `--prompt-length` random ids (one length, no padding), `--new-tokens` new tokens each,
greedy, with no stop id (every row runs the full length):

    ours        gemma_tune.sampling.sample(stop_ids=()): prefill + while loop, one compiled function
                (JAX jit, TensorFlow tf.function with XLA); on PyTorch a Python loop under no_grad, the
                prefill eager and the step (one token through the model and the sampler) a traced aten graph
    ours-compiled the same with `compile_step=True`: on PyTorch the traced step compiled by torch.compile
                (torch only: on JAX and TensorFlow it is `ours`)
    host-loop   the generate_ids of before the sampler (kept here only, as the baseline): a Python loop over
                the tokens, one `call_with_cache` per token (jitted per step on JAX, eager elsewhere), the
                [B, vocab] logits copied to NumPy and the argmax taken there
    keras-hub   keras_hub.models.Gemma3CausalLM.from_preset(…), compile(sampler="greedy"), preprocessor
                detached: the compiled function generate() runs, make_generate_function()(
                {"token_ids", "padding_mask"} of prompt + new-token slots, stop_token_ids=None), called
                directly because generate()'s output normalisation fails on a text-only Gemma 3 without
                a preprocessor (it concatenates its "images": None); its prefill runs over all prompt +
                new-token slots
    transformers Gemma3ForCausalLM.from_pretrained(…).generate(do_sample=False, max_new_tokens=min_new_tokens=N),
                its default cache and attention (sdpa), eager PyTorch, on CUDA when there is a GPU

Timing: per batch size, one untimed warm-up call (compilation), then `--repeats` timed calls; each call's
time runs from the NumPy prompt to the NumPy tokens on the host (prefill included). tokens/s = batch ·
new_tokens / the median timed call; "compile s" = the warm-up call's time minus the median call's (what the
first call costs beyond a warm one). "CPU s per call": the median over the timed calls of the process's CPU time
(all threads), the work done, which on a CPU shared with other processes varies less than wall time (the
1-minute load average before the timed calls is in the JSON lines). "same tokens" is the share of each system's
tokens equal to ours (the same weights in float32 decode alike; a first divergence changes the rest of its row).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SYSTEMS = ("ours", "ours-compiled", "host-loop", "keras-hub", "transformers")
TOKENIZER = ROOT / "data" / "tiny" / "tokenizer.model"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gemma3_tiny", help="configs/models/<preset>.yaml (a Gemma 3 text model)")
    p.add_argument("--arch", action="append", default=[], metavar="KEY=VALUE",
                   help="override an Architecture field (YAML value), repeatable")
    p.add_argument("--batch", default="8,64", help="comma-separated batch sizes (rows per call)")
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the weights' and the computation's dtype in every system")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per batch size (after one warm-up)")
    p.add_argument("--systems", default=None, help="comma-separated subset of: " + ", ".join(SYSTEMS)
                   + " (default: all; ours-compiled on --backend torch only)")
    p.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "jax"), choices=("jax", "tensorflow", "torch"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per system")
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary directory)")
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    p.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    return p


def architecture(args):
    from workload import architecture as preset_architecture  # bench/ is the script's directory

    return preset_architecture(args.preset, args.arch)


def batches(args) -> list[int]:
    return [int(b) for b in args.batch.split(",") if b]


def prompts(args, batch: int, vocab: int) -> np.ndarray:
    """[batch, prompt_length] random ids in [3, min(vocab, 512)) (the tiny tokenizer's range), the same in every
    process."""
    return np.random.default_rng([args.seed, batch]).integers(3, min(vocab, 512), (batch, args.prompt_length),
                                                              dtype=np.int32)


def write_weights(args, where: Path) -> None:
    """A random model as an HF checkpoint (where/hf) and a keras-hub preset (where/keras_hub)."""
    import keras

    from gemma_tune.checkpoints.hf import save_hf_checkpoint
    from gemma_tune.checkpoints.keras_hub import write_keras_hub_preset
    from gemma_tune.models import build_model
    from gemma_tune.tokenizer import load_tokenizer

    keras.utils.set_random_seed(args.seed)
    model = build_model(architecture(args))
    rng = np.random.default_rng(args.seed)
    for v in model.weights:  # see the module docstring
        if v.path.endswith("kernel"):
            v.assign(keras.ops.convert_to_numpy(v) * 5.0)
        elif len(v.shape) == 1:
            v.assign(rng.normal(0.0, 2.0, v.shape).astype("float32"))
    tokenizer = load_tokenizer(str(TOKENIZER))
    (where / "hf").mkdir(parents=True, exist_ok=True)
    save_hf_checkpoint(model, tokenizer, where / "hf", dtype=args.dtype)
    write_keras_hub_preset(model, tokenizer, where / "keras_hub", dtype=args.dtype)


# --------------------------------------------------------------------------------------------- systems


def host_loop(model, prompt_ids: np.ndarray, new_tokens: int) -> np.ndarray:
    """The generate_ids of before gemma_tune.sampling (greedy, equal-length prompts, no stop id): a host loop,
    one `call_with_cache` per token, jitted per step on JAX over the variables' current values."""
    import keras
    from keras import ops

    if keras.backend.backend() == "jax":
        import jax

        variables = list(model.variables)
        cached = getattr(model, "_bench_host_step", None)
        if cached is None:
            def stateless(values, *args):
                with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                    return model.call_with_cache(*args)

            cached = jax.jit(stateless)
            object.__setattr__(model, "_bench_host_step", cached)

        def step(*args):
            return cached([v.value for v in variables], *args)
    else:
        step = model.call_with_cache
    batch, prompt_len = prompt_ids.shape
    total = prompt_len + new_tokens
    key_segments = np.ones((batch, total), np.int32)
    positions = np.broadcast_to(np.arange(prompt_len, dtype=np.int32), (batch, prompt_len))
    cache = model.init_cache(batch, total)
    logits, cache = step(prompt_ids, positions, key_segments, cache, np.int32(0), None, None)
    out = np.zeros((batch, new_tokens), np.int32)
    for i in range(new_tokens):
        last = ops.convert_to_numpy(ops.cast(logits[:, -1, :], "float32"))
        out[:, i] = last.argmax(axis=-1)
        if i == new_tokens - 1:
            break
        logits, cache = step(out[:, i:i + 1], np.full((batch, 1), prompt_len + i, np.int32), key_segments, cache,
                             np.int32(prompt_len + i))
    return out


def make_system(system: str, args, weights: Path):
    """(description of the device, generate(prompt_ids [B, P]) -> new ids [B, N] as NumPy)."""
    n = args.new_tokens
    if system == "transformers":
        import torch
        import transformers

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = transformers.Gemma3ForCausalLM.from_pretrained(
            weights / "hf", dtype=getattr(torch, args.dtype)).eval().to(device)

        def generate(ids):
            with torch.no_grad():
                x = torch.tensor(ids, device=device)
                out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, pad_token_id=0)
            return out[:, ids.shape[1]:].cpu().numpy()

        return (torch.cuda.get_device_name() if device == "cuda" else "cpu (torch)"), generate
    import keras

    device = _keras_device()
    if system == "keras-hub":
        import keras_hub

        lm = keras_hub.models.Gemma3CausalLM.from_preset(str(weights / "keras_hub"), dtype=args.dtype)
        lm.preprocessor = None
        lm.compile(sampler="greedy")
        generate_function = lm.make_generate_function()  # what generate() calls (see the module docstring)

        def generate(ids):
            batch, prompt_len = ids.shape
            token_ids = np.zeros((batch, prompt_len + n), np.int32)
            token_ids[:, :prompt_len] = ids
            mask = np.zeros_like(token_ids, bool)
            mask[:, :prompt_len] = True
            out = generate_function({"token_ids": token_ids, "padding_mask": mask}, stop_token_ids=None)
            return keras.ops.convert_to_numpy(out["token_ids"])[:, prompt_len:]

        return device, generate
    from gemma_tune import load_model
    from gemma_tune.sampling import sample

    model = load_model(str(weights / "hf"), dtype=args.dtype)
    if system == "host-loop":
        def generate(ids):
            return _no_grad(lambda: host_loop(model, ids, n))
    else:
        def generate(ids):
            return sample(model, ids.tolist(), max_new_tokens=n, temperature=0.0, stop_ids=(),
                          compile_step=system == "ours-compiled").tokens
    return device, generate


def _keras_device() -> str:
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        d = jax.devices()[0]
        return f"{d.platform} ({getattr(d, 'device_kind', '')})"
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (torch)"
    import tensorflow as tf

    return "gpu" if tf.config.list_logical_devices("GPU") else "cpu (tensorflow)"


def _no_grad(fn):
    import keras

    if keras.backend.backend() == "torch":
        import torch

        with torch.no_grad():
            return fn()
    return fn()


def child(args) -> None:
    """Runs one system over every batch size in this process; one JSON line per batch size."""
    import keras

    system = args.child
    weights = Path(args.weights)
    vocab = architecture(args).vocab_size
    device, generate = make_system(system, args, weights)
    backend = "torch" if system == "transformers" else keras.backend.backend()
    for batch in batches(args):
        ids = prompts(args, batch, vocab)
        start = time.perf_counter()
        tokens = generate(ids)
        first = time.perf_counter() - start
        times, cpu = [], []
        load = os.getloadavg()[0]
        for _ in range(args.repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            tokens = generate(ids)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        median = float(np.median(times))
        record = {"system": system, "backend": backend, "device": device, "batch": batch,
                  "prompt_length": args.prompt_length, "new_tokens": args.new_tokens, "dtype": args.dtype,
                  "first_call_s": first, "call_s": times, "median_call_s": median, "cpu_s": cpu,
                  "median_cpu_s": float(np.median(cpu)), "load_average_1min": load,
                  "compile_s": max(first - median, 0.0), "tokens_per_s": batch * args.new_tokens / median,
                  "tokens": np.asarray(tokens).astype(int).tolist()}
        print("BENCH " + json.dumps(record), flush=True)


def run_child(system: str, argv: list[str], backend: str, weights: Path, timeout: float | None) -> list[dict]:
    """The records of `system` from its subprocess, or one {"system", "error"}."""
    env = dict(os.environ, KERAS_BACKEND=backend, XLA_PYTHON_CLIENT_PREALLOCATE="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", system, "--weights", str(weights)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        found = [json.loads(line[6:]) for line in out.splitlines() if line.startswith("BENCH ")]
        return found + [{"system": system, "error": f"no result within {timeout:g} s"}]
    found = [json.loads(line[6:]) for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    if done.returncode != 0 or not found:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        sys.stderr.write(f"--- {system} failed (exit {done.returncode}):\n" + "\n".join(lines[-15:]) + "\n")
        found.append({"system": system, "error": (lines or [f"exit {done.returncode}"])[-1][:200]})
    return found


def table(records: list[dict]) -> str:
    """Markdown: one row per (batch, system)."""
    ours = {r["batch"]: np.array(r["tokens"]) for r in records if r["system"] == "ours" and "error" not in r}
    lines = ["| batch | system | backend | tokens/s | median call s | CPU s per call | compile s "
             "| same tokens as ours |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in records if "error" not in r), key=lambda r: (r["batch"], SYSTEMS.index(r["system"]))):
        same = (f"{(np.array(r['tokens']) == ours[r['batch']]).mean():.0%}"
                if r["batch"] in ours and r["system"] != "ours" else "")
        lines.append(f"| {r['batch']} | {r['system']} | {r['backend']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['median_call_s']:.3f} | {r['median_cpu_s']:.3f} | {r['compile_s']:.2f} | {same} |")
    for r in records:
        if "error" in r:
            lines.append(f"| | {r['system']} | | failed: {r['error'][:80]} | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    sys.path.insert(0, str(ROOT))
    if args.child:
        child(args)
        return 0
    default = [s for s in SYSTEMS if s != "ours-compiled" or args.backend == "torch"]
    systems = [s for s in args.systems.split(",") if s] if args.systems else default
    if "ours-compiled" in systems and args.backend != "torch":
        raise SystemExit("ours-compiled differs from ours on --backend torch only")
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", "bench/decode_speed.py", *argv])
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        weights = Path(tmp)
        start = time.perf_counter()
        write_weights(args, weights)
        print(f"weights written in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        records = []
        for system in systems:
            for record in run_child(system, argv, args.backend, weights, args.timeout):
                record.update(date=when, command=command, machine=platform.platform(), cpus=os.cpu_count())
                print(json.dumps({k: v for k, v in record.items() if k != "tokens"}), flush=True)
                records.append(record)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    print(table(records))
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
