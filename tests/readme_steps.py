"""README's commands as steps, and how the README tests run them: every line of its shell blocks after the
set-up section, and every Python block, each in a fresh interpreter, in order, in a scratch directory that
holds the project's recipes/, configs/ and data/. The steps are split in two independent chains (the main
quickstart with its exports and API examples; the DPO, SimPO, GRPO and PaliGemma quickstarts) so that the
two test files run on parallel workers; `check_main_chain` / `check_quickstarts` check what each chain left.

README's commands name no backend but one step's `--backend torch`, so a user who follows it trains on JAX, the
default: the tests run the chains on JAX, in the JAX suite only (tests/conftest.py), and bench/readme_chains.py
runs the same chains and checks on TensorFlow and torch."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)
CHAINS = ("main", "quickstarts")  # the chains of `chain_steps`
# A step naming one of these belongs to the second chain (tests/test_readme_quickstarts.py).
OTHER_QUICKSTARTS = ("quickstart_dpo", "quickstart_simpo", "quickstart_grpo", "paligemma")


def readme_steps() -> list[tuple[str, str]]:
    """("bash", one command line) and ("python", one block), in README order, after the set-up section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    steps = []
    for match in BLOCK.finditer(text, text.index("## Using it")):
        kind, body = match.groups()
        if kind == "python":
            steps.append((kind, body))
        else:
            steps += [(kind, line) for line in body.splitlines() if line.strip() and not line.startswith("#")]
    return steps


def chain_steps(chain: str) -> list[tuple[str, str]]:
    """readme_steps() of one chain, in README order: "main" (no step names one of OTHER_QUICKSTARTS) or
    "quickstarts" (every step that does); together they are every step."""
    if chain not in CHAINS:
        raise ValueError(f"chain is main or quickstarts, not {chain!r}")
    return [(kind, step) for kind, step in readme_steps()
            if any(name in step for name in OTHER_QUICKSTARTS) == (chain == "quickstarts")]


def run_steps(steps: list[tuple[str, str]], workdir: Path, backend: str = "jax") -> list[float]:
    """Run `steps` in order in `workdir` (given recipes/, configs/, data/ links) with KERAS_BACKEND=`backend`;
    each must exit 0 without a traceback. Returns each step's seconds."""
    for name in ("recipes", "configs", "data"):
        (workdir / name).symlink_to(ROOT / name)
    env = dict(os.environ, KERAS_BACKEND=backend,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    seconds = []
    for kind, step in steps:
        command = ["bash", "-c", step] if kind == "bash" else [sys.executable, "-c", step]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
        seconds.append(time.perf_counter() - start)
        assert done.returncode == 0, f"README step failed: {step}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, step
    return seconds


def bash_commands(steps: list[tuple[str, str]]) -> list[str]:
    """The shell steps with their trailing comments removed."""
    return [re.sub(r"\s+#.*$", "", step) for kind, step in steps if kind == "bash"]


def check_main_chain(workdir: Path) -> None:
    """What the main chain leaves in `workdir`: the quickstart learnt, logged, saved and exported as README says,
    its continuation and the other runs finished, and its exports compute what its last checkpoint computes."""
    run_dir = workdir / "runs" / "quickstart"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 150
    assert summary["final_loss"] < summary["first_loss"] - 2.0  # the tiny model learns the bundled chat data
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(10, 151, 10))
    assert [r["step"] for r in rows if r["split"] == "eval"] == [40, 80, 120, 150]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_120", "step_150"]
    for name in ("recipe.yaml", "manifest.json", "metrics.csv", "loss_curve.png", "logs/run.log", "samples.jsonl",
                 "exports/keras/model.keras", "exports/safetensors/model.safetensors"):
        assert (run_dir / name).is_file(), name
    assert (workdir / "runs" / "quickstart-r8" / "summary.json").is_file()
    assert (workdir / "exports" / "quickstart-adapter" / "adapter_config.json").is_file()

    batch = {"token_ids": np.array([[2, 4, 339, 474, 10]], np.int32), "padding_mask": np.ones((1, 5), np.int32)}
    _exports_compute_what_was_trained(run_dir, (run_dir / "exports" / "safetensors", run_dir / "exports" / "keras",
                                                workdir / "exports" / "quickstart-hf"), batch)


def check_quickstarts(workdir: Path) -> None:
    """What the other quickstarts leave in `workdir`: DPO and SimPO finished, GRPO's reward climbed and its
    completions were kept with their rewards, the tiny PaliGemma learnt the captions and its exports compute what
    it trained."""
    from gemma_tune.data.images import load_images

    for name in ("quickstart-dpo", "quickstart-simpo"):
        summary = json.loads((workdir / "runs" / name / "summary.json").read_text())
        assert summary["status"] == "finished", name

    grpo_dir = workdir / "runs" / "quickstart-grpo"
    grpo = [json.loads(line) for line in (grpo_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in grpo] == list(range(15, 151, 15))

    def late(key):  # the last three logged steps: one step's 32 completions are a noisy estimate
        return np.mean([r[key] for r in grpo[-3:]])

    assert late("reward") > grpo[0]["reward"] + 0.25 and late("rewards/format") > 0.75
    completions = (grpo_dir / "completions.jsonl").read_text().splitlines()
    assert len(completions) == 150 * 8 and "answer_match" in json.loads(completions[-1])["rewards"]

    vision_dir = workdir / "runs" / "paligemma-quickstart"
    vision = json.loads((vision_dir / "summary.json").read_text())
    assert vision["status"] == "finished" and vision["steps"] == 300
    assert vision["final_loss"] < vision["first_loss"] - 4.0
    samples = [json.loads(line) for line in (vision_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [100, 100, 200, 200, 300, 300]
    assert all(s["images"] and s["prompt"] == "caption en" for s in samples)
    assert samples[-1]["completion"].startswith("a ")  # the caption grammar is learnt
    pixels = load_images(["data/tiny_vision/images/141.png"], ROOT, 56, "bicubic")[None]
    tokens = np.array([[512] * 16 + [2, 4, 339, 10]], np.int32)
    inputs = {"token_ids": tokens, "padding_mask": np.ones_like(tokens), "images": pixels,
              "prefix_mask": np.ones_like(tokens)}
    _exports_compute_what_was_trained(vision_dir, (vision_dir / "exports" / "safetensors", vision_dir / "exports" / "keras",
                                                   workdir / "exports" / "paligemma-hf"), inputs)


def _exports_compute_what_was_trained(run_dir: Path, exports, inputs: dict) -> None:
    """Each export's logits for `inputs` equal those of the run's last checkpoint (atol 1e-5)."""
    from keras import ops

    from gemma_tune.loading import load_model

    trained = ops.convert_to_numpy(load_model(run_dir)(inputs))
    for export in exports:
        np.testing.assert_allclose(ops.convert_to_numpy(load_model(export)(inputs)), trained, atol=1e-5,
                                   err_msg=str(export))
