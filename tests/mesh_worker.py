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
    hosts       the fsdp run as two processes of 4 devices (`two_hosts`): exits, losses, checkpoints written, the
                largest difference of its step-4 weights from the one-process run's, the losses of steps 3, 4
                when it continues from step 2, the logs, and the exits of a recipe it refuses (sampling)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
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


def two_hosts(run_dir: Path, extra: list[str]) -> list[int]:
    """`gemma-tune run` of the fsdp case as a job of two processes of 4 CPU devices each (Keras' environment
    variables, a coordinator on a free local port); their exit codes (their stderr in run_dir's parent)."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    jobs = []
    for index in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"localhost:{port}", "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
               "KERAS_DISTRIBUTION_PROCESS_ID": str(index)}
        log = open(run_dir.parent / f"{run_dir.name}.host{index}.log", "w")
        jobs.append((subprocess.Popen([sys.executable, "-m", "gemma_tune", "run", RECIPE, "--backend", "jax", *SHORT,
                                       *MESHES["fsdp"], *extra, f"output_dir={run_dir}"], env=env, stdout=log,
                                      stderr=subprocess.STDOUT), log))
    codes = [job.wait(timeout=900) for job, _ in jobs]
    for _, log in jobs:
        log.close()
    return codes


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

    hosts = work / "hosts"  # the fsdp run again over two processes, then continued from its step 2 the same way
    out["hosts"] = {"exits": two_hosts(hosts, []), "losses": losses(hosts)[0],
                    "checkpoints": sorted(p.name for p in (hosts / "checkpoints").iterdir())}
    out["hosts"]["weights_vs_one_process"] = max_difference(hosts / "checkpoints" / "step_4",
                                                            source / "checkpoints" / "step_4")
    shutil.rmtree(hosts / "checkpoints" / "step_4")
    out["hosts"]["resumed_exits"] = two_hosts(hosts, [])
    out["hosts"]["resumed"] = losses(hosts)[0][2:]
    out["hosts"]["log"] = "".join(text[:3000] + text[-3000:] for text in
                                  ((work / f"hosts.host{i}.log").read_text() for i in (0, 1)))
    out["hosts"]["refused"] = two_hosts(work / "hosts_sampling", ['train.sample_prompts=["hi"]'])
    out["hosts"]["refusal"] = (work / "hosts_sampling.host0.log").read_text()[-1000:]
    return out


def max_difference(one: Path, other: Path) -> float:
    """The largest |difference| between the model weights of two checkpoints (the same keys)."""
    from safetensors.numpy import load_file

    a, b = load_file(str(one / "model.safetensors")), load_file(str(other / "model.safetensors"))
    assert a.keys() == b.keys()
    return max(float(abs(a[k].astype("float64") - b[k]).max()) for k in a)


if __name__ == "__main__":
    result = main(Path(sys.argv[1]))
    print(json.dumps(result))
