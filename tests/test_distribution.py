"""Training over several devices (gemma_tune.distribute): data parallel and fsdp on 8 virtual CPU devices train
as one device does, really shard what they say, refuse meshes and batches the devices cannot make, and continue
an 8-device checkpoint on other meshes; a job of two processes (hosts) of 4 devices each trains as one process,
writes one checkpoint and continues from it; a backend without Keras' distribution support refuses the section
at validation.

The 8-device runs need a fresh JAX process (the device count is fixed when JAX starts): tests/mesh_worker.py
makes them once for the module, in the JAX suite (it forces the JAX backend, so the other suites would repeat
the same runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gemma_tune import cli

ROOT = Path(__file__).resolve().parents[1]
BACKEND = os.environ.get("KERAS_BACKEND", "jax")
RECIPE = "recipes/quickstart.yaml"


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_a_backend_without_distribution_is_refused_at_validation(backend, capsys):
    code = cli.main(["validate", RECIPE, "distribution.mode=fsdp", "--backend", backend])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "distribution.mode" in err and "jax" in err and backend in err and "Traceback" not in err


def test_validate_reports_the_distribution(capsys):
    assert cli.main(["validate", RECIPE, "distribution.mode=fsdp", "distribution.mesh={batch: 2, model: 4}",
                     "--backend", "jax"]) == 0
    assert "distribution fsdp, mesh batch 2 × model 4" in capsys.readouterr().out


def test_an_unknown_mode_or_axis_is_a_recipe_error(capsys):
    assert cli.main(["validate", RECIPE, "distribution.mode=zero3"]) == 2
    assert "distribution.mode" in capsys.readouterr().err
    assert cli.main(["validate", RECIPE, "distribution.mode=fsdp", "distribution.mesh={data: 8}"]) == 2
    assert "distribution.mesh" in capsys.readouterr().err


def test_the_tpu_v5e_8_profile_fits_gemma3_12b_lora_on_its_chips(tmp_path):
    from gemma_tune.config import load_recipe
    from gemma_tune.plan import find_device, plan_for_run

    recipe_file = tmp_path / "tpu.yaml"
    recipe_file.write_text(f"base: [{ROOT}/configs/models/gemma3_12b.yaml, {ROOT}/configs/data/ultrachat.yaml,\n"
                           f"       {ROOT}/configs/distribution/tpu_v5e_8.yaml]\n"
                           "name: tpu\nmodel: {weights: null, tokenizer: " + f"{ROOT}/data/tiny/tokenizer.model" + "}\n"
                           "lora: {rank: 16, alpha: 32}\ntrain: {batch_size: 8}\n")
    recipe = load_recipe(recipe_file)
    assert (recipe.distribution.mode, recipe.distribution.mesh, recipe.model.dtype, recipe.train.remat) == (
        "fsdp", {"batch": 1, "model": 8}, "bfloat16", True)
    v5e = find_device("TPU v5e")
    plan = plan_for_run(recipe, 8, v5e.memory_bytes, platform="tpu")
    assert plan.mesh.describe() == "fsdp on 8 devices (mesh batch 1 × model 8)"
    assert plan.fits(v5e.memory_bytes) and not plan.fits(v5e.memory_bytes, remat=False)


if BACKEND == "jax":
    @pytest.fixture(scope="module")
    def mesh(tmp_path_factory):
        """What tests/mesh_worker.py measured (its docstring), and its stderr (the runs' logs)."""
        work = tmp_path_factory.mktemp("mesh")
        env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
        done = subprocess.run([sys.executable, str(ROOT / "tests" / "mesh_worker.py"), str(work)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, done.stderr[-4000:]
        return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr

    def _fraction(entry: dict) -> float:
        """The share of a variable one device holds."""
        return float(np.prod(entry["shard"]) / np.prod(entry["shape"]))

    @pytest.mark.parametrize("mode", ["data_parallel", "fsdp", "fsdp_2x4"])
    def test_sharded_training_gives_the_losses_of_one_device(mesh, mode):
        result, _ = mesh
        assert len(result["losses"][mode]) == 4
        np.testing.assert_allclose(result["losses"][mode], result["losses"]["none"], rtol=1e-5)
        np.testing.assert_allclose(result["eval"][mode], result["eval"]["none"], rtol=1e-5)
        assert result["losses"]["none"][-1] < result["losses"]["none"][0]  # it trained

    def test_the_command_line_runs_fsdp_over_the_eight_devices(mesh):
        result, log = mesh
        assert result["cli_exit"] == 0
        assert "fsdp on 8 devices (mesh batch 1 × model 8)" in log
        assert "plan: " in log and "per device, fsdp on 8 devices" in log  # the memory plan's line first

    def test_fsdp_shards_weights_adapters_quantised_kernels_and_optimizer_state(mesh):
        qlora, full = mesh[0]["layouts"]["qlora"], mesh[0]["layouts"]["full"]
        for path in ("block_0/attention/q_proj/kernel", "block_0/attention/o_proj/kernel",
                     "block_0/attention/o_proj/kernel_scale", "block_0/attention/q_proj/lora_kernel_a",
                     "block_0/attention/q_proj/lora_kernel_b", "block_0/mlp/down_proj/kernel",
                     "token_embedding/embeddings"):
            assert qlora[path]["devices"] == 8 and _fraction(qlora[path]) == 1 / 8, (path, qlora[path])
        norm = qlora["block_0/pre_attention_norm/scale"]
        assert norm["shard"] == norm["shape"] and norm["devices"] == 8  # replicated on every device
        for path in ("block_0/attention/q_proj/lora_kernel_a", "block_0/attention/q_proj/lora_kernel_b"):
            moment = qlora[f"optimizer:{path}"]  # AdamW's moments lie as their variable
            assert moment["spec"] == qlora[path]["spec"] and _fraction(moment) == 1 / 8
        for path in ("token_embedding/embeddings", "block_0/attention/q_proj/kernel", "block_0/mlp/down_proj/kernel"):
            assert _fraction(full[path]) == 1 / 8 and full[f"optimizer:{path}"]["spec"] == full[path]["spec"], path

    def test_a_width_the_model_axis_does_not_divide_stays_replicated(mesh):
        layouts, replicated = mesh[0]["layouts"]["odd_width"], mesh[0]["replicated"]["odd_width"]
        assert "block_0/attention/o_proj/kernel" in replicated  # hidden 60 over 8 devices
        assert layouts["block_0/attention/o_proj/kernel"]["shard"] == layouts["block_0/attention/o_proj/kernel"]["shape"]
        assert mesh[0]["replicated"]["full"] == []

    @pytest.mark.parametrize("case, key", [("batch_6_over_8", "train.batch_size"), ("mesh_3x2_of_8", "distribution.mesh"),
                                           ("devices_16_of_8", "distribution.devices")])
    def test_a_batch_or_mesh_the_devices_cannot_make_exits_2_naming_the_key(mesh, case, key):
        result, log = mesh
        assert result["refused"][case] == {"exit": 2, "made_dir": False}
        message = next(line for line in log.splitlines() if line.startswith("gemma-tune: error") and key in line)
        assert "expected" in message and "Traceback" not in log, message

    @pytest.mark.parametrize("where", ["one_device", "mesh_2x4"])
    def test_an_eight_device_checkpoint_continues_on_another_mesh(mesh, where):
        result, _ = mesh
        np.testing.assert_allclose(result["resumed"][where], result["losses"]["fsdp"][2:], rtol=1e-5)

    def test_two_hosts_train_as_one_and_write_one_checkpoint(mesh):
        hosts, result = mesh[0]["hosts"], mesh[0]
        assert hosts["exits"] == [0, 0], hosts["log"]
        assert "job       process 0 of 2 (8 devices, 4 here)" in hosts["log"]
        np.testing.assert_allclose(hosts["losses"], result["losses"]["fsdp"], rtol=1e-5)
        assert hosts["checkpoints"] == ["step_2", "step_4"]  # the writer's, in the run directory
        assert hosts["weights_vs_one_process"] < 1e-5  # the shards of both hosts, gathered

    def test_two_hosts_continue_from_their_checkpoint(mesh):
        hosts, result = mesh[0]["hosts"], mesh[0]
        assert hosts["resumed_exits"] == [0, 0], hosts["log"]
        np.testing.assert_allclose(hosts["resumed"], result["losses"]["fsdp"][2:], rtol=1e-5)

    def test_a_multi_host_job_refuses_sampling_during_training(mesh):
        hosts = mesh[0]["hosts"]
        assert hosts["refused"] == [2, 2]
        assert "train.sample_prompts" in hosts["refusal"] and "Traceback" not in hosts["refusal"]
