"""Writes tests/golden/quickstart/: a stored run that `gemma-tune repro` (and tests/test_repro.py) re-runs.

It is the bundled quickstart recipe shortened to 12 steps with a metrics row every step and an eval every
6, no samples or exports, run on JAX on CPU. Only what repro reads is kept (recipe.yaml, manifest.json,
metrics.jsonl, and metrics.csv to read it by eye; no checkpoints, logs or TensorBoard files): a few
kilobytes. Its recorded paths are those of this checkout's bundled files (`.../gemma_tune/bundled/...`);
repro relocates them elsewhere. Regenerate it when the numerics change on purpose (a new initialisation,
loss or optimiser): python scripts/make_golden_run.py
"""

import shutil
import tempfile
from pathlib import Path

import gemma_tune

TARGET = Path(__file__).resolve().parents[1] / "tests" / "golden" / "quickstart"
OVERRIDES = ["train.max_steps=12", "train.log_every=1", "train.eval_every=6", "train.save_every=1000",
             "train.sample_prompts=[]", "export.formats=[]"]
KEPT = ("recipe.yaml", "manifest.json", "metrics.jsonl", "metrics.csv")


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        result = gemma_tune.run("quickstart", [*OVERRIDES, f"output_dir={scratch}/quickstart"], backend="jax",
                                resume=False)
        shutil.rmtree(TARGET, ignore_errors=True)
        TARGET.mkdir(parents=True)
        for name in KEPT:
            shutil.copy2(result.run_dir / name, TARGET / name)
    print(f"golden quickstart run -> {TARGET}")


if __name__ == "__main__":
    main()
