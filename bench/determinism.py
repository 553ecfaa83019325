"""How close the same recipe and seed stay on JAX, TensorFlow and torch, and what `train.deterministic` costs.

For each backend (each in its own process, as a user runs it) the bundled quickstart recipe (LoRA on the
tiny Gemma 3 model, same seed) trains STEPS steps with a metric row every step, with and without
`train.deterministic`. Reported: the first loss of each run, the largest |Δloss| / |loss_jax| over the
steps against JAX (curves), whether deterministic kernels changed any loss (bit for bit), and the median
tokens/s of each (the cost of the flags). Raw figures go to bench/raw/determinism.json.

    python bench/determinism.py [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BACKENDS = ("jax", "tensorflow", "torch")
RAW = Path(__file__).resolve().parent / "raw" / "determinism.json"


def train(backend: str, steps: int, deterministic: bool, out: Path) -> dict:
    """One run in a fresh process; its loss and tokens/s per step."""
    run_dir = out / f"{backend}-{'det' if deterministic else 'default'}"
    command = [sys.executable, "-m", "gemma_tune", "run", "quickstart", "--backend", backend, "--no-resume",
               f"train.max_steps={steps}", "train.log_every=1", f"train.eval_every={steps}",
               f"train.save_every={steps}", "train.sample_prompts=[]", "export.formats=[]",
               f"train.deterministic={str(deterministic).lower()}", f"output_dir={run_dir}"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("split") == "train"]
    speed = [r["tokens_per_s"] for r in rows[5:]]
    return {"loss": [r["loss"] for r in rows], "tokens_per_second": statistics.median(speed) if speed else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in BACKENDS:
            for deterministic in (False, True):
                results[f"{backend}{'/det' if deterministic else ''}"] = train(backend, args.steps, deterministic,
                                                                                Path(tmp))
                print(backend, "deterministic" if deterministic else "default", "done", flush=True)
    anchor = results["jax"]["loss"]
    summary = {}
    for name, run in results.items():
        rel = [abs(a - b) / abs(b) for a, b in zip(run["loss"], anchor)]
        base = results[name.split("/")[0]]
        summary[name] = {"first_loss": run["loss"][0], "last_loss": run["loss"][-1],
                         "max_rel_diff_vs_jax": max(rel), "steps": len(run["loss"]),
                         "same_as_default_bit_for_bit": run["loss"] == base["loss"],
                         "tokens_per_second": run["tokens_per_second"]}
    RAW.parent.mkdir(exist_ok=True)
    RAW.write_text(json.dumps({"steps": args.steps, "cpu_cores": os.cpu_count(), "summary": summary,
                               "runs": results}, indent=1) + "\n")
    print(f"{'run':<16}{'first loss':>12}{'last loss':>11}{'max rel Δ vs jax':>18}{'bit-identical':>15}{'tokens/s':>10}")
    for name, s in summary.items():
        print(f"{name:<16}{s['first_loss']:>12.7f}{s['last_loss']:>11.5f}{s['max_rel_diff_vs_jax']:>18.2e}"
              f"{str(s['same_as_default_bit_for_bit']):>15}{s['tokens_per_second'] or 0:>10,.0f}")


if __name__ == "__main__":
    main()
