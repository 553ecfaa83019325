"""README's commands of the main chain, run as written and in the order written (so the README cannot
rot; tests/readme_steps.py says how): the quickstart itself (README's `gemma-tune run
recipes/quickstart.yaml`), its continuation, exports and the Python API examples; what they leave is then
checked. The other quickstarts' steps run in tests/test_readme_quickstarts.py."""

import json

import numpy as np
from readme_steps import bash_commands, chain_steps, run_steps


def test_readme_commands_run_in_order(tmp_path):
    steps = chain_steps("main")
    assert "gemma-tune run recipes/quickstart.yaml" in bash_commands(steps), "README runs the main job"
    run_steps(steps, tmp_path)

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
