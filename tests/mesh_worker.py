"""Runs the tiny quickstart under several meshes of 8 virtual CPU devices and prints what tests/test_distribution.py
checks, as one JSON object on the last line of stdout.

    python tests/mesh_worker.py WORK_DIR

It must start in a fresh process: the device count (`XLA_FLAGS=--xla_force_host_platform_device_count=8`) is
read when JAX starts. Keys of the result:

    cli_exit    the exit code of the fsdp run, made through the command line's entry point
    losses      {mode: [train losses of steps 1..4]} for none, data_parallel, fsdp (1 × 8) and fsdp 2 × 4
    eval        {mode: eval loss at step 4}
    layouts     {recipe: {path: {spec, shape, shard, devices}}} for selected model and optimizer variables under fsdp
    replicated  {recipe: paths the mesh left replicated}
    refused     {case: {exit, made_dir}} for runs whose batch or mesh the 8 devices cannot make (messages on stderr)
    resumed     {mesh: [losses of steps 3, 4]} continuing an 8-device fsdp checkpoint of step 2 on 1 device and on 2 × 4
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["KERAS_BACKEND"] = "jax"

import gemma_tune  # noqa: E402
from gemma_tune import cli  # noqa: E402

RECIPE = "recipes/quickstart.yaml"
SHORT = ["model.architecture.num_layers=2", "train.max_steps=4", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=4",
         "train.save_every=2", "train.sample_prompts=[]", "export.formats=[]"]
MESHES = {"none": [], "data_parallel": ["distribution.mode=data_parallel"], "fsdp": ["distribution.mode=fsdp"],
          "fsdp_2x4": ["distribution.mode=fsdp", "distribution.mesh={batch: 2, model: 4}"]}
WATCHED = ("token_embedding/embeddings", "block_0/attention/q_proj/kernel", "block_0/attention/o_proj/kernel",
           "block_0/attention/o_proj/kernel_scale", "block_0/attention/q_proj/kernel_scale",
           "block_0/attention/q_proj/lora_kernel_a", "block_0/attention/q_proj/lora_kernel_b",
           "block_0/mlp/down_proj/kernel", "block_0/pre_attention_norm/scale")


def layouts(overrides: list[str]) -> tuple[dict, list[str]]:
    """How the watched variables of the quickstart model with `overrides`, and their AdamW moments, lie under
    fsdp on 8 devices (built as the trainer builds them, without training), and the paths left replicated."""
    from gemma_tune.config import load_recipe
    from gemma_tune.distribute.setup import active, distribution_for
    from gemma_tune.train.build import build_for_recipe
    from gemma_tune.train.optim import WarmupSchedule, build_optimizer

    recipe = load_recipe(RECIPE, ["distribution.mode=fsdp"] + overrides)
    placement = distribution_for(recipe)
    with active(placement):
        model, _ = build_for_recipe(recipe)
        optimizer = build_optimizer(recipe.train, WarmupSchedule.for_recipe(recipe.train, 10))
        optimizer.build(model.trainable_variables)
    watched = {v.path: v for v in model.variables if v.path in WATCHED}
    for v in optimizer.variables:  # AdamW's moments, named after their variable
        for path in WATCHED:
            if v.path.endswith(path.replace("/", "_") + "_momentum"):
                watched[f"optimizer:{path}"] = v
    found = {}
    for path, v in watched.items():
        value = v.value
        found[path] = {"spec": [a if a is None or isinstance(a, str) else list(a) for a in value.sharding.spec],
                       "shape": list(value.shape), "shard": list(value.addressable_shards[0].data.shape),
                       "devices": len(value.sharding.device_set)}
    return found, list(placement.distribution.replicated)


def losses(run_dir: Path) -> tuple[list[float], float | None]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r["loss"] for r in rows if r["split"] == "train"]
    evals = [r["loss"] for r in rows if r["split"] == "eval"]
    return train, (evals[-1] if evals else None)


def main(work: Path) -> dict:
    out = {"losses": {}, "eval": {}, "layouts": {}, "replicated": {}, "refused": {}, "resumed": {}}
    for mode, extra in MESHES.items():
        run_dir = work / mode
        if mode == "fsdp":  # as `gemma-tune run recipes/quickstart.yaml distribution.mode=fsdp` (its log on stderr)
            out["cli_exit"] = cli.main(["run", RECIPE, "--backend", "jax", "--no-resume", *SHORT, *extra,
                                        f"output_dir={run_dir}"])
        else:
            gemma_tune.run(RECIPE, SHORT + extra + [f"output_dir={run_dir}"], resume=False)
        out["losses"][mode], out["eval"][mode] = losses(run_dir)

    for name, extra in {"qlora": ["quantize=int8"], "full": ["lora=null"], "odd_width": ["model.architecture.hidden_size=60"]}.items():
        out["layouts"][name], out["replicated"][name] = layouts(extra)

    refused = {"batch_6_over_8": ["distribution.mode=data_parallel", "train.batch_size=6"],
               "mesh_3x2_of_8": ["distribution.mode=fsdp", "distribution.mesh={batch: 3, model: 2}"],
               "devices_16_of_8": ["distribution.mode=fsdp", "distribution.devices=16"]}
    for name, extra in refused.items():  # before anything is built or the run directory is made
        run_dir = work / name
        out["refused"][name] = {"exit": cli.main(["run", RECIPE, "--backend", "jax", *SHORT, *extra,
                                                  f"output_dir={run_dir}"]), "made_dir": run_dir.exists()}

    source = work / "fsdp"  # 8-device checkpoints of steps 2 and 4: continue from step 2 as after a crash
    for name, extra in {"one_device": [], "mesh_2x4": MESHES["fsdp_2x4"]}.items():
        run_dir = work / f"resumed_{name}"
        shutil.copytree(source, run_dir)
        shutil.rmtree(run_dir / "checkpoints" / "step_4")
        gemma_tune.run(RECIPE, SHORT + extra + [f"output_dir={run_dir}"])
        out["resumed"][name] = losses(run_dir)[0][2:]
    return out


if __name__ == "__main__":
    result = main(Path(sys.argv[1]))
    print(json.dumps(result))
