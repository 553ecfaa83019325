"""Parity with transformers: tiny random Gemma / Gemma 2 / Gemma 3 checkpoints written by
`save_pretrained` load through `gemma_tune.load_model` and give the same float32 logits (max abs diff
<= 1e-4), with padding on either side, sequences longer than the sliding window, sharded files and the
multimodal Gemma 3 layout; broken checkpoints are refused with the file and tensor named."""

import json
import shutil

import keras
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from gemma_tune import load_model
from gemma_tune.errors import CheckpointError

TOL = 1e-4
VOCAB, WINDOW, BATCH, LENGTH = 256, 8, 3, 20  # LENGTH > WINDOW: the sliding layers' mask matters
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
CONFIGS = {
    "gemma": lambda: transformers.GemmaConfig(**COMMON, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    # query_pre_attn_scalar != head_dim, both soft-caps, sliding window on even layers
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                                attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    # 2 sliding : 1 global over 4 layers, linear RoPE scaling x4 on the global layers only
    "gemma3": lambda: transformers.Gemma3TextConfig(**COMMON, sliding_window=WINDOW, sliding_window_pattern=3,
                                                    query_pre_attn_scalar=32, rope_local_base_freq=100.0,
                                                    rope_theta=10_000.0,
                                                    rope_scaling={"rope_type": "linear", "factor": 4.0}),
}


def make_model(family: str):
    torch.manual_seed({"gemma": 0, "gemma2": 1, "gemma3": 2}[family])
    config = CONFIGS[family]()
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # every parameter random, norms included, so a wrong mapping shows
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if p.ndim == 1 else 0.08)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{family: (transformers model, its save_pretrained dir)}, made once per module."""
    made = {}
    for family in CONFIGS:
        model = make_model(family)
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path)
        made[family] = (model, path)
    return made


@pytest.fixture(params=sorted(CONFIGS))
def checkpoint(request, checkpoints):
    return (request.param, *checkpoints[request.param])


@pytest.fixture(scope="module")
def loaded(checkpoints):
    """{family: load_model(its checkpoint)}, loaded once for the tests that only run the model."""
    return {family: load_model(path) for family, (_, path) in checkpoints.items()}


def reference_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def our_logits(model, ids, mask):
    return keras.ops.convert_to_numpy(model({"token_ids": ids, "padding_mask": mask})).astype(np.float32)


def random_ids(batch=BATCH, length=LENGTH, seed=0):
    """Token ids; one shape [BATCH, LENGTH] for every logits test keeps eager backends' op caches warm."""
    return np.random.RandomState(seed).randint(3, VOCAB, (batch, length)).astype(np.int32)


def test_checkpoint_layout_is_what_transformers_writes(checkpoint):
    family, _, path = checkpoint
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}[family]
    assert (path / "model.safetensors").is_file()


def test_logits_match_transformers(checkpoint, loaded):
    family, reference, _ = checkpoint
    ours = loaded[family]
    assert ours.architecture.family == family
    ids = random_ids()
    mask = np.ones_like(ids)
    ref = reference_logits(reference, ids, mask)
    assert np.abs(ref).max() > 1.0  # logits far from zero: the comparison is not vacuous
    assert np.abs(our_logits(ours, ids, mask) - ref).max() <= TOL


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_transformers(checkpoint, loaded, side):
    family, reference, _ = checkpoint
    ours = loaded[family]
    ids = random_ids(seed=1)
    lengths = [LENGTH, 13, 5]
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, LENGTH - n:] = 1
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    ref = reference_logits(reference, ids, mask)
    got = our_logits(ours, ids, mask)
    real = mask.astype(bool)
    assert np.abs(got[real] - ref[real]).max() <= TOL


def test_sharded_checkpoint(checkpoint, tmp_path):
    _, reference, _ = checkpoint
    reference.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "model.safetensors").exists()
    ids = random_ids(seed=2)
    mask = np.ones_like(ids)
    assert np.abs(our_logits(load_model(tmp_path), ids, mask) - reference_logits(reference, ids, mask)).max() <= TOL


def multimodal_copy(path, dst, prefix):
    """The tiny Gemma 3 checkpoint laid out as a multimodal Gemma 3 one (config text_config, prefixed
    decoder names, a vision tensor that the text decoder ignores)."""
    config = json.loads((path / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({"model_type": "gemma3", "architectures":
                                                 ["Gemma3ForConditionalGeneration"], "text_config": config}))
    tensors = {prefix + k[len("model."):]: v for k, v in load_file(path / "model.safetensors").items()}
    tensors["vision_tower.vision_model.embeddings.patch_embedding.bias"] = np.zeros(8, np.float32)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_multimodal_gemma3_layouts(checkpoints, tmp_path, prefix):
    reference, path = checkpoints["gemma3"]
    multimodal_copy(path, tmp_path, prefix)
    ids = random_ids(seed=3)
    mask = np.ones_like(ids)
    assert np.abs(our_logits(load_model(tmp_path), ids, mask) - reference_logits(reference, ids, mask)).max() <= TOL



def test_broken_checkpoints_name_file_and_tensor(checkpoint, tmp_path, edited_copy):
    _, _, path = checkpoint
    missing = edited_copy(path, tmp_path / "missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensors.*model.layers.1.mlp.up_proj.weight"):
        load_model(missing)

    def extra(t):
        t["model.layers.9.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match="unexpected tensors.*model.layers.9.mlp.up_proj.weight"):
        load_model(edited_copy(path, tmp_path / "extra", extra))

    def wrong_shape(t):
        t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"][:32]
    with pytest.raises(CheckpointError, match=r"q_proj.weight has shape \[32, 64\]") as e:
        load_model(edited_copy(path, tmp_path / "shape", wrong_shape))
    assert e.value.where.endswith("model.safetensors")

    def untied(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"] + 1.0
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        load_model(edited_copy(path, tmp_path / "untied", untied))

    def tied(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
    assert load_model(edited_copy(path, tmp_path / "tied", tied)).architecture.vocab_size == VOCAB

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(path / "config.json", no_weights)
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(no_weights)


def test_preset_cross_check(checkpoint):
    family, _, path = checkpoint
    with pytest.raises(CheckpointError, match="does not match preset 'gemma3_tiny'"):
        load_model(path, preset="gemma3_tiny")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_model(tmp_path / "absent")


def transformers_greedy(model, prompt, new_tokens):
    model.generation_config.eos_token_id = None  # run the full length, as stop_ids=() does for ours
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_generation_matches_transformers(checkpoint, loaded):
    """Batched prompts of different lengths (left-padded in ours), decoding past the sliding window."""
    from gemma_tune.generate import generate_ids

    family, reference, _ = checkpoint
    prompts = [random_ids(1, 7, seed=4)[0].tolist(), random_ids(1, 3, seed=5)[0].tolist()]
    new_tokens = WINDOW + 4  # 7 + 12 tokens: past the window
    ours = generate_ids(loaded[family], prompts, max_new_tokens=new_tokens, temperature=0.0, stop_ids=())
    assert ours == [transformers_greedy(reference, p, new_tokens) for p in prompts]


def test_other_model_types_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(CheckpointError, match="model_type 'llama' is not a Gemma decoder"):
        load_model(tmp_path)


def test_load_in_bfloat16(checkpoints):
    reference, path = checkpoints["gemma3"]
    model = load_model(path, dtype="bfloat16")
    embedding = model.token_embedding.embeddings
    assert "bfloat16" in str(embedding.dtype)
    expected = reference.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
    assert np.array_equal(keras.ops.convert_to_numpy(keras.ops.cast(embedding, "float32")), expected)
    ids = random_ids()
    mask = np.ones_like(ids)
    diff = np.abs(our_logits(model, ids, mask) - reference_logits(reference, ids, mask)).max()
    assert diff < 0.05 * np.abs(reference_logits(reference, ids, mask)).max()  # bfloat16 rounding only
