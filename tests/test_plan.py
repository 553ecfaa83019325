"""The memory plan (gemma_tune.plan): parameter counts against built models and published sizes, bytes by hand
for a tiny configuration, sharding, fits and warnings, mode auto, and `gemma-tune plan`."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gemma_tune.config import load_recipe
from gemma_tune.distribute.mesh import MeshShape
from gemma_tune.errors import ConfigError
from gemma_tune.plan import (DEVICES, GB, HEADROOM, choose_mode, estimate, find_device, flash_attention_applies,
                             model_weights, parameter_count, plan_for_run)

ROOT = Path(__file__).resolve().parents[1]
QUICK = "recipes/quickstart.yaml"
ONE = MeshShape("none")
BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}

# A hand-checkable model: Gemma 1 layout (two norms per block, no QK-norm), 2 blocks of d 64, I 128, 2 heads
# of 32 (q 64) sharing 1 key/value head (kv 32), vocabulary 512; LoRA rank 4 on q and v; float32, AdamW;
# micro-batch 2 rows × 8 tokens (n = 16), loss chunks of 4 tokens.
HAND = ["model.architecture.family=gemma", "model.architecture.use_post_attention_norm=false",
        "model.architecture.use_post_ffw_norm=false", "model.architecture.use_qk_norm=false",
        "model.architecture.sliding_window=null", "model.architecture.hidden_size=64",
        "model.architecture.intermediate_size=128", "model.architecture.num_layers=2", "model.architecture.num_heads=2",
        "model.architecture.num_kv_heads=1", "model.architecture.head_dim=32",
        "model.architecture.query_pre_attn_scalar=32", "lora.rank=4", "lora.targets=[q,v]", "train.batch_size=2",
        "data.max_length=8", "train.loss_chunk_size=4"]


def recipe(*overrides, source=QUICK):
    return load_recipe(source, list(overrides))


def built(r):
    """The model the trainer builds for recipe `r` (gemma_tune.train.build) and the reward head if any."""
    from gemma_tune.models.reward import score_head
    from gemma_tune.train.build import build_for_recipe

    model, _ = build_for_recipe(r)
    return model, ([score_head(model.architecture.hidden_size)] if r.method == "reward" else [])


def stored_bytes(variables) -> int:
    return sum(math.prod(v.shape) * BYTES[str(v.dtype)] for v in variables)


CASES = {
    "gemma3 LoRA float32": (),
    "gemma3 LoRA q,v rank 8": ("lora.targets=[q,v]", "lora.rank=8"),
    "gemma3 full float32": ("lora=null",),
    "gemma3 LoRA bfloat16 (bf16 base)": ("model.dtype=bfloat16",),
    "gemma3 full bfloat16 (float32 variables)": ("lora=null", "model.dtype=bfloat16"),
    "gemma3 int8 base": ("model.dtype=bfloat16", "quantize=int8", "model.architecture.num_layers=1"),
    "gemma3 int4 base": ("quantize=int4", "model.architecture.num_layers=1"),
    "paligemma LoRA": ("source=recipes/paligemma_quickstart.yaml",),
    "paligemma full, vision all": ("source=recipes/paligemma_quickstart.yaml", "lora=null", "model.train_vision=all"),
    "paligemma LoRA, projector": ("source=recipes/paligemma_quickstart.yaml", "model.train_vision=projector",
                                  "model.dtype=bfloat16"),
    "reward head": ("source=recipes/quickstart_dpo.yaml", "method=reward", "preference=null"),
}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request):
    args = CASES[request.param]
    source = next((a.split("=", 1)[1] for a in args if a.startswith("source=")), QUICK)
    r = recipe(*(a for a in args if not a.startswith("source=")), source=source)
    model, heads = built(r)
    return r, model, heads


def test_parameter_counts_and_bytes_equal_the_built_model(case):
    from gemma_tune.models import count_params

    r, model, heads = case
    plan = estimate(r, ONE)
    variables = list(model.weights) + [v for head in heads for v in head.weights]
    trainable = list(model.trainable_weights) + [v for head in heads for v in head.trainable_weights]
    counts = count_params(model)
    head_params = sum(math.prod(v.shape) for v in variables[len(model.weights):])
    if r.quantize is None:
        assert plan.params == counts["total"] + head_params
    else:  # count_params counts stored elements: packed int4 kernels and the scales
        weights = model_weights(model.architecture, r)
        assert sum(math.prod(w.stored_shape) * w.count for w in weights) == counts["total"]
    assert plan.trainable == counts["trainable"] + head_params
    assert plan.weights == stored_bytes(variables)
    assert plan.gradients == stored_bytes(trainable)


# Published parameter counts (the Hugging Face checkpoints' safetensors totals).
PUBLISHED = {"gemma3_270m": 268_098_176, "gemma3_1b": 999_885_952, "gemma3_4b": 4_300_079_472,
             "gemma3_12b": 12_187_325_040, "gemma3_27b": 27_432_406_640, "gemma2_2b": 2_614_341_888,
             "gemma2_9b": 9_241_705_984, "gemma2_27b": 27_227_128_320, "gemma_7b": 8_537_680_896,
             "paligemma_3b_224": 2_923_466_480}


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_real_presets_match_published_counts(preset):
    from gemma_tune.config.presets import preset_architecture

    full = recipe("lora=null")
    assert parameter_count(model_weights(preset_architecture(preset), full)) == PUBLISHED[preset]


def test_bytes_by_hand_for_a_tiny_configuration():
    plan = estimate(recipe(*HAND), ONE)
    # embedding 512·64 = 32768; per block q 64·64 + k 64·32 + v 64·32 + o 64·64 + gate/up/down 3·64·128
    # = 36864 and norms 2·64 = 128, two blocks 73984; final norm 64; LoRA q 4·(64+64) + v 4·(64+32) = 896 per
    # block, 1792
    assert (plan.params, plan.trainable) == (32768 + 73984 + 64 + 1792, 1792)
    assert plan.weights == 108608 * 4 == 434432
    assert plan.gradients == 1792 * 4 == 7168
    assert plan.optimizer == 2 * 7168 == 14336  # AdamW: two float32 moments
    assert plan.accumulators == 0 and plan.reference == 0 and plan.gathered == {False: 0, True: 0}
    assert plan.batch == 2 * 8 * 5 * 4 == 320  # five int32/float32 arrays per token
    # one block, n = 16 tokens, c = 4: MLP 4 arrays of I (gate, up, tanh, gelu; down is not trained) = 16·4·128·4
    mlp = 32768
    # per token: 2 norm inputs 2·64·4 = 512, the q/v input 64·4 = 256, rotated q, k, v (64+32+32)·4 = 512,
    # RoPE 8·32 = 256, x·A of 2 adapters 2·4·4 = 32 -> 1568 · 16 = 25088;
    # scores 2 rows · 2 heads · 8² · 12 = 3072
    block = mlp + 25088 + 3072
    around = 16 * 3 * 64 * 4  # embedding output, final norm's input and output
    assert plan.activations == {False: 2 * block + around, True: 2 * 16 * 64 * 4 + around}
    assert plan.activations[False] == 134144
    assert plan.block_backward == {False: mlp, True: block + mlp}  # max(MLP cotangents, 2·2·8²·8 = 2048)
    assert plan.loss_chunk == 4 * 512 * 8 == 16384  # float32 logits and their exponentials
    assert plan.weight_copies == {False: 0, True: 0} and plan.head_gradients == 0
    persistent = 434432 + 14336
    assert plan.step(False) == persistent + 320 + 134144 + max(16384, mlp) == 616000
    assert plan.step(True) == persistent + 320 + (8192 + around) + max(16384, block + mlp) == 563264
    assert plan.total() == plan.total(False) == 616000  # the recipe's remat is off


def test_long_rows_plan_the_chunked_attention_path():
    """From 2048 tokens on (tiling.CHUNKED_FROM) attention runs in tiles of 1024 queries: no [T, T] scores kept,
    the top block's backward holds one tile's (on XLA:CPU every tile of a global layer)."""
    long = (*HAND, "data.max_length=8192", "train.batch_size=1", "model.architecture.max_position_embeddings=8192")
    plan, cpu = estimate(recipe(*long), ONE), estimate(recipe(*long), ONE, platform="cpu")
    tokens, mlp = 8192, 8192 * 4 * 128 * 4
    block = mlp + 1568 * tokens  # the hand configuration's per-token residuals, no scores
    assert plan.activations[False] == 2 * block + tokens * 3 * 64 * 4
    tile = 1 * 2 * 1024 * 8192 * (12 + 8)  # one tile's recomputed scores and their cotangents, 2 heads
    assert plan.block_backward == {False: tile, True: block + tile}
    every_tile = 2 * 1024 * 1024 * (1 + 2 + 3 + 4 + 5 + 6 + 7 + 8) * 12
    assert cpu.block_backward[False] == every_tile
    assert any("tiles of up to 1024 queries" in note for note in plan.notes)
    many_heads = estimate(recipe(*long, "model.architecture.num_heads=64", "model.architecture.head_dim=1"), ONE)
    assert many_heads.block_backward[False] == 64 * 256 * 8192 * 20  # tiles of 256 queries: 2^27 scores
    dense = estimate(recipe(*HAND, "data.max_length=1024", "train.batch_size=1"), ONE)  # one tile: dense
    assert dense.activations[False] == 2 * (1024 * 4 * 128 * 4 + 1568 * 1024 + 2 * 1024 ** 2 * 12) + 1024 * 3 * 64 * 4


def test_sharding_divides_what_it_should():
    r = recipe(*HAND)
    one = estimate(r, ONE)
    replicated = estimate(r, MeshShape("data_parallel", batch=2))
    assert (replicated.weights, replicated.gradients, replicated.optimizer) == (one.weights, one.gradients,
                                                                               one.optimizer)
    assert replicated.activations == {k: v // 2 for k, v in one.activations.items()}  # 1 row per device
    sharded = estimate(r, MeshShape("fsdp", model=2))
    norms = (2 * 2 * 64 + 64) * 4  # block and final norm scales: replicated
    assert sharded.weights == (one.weights - norms) // 2 + norms == 217856
    assert (sharded.gradients, sharded.optimizer) == (one.gradients // 2, one.optimizer // 2)
    assert sharded.activations == replicated.activations
    # every block's gathered kernels (2 · 36864 · 4) and the embedding (512 · 64 · 4); with remat two blocks'
    assert sharded.gathered == {False: 2 * 36864 * 4 + 512 * 64 * 4, True: 2 * 36864 * 4 + 512 * 64 * 4}
    odd = estimate(r, MeshShape("fsdp", model=3))  # 3 divides no dimension: everything replicated
    assert odd.weights == one.weights


def test_fits_warning_and_summary():
    small = estimate(recipe(), ONE)
    assert small.fits(DEVICES[0].memory_bytes) and small.warning(DEVICES[0].memory_bytes) is None
    assert re.fullmatch(r"plan: 354\.0k params \(98\.3k trainable\), [\d.,]+ MiB per device, one device, "
                        r"remat off — fits T4 16 GB, TPU v5e 16 GB and larger", small.summary_line())
    edge = int(small.total() / (1 - HEADROOM))
    assert not small.fits(edge - 1) and small.fits(edge + 1)
    big = estimate(recipe("model.preset=gemma3_12b", "model.architecture=null", "model.dtype=bfloat16",
                          "data.max_length=2048", "train.batch_size=4"), ONE, platform="gpu")
    h100 = find_device("H100").memory_bytes
    assert big.total(True) < big.total(False) and not big.fits(h100)
    warning = big.warning(h100)
    assert warning.startswith("warning: ") and "does not fit 80 GB less 10% headroom" in warning
    assert "would fit: train.remat=true" in warning and "distribution.mode=fsdp on 4 devices" in warning
    assert "fits none of the listed devices" in estimate(
        recipe("model.preset=gemma3_27b", "model.architecture=null", "lora=null", "data.max_length=2048"),
        ONE).summary_line()


def test_phases_reference_and_sampler():
    dpo = recipe("preference.reference=data/tiny/model", source="recipes/quickstart_dpo.yaml")
    plain = estimate(recipe(source="recipes/quickstart_dpo.yaml"), ONE)
    named = estimate(dpo, ONE)
    assert plain.setup == 0 and named.setup > named.weights  # the named reference beside the model
    grpo_full = estimate(recipe("lora=null", "rl.beta=0.04", source="recipes/quickstart_grpo.yaml"), ONE)
    assert grpo_full.reference == grpo_full.weights and grpo_full.sampler > grpo_full.persistent()
    assert estimate(recipe(source="recipes/quickstart_grpo.yaml"), ONE).reference == 0  # LoRA: adapters off


def test_modes_and_meshes():
    small, large = recipe(), recipe("model.preset=gemma3_27b", "model.architecture=null")
    assert choose_mode(small, 1, None) == MeshShape("none")
    assert choose_mode(small, 8, None) == MeshShape("data_parallel", batch=8)
    assert choose_mode(large, 8, None) == MeshShape("fsdp", model=8)  # > 2B parameters, memory unknown
    assert choose_mode(small, 8, 80 * GB) == MeshShape("data_parallel", batch=8)
    assert choose_mode(small, 8, 1000) == MeshShape("fsdp", model=8)
    auto = recipe("distribution.mode=auto", "distribution.mesh={batch: 2, model: 4}")
    assert choose_mode(auto, 8, 1000) == MeshShape("fsdp", batch=2, model=4)
    assert plan_for_run(recipe("distribution.mode=fsdp"), 8, None).mesh == MeshShape("fsdp", model=8)
    with pytest.raises(ConfigError, match="distribution.mesh"):
        plan_for_run(recipe("distribution.mode=fsdp", "distribution.mesh={batch: 3, model: 2}"), 8, None)
    with pytest.raises(ConfigError, match="model.preset"):
        estimate(recipe("model.preset=null", "model.architecture=null", "model.weights=hf://google/gemma-3-1b-it"),
                 ONE)
    assert flash_attention_applies(recipe("model.dtype=bfloat16"), "gpu")
    assert not flash_attention_applies(recipe(), "gpu") and not flash_attention_applies(
        recipe("model.dtype=bfloat16"), "tpu")
    assert find_device("a100-40gb").name == "A100 40 GB" and find_device("tpu v5e").memory_bytes == 16 * GB
    with pytest.raises(ConfigError, match="several"):
        find_device("A100")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "gemma_tune", "plan", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_plan():
    out = cli(QUICK)
    assert out.returncode == 0, out.stderr
    for text in ("parameters   354,048", "trainable 98,304", "activations kept for the backward", "loss chunk",
                 "remat off", "remat on", "mesh         one device", "H200 141 GB", "TPU v5e 16 GB", "total"):
        assert text in out.stdout
    sharded = cli(QUICK, "distribution.mode=fsdp", "--devices", 8, "--device", "TPU v5e")
    assert sharded.returncode == 0 and "fsdp on 8 devices (mesh batch 1 × model 8)" in sharded.stdout
    assert "TPU v5e 16 GB" in sharded.stdout and " <" in sharded.stdout
    over = cli(QUICK, "model.preset=gemma3_12b", "model.architecture=null", "data.max_length=2048", "--device", "T4")
    assert over.returncode == 0 and "warning: " in over.stdout and "would fit" in over.stdout


def test_cli_plan_bad_input_and_no_backend(tmp_path):
    for args in ((QUICK, "train.batch_sise=4"), (tmp_path / "none.yaml",), (QUICK, "--device", "A100"),
                 (QUICK, "distribution.mode=fsdp", "distribution.mesh={batch: 3}", "--devices", 8)):
        out = cli(*args)
        assert out.returncode == 2 and "Traceback" not in out.stderr and out.stderr.startswith("gemma-tune: error:")
    probe = ("import sys; from gemma_tune.cli import main; main(['plan', 'recipes/quickstart.yaml']); "
             "print(sorted(m for m in ('keras', 'jax', 'torch', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("[]")
