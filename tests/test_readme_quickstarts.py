"""README's commands for the DPO, SimPO, GRPO and PaliGemma quickstarts, run as written and in the order
written (tests/readme_steps.py says how; they do not depend on the main chain of tests/test_readme.py, and
run beside it); what they leave is then checked."""

import json

import numpy as np
from keras import ops
from readme_steps import ROOT, bash_commands, chain_steps, run_steps

from gemma_tune.data.images import load_images
from gemma_tune.loading import load_model


def test_readme_quickstarts_run_in_order(tmp_path):
    steps = chain_steps("quickstarts")
    commands = bash_commands(steps)
    for recipe in ("quickstart_dpo", "quickstart_simpo", "quickstart_grpo", "paligemma_quickstart"):
        assert f"gemma-tune run recipes/{recipe}.yaml" in commands, recipe
    run_steps(steps, tmp_path)

    for name in ("quickstart-dpo", "quickstart-simpo"):
        summary = json.loads((tmp_path / "runs" / name / "summary.json").read_text())
        assert summary["status"] == "finished", name

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
    pixels = load_images(["data/tiny_vision/images/141.png"], ROOT, 56, "bicubic")[None]
    tokens = np.array([[512] * 16 + [2, 4, 339, 10]], np.int32)
    inputs = {"token_ids": tokens, "padding_mask": np.ones_like(tokens), "images": pixels,
              "prefix_mask": np.ones_like(tokens)}
    trained = ops.convert_to_numpy(load_model(vision_dir)(inputs))
    for export in (vision_dir / "exports" / "safetensors", vision_dir / "exports" / "keras", tmp_path / "exports" / "paligemma-hf"):
        np.testing.assert_allclose(ops.convert_to_numpy(load_model(export)(inputs)), trained, atol=1e-5,
                                   err_msg=str(export))
