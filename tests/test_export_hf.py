"""Export to Hugging Face safetensors and PEFT adapters, checked by loading our files with transformers
and peft (same float32 logits within 1e-4), by loading them back with load_model (bit-exact), and for
atomicity, overwrite refusal and the files' contents."""

import json

import keras
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from gemma_tune import load_model
from gemma_tune.checkpoints import hf as hf_module
from gemma_tune.checkpoints import hf_names
from gemma_tune.checkpoints.hf_names import name_map
from gemma_tune.checkpoints.peft import load_peft_adapter
from gemma_tune.config.presets import preset_architecture
from gemma_tune.data.render import chat_pieces
from gemma_tune.errors import CheckpointError, UserError
from gemma_tune.export import export_model
from gemma_tune.models import build_model, enable_lora, float_kernel, get_variable, lora_projections, projections
from gemma_tune.tokenizer import load_tokenizer

TOL = 1e-4
TOKENIZER = "data/tiny/tokenizer.model"
BASE = dict(vocab_size=512, num_layers=4, sliding_window=8, max_position_embeddings=128)
ARCHS = {
    "gemma3": dict(BASE, sliding_window_pattern=2, rope_scaling_factor=4.0, query_pre_attn_scalar=24),
    "gemma2": dict(BASE, family="gemma2", use_qk_norm=False, rope_local_theta=None, rope_scaling_factor=1.0,
                   rope_theta=10_000.0, sliding_window_pattern=2, attn_logit_softcap=5.0, final_logit_softcap=3.0,
                   query_pre_attn_scalar=32),
    "gemma": dict(BASE, family="gemma", use_qk_norm=False, use_post_attention_norm=False, use_post_ffw_norm=False,
                  rope_local_theta=None, rope_scaling_factor=1.0, rope_theta=10_000.0, sliding_window=None,
                  sliding_window_pattern=None, query_pre_attn_scalar=None),
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


def random_model(family: str, seed: int = 0):
    """A tiny model of `family` with every weight random (norms included)."""
    model = build_model(preset_architecture("gemma3_tiny", **ARCHS[family]))
    rng = np.random.RandomState(seed)
    for v in model.weights:
        v.assign(rng.normal(0.0, 0.3 if len(v.shape) == 1 else 0.08, v.shape).astype(np.float32))
    return model


def add_lora(model, seed: int = 1, targets=("q", "k", "v", "o", "gate", "up", "down"), dropout=0.0):
    enable_lora(model, rank=4, alpha=8.0, targets=targets, dropout=dropout)
    rng = np.random.RandomState(seed)
    for _, layer in lora_projections(model):  # B is zeros at init: make the update real
        for v in (layer.lora_kernel_a, layer.lora_kernel_b):
            v.assign(rng.normal(0.0, 0.2, v.shape).astype(np.float32))
    return model


IDS = np.random.RandomState(0).randint(3, 512, (2, 20)).astype(np.int32)


def ours(model, ids=IDS):
    return keras.ops.convert_to_numpy(model({"token_ids": ids, "padding_mask": np.ones_like(ids)})).astype(np.float32)


def transformers_logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.float().numpy()


def hf_model(path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


@pytest.mark.parametrize("family", sorted(ARCHS))
def test_merged_lora_export_loads_in_transformers_with_our_logits(family, tokenizer, tmp_path):
    model = add_lora(random_model(family))
    out = export_model(model, tokenizer, tmp_path / "hf", "safetensors")
    expected = ours(model)
    assert np.abs(expected).max() > 1.0
    assert np.abs(transformers_logits(hf_model(out)) - expected).max() <= TOL


def test_unmerged_export_is_the_base_model(tokenizer, tmp_path):
    model = random_model("gemma2")
    base = ours(model)
    add_lora(model)
    assert np.abs(ours(model) - base).max() > 0.1  # the adapters change the function ...
    out = export_model(model, tokenizer, tmp_path / "hf", "safetensors", merge_lora=False)
    assert np.abs(transformers_logits(hf_model(out)) - base).max() <= TOL  # ... and are left out


def test_peft_adapter_applied_by_peft_gives_our_logits(tokenizer, tmp_path):
    import peft

    model = random_model("gemma3")
    base_dir = export_model(model, tokenizer, tmp_path / "base", "safetensors")
    model.checkpoint_source = str(base_dir)  # as load_model records it
    add_lora(model, targets=("q", "v", "down"), dropout=0.05)
    adapter = export_model(model, tokenizer, tmp_path / "adapter", "peft")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["task_type"]) == (4, 8.0, 0.05,
                                                                                               "CAUSAL_LM")
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(base_dir.absolute())
    with safe_open(adapter / "adapter_model.safetensors", "np") as f:
        a = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    assert a.shape == (4, 64) and b.shape == (64, 4)

    expected = ours(model)
    applied = peft.PeftModel.from_pretrained(hf_model(base_dir), adapter).eval()
    assert np.abs(transformers_logits(applied) - expected).max() <= TOL
    # load_model reads the adapter, loads the base it names and applies it
    reloaded = load_model(adapter)
    assert len(list(lora_projections(reloaded))) == 3 * 4
    assert np.abs(ours(reloaded) - expected).max() <= TOL


def test_peft_export_needs_adapters(tokenizer, tmp_path):
    with pytest.raises(CheckpointError, match="no LoRA adapters"):
        export_model(random_model("gemma"), tokenizer, tmp_path / "adapter", "peft")
    assert not (tmp_path / "adapter").exists()


def test_round_trip_is_bit_exact_in_float32(tokenizer, tmp_path):
    model = random_model("gemma3")
    back = load_model(export_model(model, tokenizer, tmp_path / "plain", "safetensors"))
    for tensor in name_map(model.architecture):
        assert np.array_equal(keras.ops.convert_to_numpy(get_variable(back, tensor.ours)),
                              keras.ops.convert_to_numpy(get_variable(model, tensor.ours))), tensor.ours
    assert np.array_equal(ours(back), ours(model))

    add_lora(model)
    merged = load_model(export_model(model, tokenizer, tmp_path / "merged", "safetensors"))
    for path, layer in projections(model):
        assert np.array_equal(keras.ops.convert_to_numpy(get_variable(merged, path + ".kernel")),
                              float_kernel(layer, merge_lora=True)), path
    assert np.abs(ours(merged) - ours(model)).max() <= TOL


def test_bfloat16_export(tokenizer, tmp_path):
    model = add_lora(random_model("gemma3"))
    out = export_model(model, tokenizer, tmp_path / "bf16", "safetensors", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "np") as f:
        q = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
        norm = f.get_tensor("model.layers.1.input_layernorm.weight")
    assert q.dtype == ml_dtypes.bfloat16 and norm.dtype == ml_dtypes.bfloat16
    # merged in float32, then rounded once
    layer = dict(projections(model))["blocks.1.attention.q_proj"]
    assert np.array_equal(q, float_kernel(layer, merge_lora=True).T.astype(ml_dtypes.bfloat16))
    # transformers and load_model read the same bfloat16 weights to the same function
    reference = transformers_logits(hf_model(out))
    assert np.abs(ours(load_model(out)) - reference).max() <= TOL
    assert np.abs(reference - ours(model)).max() < 0.5  # and it is the model, up to bfloat16 rounding


def test_quantised_base_is_dequantised(tokenizer, tmp_path):
    model = random_model("gemma")
    layers = dict(projections(model))
    quantised = {"blocks.2.mlp.down_proj": "int8", "blocks.0.attention.q_proj": "int4"}
    for path, mode in quantised.items():  # as quantize_base does, on two layers (Keras' quantize is slow)
        layers[path].quantize(mode, type_check=False)
    add_lora(model)
    out = export_model(model, tokenizer, tmp_path / "q", "safetensors")
    with safe_open(out / "model.safetensors", "np") as f:
        for path in quantised:
            name = "model." + hf_names.hf_projection_name(path) + ".weight"
            exported = f.get_tensor(name)
            assert exported.dtype == np.float32
            assert np.array_equal(exported, float_kernel(layers[path], merge_lora=True).T), path
    assert np.abs(transformers_logits(hf_model(out)) - ours(load_model(out))).max() <= TOL


def test_sharded_export(tokenizer, tmp_path):
    model = random_model("gemma2")
    out = export_model(model, tokenizer, tmp_path / "sharded", "safetensors", max_shard_size=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(4 * np.prod(v.shape) for v in model.weights)
    assert len(index["weight_map"]) == len(name_map(model.architecture))
    assert np.abs(transformers_logits(hf_model(out)) - ours(model)).max() <= TOL


def test_config_json_has_every_field(tokenizer, tmp_path):
    out = export_model(random_model("gemma3"), tokenizer, tmp_path / "hf", "safetensors")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["model_type"] == "gemma3_text"
    assert config["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert (config["sliding_window"], config["sliding_window_pattern"], config["query_pre_attn_scalar"]) == (8, 2, 24)
    assert config["rope_parameters"] == {
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert (config["rope_theta"], config["rope_local_base_freq"]) == (1_000_000.0, 10_000.0)
    assert config["hidden_activation"] == "gelu_pytorch_tanh" and config["tie_word_embeddings"] is True
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "head_dim", "num_key_value_heads",
                "rms_norm_eps", "max_position_embeddings", "vocab_size", "bos_token_id", "eos_token_id"):
        assert key in config, key
    assert {p.name for p in out.iterdir()} == {"config.json", "generation_config.json", "model.safetensors",
                                               "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"}
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.eos_id, tokenizer.end_of_turn_id]


def test_tokenizer_files_load_in_transformers(tokenizer, tmp_path):
    out = export_model(random_model("gemma"), tokenizer, tmp_path / "hf", "safetensors")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "What is 2 plus 3?<end_of_turn>"
    assert hf_tok(text).input_ids == [tokenizer.bos_id] + tokenizer.encode(text)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there "},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    pieces = chat_pieces([(m["role"], m["content"]) for m in messages] + [("model", "Bye.")], tokenizer.bos_id)
    ours_text = "".join("<bos>" if text is None else text for text, _, _ in pieces)
    theirs = hf_tok.apply_chat_template(messages + [{"role": "assistant", "content": "Bye."}], tokenize=False)
    assert theirs == ours_text
    prompt = hf_tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n"


def test_a_failing_export_leaves_nothing(tokenizer, tmp_path, monkeypatch):
    model = random_model("gemma")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_module, "write_hf_tokenizer_files", broken)  # fails after the weights are written
    with pytest.raises(OSError, match="disk full"):
        export_model(model, tokenizer, tmp_path / "out", "safetensors")
    assert list(tmp_path.iterdir()) == []

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("previous export")
    with pytest.raises(OSError, match="disk full"):
        export_model(model, tokenizer, tmp_path / "out", "safetensors", force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_non_empty_out_dir_is_refused_without_force(tokenizer, tmp_path):
    model = random_model("gemma")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(UserError, match="not empty.*--force"):
        export_model(model, tokenizer, out, "safetensors")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    export_model(model, tokenizer, out, "safetensors", force=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export_model(model, tokenizer, empty, "safetensors") / "config.json").is_file()


def test_bad_format_and_dtype(tokenizer, tmp_path):
    model = random_model("gemma")
    with pytest.raises(UserError, match="unknown export format 'onnx'"):
        export_model(model, tokenizer, tmp_path / "a", "onnx")
    with pytest.raises(UserError, match="unknown export dtype 'int8'"):
        export_model(model, tokenizer, tmp_path / "b", "safetensors", dtype="int8")
    assert list(tmp_path.iterdir()) == []


def test_adapter_written_by_peft_loads_onto_our_model(tokenizer, tmp_path):
    import peft

    base_dir = export_model(random_model("gemma2"), tokenizer, tmp_path / "base", "safetensors")
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj", "up_proj"], use_rslora=True,
                             task_type="CAUSAL_LM")
    applied = peft.get_peft_model(hf_model(base_dir), config).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in applied.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.2)
    applied.save_pretrained(tmp_path / "adapter")
    loaded = load_model(tmp_path / "adapter")  # its base_model_name_or_path is base_dir
    assert len(list(lora_projections(loaded))) == 3 * 4
    assert np.abs(ours(loaded) - transformers_logits(applied)).max() <= TOL


@pytest.mark.parametrize("change,expected", [
    ({"use_dora": True}, "use_dora"),
    ({"target_modules": "all-linear"}, "expected a list"),
    ({"target_modules": ["lm_head"]}, "not Gemma projections"),
    ({"peft_type": "IA3"}, "only LORA"),
    ({"bias": "all"}, "bias"),
])
def test_adapters_we_cannot_apply_are_refused(tokenizer, tmp_path, change, expected):
    model = add_lora(random_model("gemma"))
    adapter = export_model(model, tokenizer, tmp_path / "adapter", "peft")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=expected):
        load_peft_adapter(random_model("gemma"), adapter)
