"""README's commands, run as written and in the order written (so the README cannot rot): every line of
its shell blocks after the set-up section, and every Python block, each in a fresh interpreter, in a
scratch directory that holds the project's recipes/, configs/ and data/. The main job is the quickstart
itself (README's `gemma-tune run recipes/quickstart.yaml`); what it leaves is then checked."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)


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


def test_readme_commands_run_in_order(tmp_path):
    for name in ("recipes", "configs", "data"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    steps = readme_steps()
    commands = [re.sub(r"\s+#.*$", "", step) for kind, step in steps if kind == "bash"]
    assert "gemma-tune run recipes/quickstart.yaml" in commands, "README runs the main job"
    for kind, step in steps:
        command = ["bash", "-c", step] if kind == "bash" else [sys.executable, "-c", step]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"README step failed: {step}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, step

    run_dir = tmp_path / "runs" / "quickstart"
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
    assert (tmp_path / "runs" / "quickstart-r8" / "summary.json").is_file()
    assert (tmp_path / "exports" / "quickstart-adapter" / "adapter_config.json").is_file()

    # the exports compute what the trained model (its last checkpoint) computes
    from keras import ops

    from gemma_tune.loading import load_model

    batch = {"token_ids": np.array([[2, 4, 339, 474, 10]], np.int32), "padding_mask": np.ones((1, 5), np.int32)}
    trained = ops.convert_to_numpy(load_model(run_dir)(batch))
    for export in (run_dir / "exports" / "safetensors", run_dir / "exports" / "keras", tmp_path / "exports" / "quickstart-hf"):
        np.testing.assert_allclose(ops.convert_to_numpy(load_model(export)(batch)), trained, atol=1e-5,
                                   err_msg=str(export))

    # the GRPO quickstart: the reward climbs as the answer's layout is learnt; completions are kept with rewards
    grpo_dir = tmp_path / "runs" / "quickstart-grpo"
    grpo = [json.loads(line) for line in (grpo_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in grpo] == list(range(15, 151, 15))
    def late(key):  # the last three logged steps: one step's 32 completions are a noisy estimate
        return np.mean([r[key] for r in grpo[-3:]])

    assert late("reward") > grpo[0]["reward"] + 0.25 and late("rewards/format") > 0.75
    completions = (grpo_dir / "completions.jsonl").read_text().splitlines()
    assert len(completions) == 150 * 8 and "answer_match" in json.loads(completions[-1])["rewards"]

    # the vision quickstart: a tiny PaliGemma learns the bundled captions; its export computes what it trained
    vision_dir = tmp_path / "runs" / "paligemma-quickstart"
    vision = json.loads((vision_dir / "summary.json").read_text())
    assert vision["status"] == "finished" and vision["steps"] == 300
    assert vision["final_loss"] < vision["first_loss"] - 4.0
    samples = [json.loads(line) for line in (vision_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [100, 100, 200, 200, 300, 300]
    assert all(s["images"] and s["prompt"] == "caption en" for s in samples)
    assert samples[-1]["completion"].startswith("a ")  # the caption grammar is learnt
    from gemma_tune.data.images import load_images

    pixels = load_images(["data/tiny_vision/images/141.png"], ROOT, 56, "bicubic")[None]
    tokens = np.array([[512] * 16 + [2, 4, 339, 10]], np.int32)
    inputs = {"token_ids": tokens, "padding_mask": np.ones_like(tokens), "images": pixels,
              "prefix_mask": np.ones_like(tokens)}
    trained = ops.convert_to_numpy(load_model(vision_dir)(inputs))
    for export in (vision_dir / "exports" / "safetensors", vision_dir / "exports" / "keras", tmp_path / "exports" / "paligemma-hf"):
        np.testing.assert_allclose(ops.convert_to_numpy(load_model(export)(inputs)), trained, atol=1e-5,
                                   err_msg=str(export))
