"""GGUF export (gemma_tune.export.gguf) and its Ollama Modelfile, read back with gguf-py's own reader: every
tensor (name, type, shape [out, in], values with the RMSNorm +1 and the folded query scale) and every
metadata key of tiny random Gemma 1, 2 and 3 models; the quantised types exactly as gguf-py quantises the
expected values, norms in F32, the F16 fallback for rows that are not a multiple of 32; LoRA merged; the CLI
(`--format gguf --quantize`, `--tokenizer`) and its errors (exit 2). The marker `llama_cpp` (deselected by
default: llama-cpp-python builds llama.cpp from source) loads the f32 files in llama.cpp itself and
compares its logits, tokenization and greedy tokens with ours (bench/gguf_llama_cpp.py measures every type)."""

import importlib.util
import logging
from pathlib import Path

import gguf
import keras
import numpy as np
import pytest
import sentencepiece as spm

from gemma_tune.cli import main
from gemma_tune.config import load_recipe
from gemma_tune.config.presets import preset_architecture
from gemma_tune.errors import CheckpointError, ConfigError, UserError
from gemma_tune.export import export_model, recipe_export_options
from gemma_tune.export.modelfile import modelfile_text, sampling_defaults
from gemma_tune.models import RewardModel, build_model, enable_lora, float_weight, lora_projections, quantize_base

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tiny" / "tokenizer.model"
BASE = dict(vocab_size=512, num_layers=4, sliding_window=8, max_position_embeddings=128)
ARCHS = {
    "gemma": dict(BASE, family="gemma", use_qk_norm=False, use_post_attention_norm=False, use_post_ffw_norm=False,
                  rope_local_theta=None, rope_scaling_factor=2.0, rope_theta=500.0, sliding_window=None,
                  sliding_window_pattern=None, query_pre_attn_scalar=None),
    # query_pre_attn_scalar != head_dim: folded into attn_q
    "gemma2": dict(BASE, family="gemma2", use_qk_norm=False, rope_local_theta=None, rope_scaling_factor=1.0,
                   rope_theta=10_000.0, sliding_window_pattern=2, attn_logit_softcap=5.0, final_logit_softcap=3.0,
                   query_pre_attn_scalar=32),
    # folded into the q-norm; linear RoPE x4 on global layers, local theta 10k
    "gemma3": dict(BASE, sliding_window_pattern=2, rope_scaling_factor=4.0, query_pre_attn_scalar=24),
}
TYPES = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}


def random_model(family: str, seed: int = 0, **overrides):
    model = build_model(preset_architecture("gemma3_tiny", **{**ARCHS[family], **overrides}))
    rng = np.random.RandomState(seed)
    for v in model.weights:
        v.assign(rng.normal(0.0, 0.3 if len(v.shape) == 1 else 0.08, v.shape).astype(np.float32))
    return model


def add_lora(model, seed: int = 1):
    enable_lora(model, rank=4, alpha=8.0)
    rng = np.random.RandomState(seed)
    for _, layer in lora_projections(model):
        for v in (layer.lora_kernel_a, layer.lora_kernel_b):
            v.assign(rng.normal(0.0, 0.2, v.shape).astype(np.float32))
    return model


@pytest.fixture(scope="module")
def models():
    return {family: random_model(family) for family in ARCHS}


@pytest.fixture(scope="module")
def exports(models, tok, tmp_path_factory):
    """{family: the f32 GGUF export directory}."""
    root = tmp_path_factory.mktemp("gguf")
    return {family: export_model(model, tok, root / family, "gguf") for family, model in models.items()}


def read(directory) -> gguf.GGUFReader:
    return gguf.GGUFReader(Path(directory) / "model.gguf")


def metadata(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def expected_tensors(model) -> dict[str, np.ndarray]:
    """What llama.cpp must read: [out, in] matrices, 1 + w norms, the query scale folded as llama.cpp scales
    by 1/sqrt(head_dim) (these tiny models are no 27B)."""
    arch = model.architecture
    fold = np.float32(((arch.query_pre_attn_scalar or arch.head_dim) / arch.head_dim) ** -0.5)

    def w(path):
        return float_weight(model, path)

    out = {"token_embd.weight": w("token_embedding.embeddings")}
    for i in range(arch.num_layers):
        b, o = f"blk.{i}.", f"blocks.{i}."
        out[b + "attn_norm.weight"] = w(o + "pre_attention_norm.scale") + 1
        q = w(o + "attention.q_proj.kernel").T
        out[b + "attn_q.weight"] = q if arch.use_qk_norm else q * fold
        for name, path in (("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
            out[b + name + ".weight"] = w(o + f"attention.{path}.kernel").T
        if arch.use_qk_norm:
            out[b + "attn_q_norm.weight"] = (w(o + "attention.q_norm.scale") + 1) * fold
            out[b + "attn_k_norm.weight"] = w(o + "attention.k_norm.scale") + 1
        if arch.use_post_attention_norm:
            out[b + "post_attention_norm.weight"] = w(o + "post_attention_norm.scale") + 1
        out[b + "ffn_norm.weight"] = w(o + "pre_ffw_norm.scale") + 1
        for name in ("gate", "up", "down"):
            out[b + f"ffn_{name}.weight"] = w(o + f"mlp.{name}_proj.kernel").T
        if arch.use_post_ffw_norm:
            out[b + "post_ffw_norm.weight"] = w(o + "post_ffw_norm.scale") + 1
    out["output_norm.weight"] = w("final_norm.scale") + 1
    return out


def expected_metadata(family: str, arch, file_type: int) -> dict:
    """Every key the file must hold besides the tokenizer's arrays and template."""
    a = family
    keys = {"general.architecture": family, "general.name": "gemma_tune", "general.file_type": file_type,
            "general.quantization_version": 2, f"{a}.context_length": 128, f"{a}.embedding_length": 64,
            f"{a}.block_count": 4, f"{a}.feed_forward_length": 128, f"{a}.attention.head_count": 4,
            f"{a}.attention.head_count_kv": 2, f"{a}.attention.key_length": 16, f"{a}.attention.value_length": 16,
            f"{a}.attention.layer_norm_rms_epsilon": pytest.approx(1e-6), f"{a}.rope.freq_base": arch.rope_theta,
            "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.bos_token_id": 2,
            "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 3,
            "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.eot_token_id": 5,
            "tokenizer.ggml.fim_pre_token_id": 9, "tokenizer.ggml.fim_mid_token_id": 10,
            "tokenizer.ggml.fim_suf_token_id": 11, "tokenizer.ggml.fim_sep_token_id": 12,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
            "tokenizer.ggml.add_space_prefix": False}
    if arch.rope_scaling_factor != 1.0:
        keys.update({f"{a}.rope.scaling.type": "linear", f"{a}.rope.scaling.factor": arch.rope_scaling_factor})
    if family != "gemma":
        keys.update({f"{a}.attention.sliding_window": 8, f"{a}.attention.sliding_window_pattern": 2,
                     f"{a}.rope.freq_base_swa": arch.rope_local_theta or arch.rope_theta})
    if family == "gemma2":
        keys.update({"gemma2.attn_logit_softcapping": 5.0, "gemma2.final_logit_softcapping": 3.0})
    return keys


@pytest.mark.parametrize("family", sorted(ARCHS))
def test_f32_tensors_and_metadata_round_trip(family, models, exports):
    model, reader = models[family], read(exports[family])
    expected = expected_tensors(model)
    assert [t.name for t in reader.tensors] == list(expected)
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
        assert tuple(int(d) for d in t.shape) == expected[t.name].shape[::-1], t.name  # GGUF lists ne: [in, out]
        np.testing.assert_array_equal(np.asarray(t.data), expected[t.name], err_msg=t.name)
    assert np.abs(expected["blk.0.attn_norm.weight"] - float_weight(model, "blocks.0.pre_attention_norm.scale")
                  ).max() == pytest.approx(1.0)  # the +1 is really there

    found = metadata(reader)
    arrays = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.chat_template"}
    assert {k: v for k, v in found.items() if k not in arrays} == expected_metadata(family, model.architecture, 0)
    assert set(found) - set(expected_metadata(family, model.architecture, 0)) == arrays


def test_vocabulary_is_the_sentencepiece_model(exports):
    from gemma_tune.checkpoints.hf_tokenizer import CHAT_TEMPLATE

    fields = metadata(read(exports["gemma3"]))
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    tokens, scores, types = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    assert len(tokens) == len(scores) == len(types) == sp.vocab_size() == 512
    assert tokens == [sp.id_to_piece(i) for i in range(512)]
    np.testing.assert_allclose(scores, [sp.get_score(i) for i in range(512)])
    kinds = gguf.TokenType
    special = {"<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<mask>", "<|fim_prefix|>",
               "<|fim_middle|>", "<|fim_suffix|>", "<|file_separator|>"}
    for i in range(512):
        want = (kinds.CONTROL if sp.IsControl(i) or sp.id_to_piece(i) in special else kinds.UNKNOWN if sp.IsUnknown(i)
                else kinds.BYTE if sp.IsByte(i) else kinds.NORMAL)
        assert types[i] == want, (i, sp.id_to_piece(i))
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE


def test_embedding_rows_beyond_the_tokenizer_are_unused_pads(tok, tmp_path):
    model = random_model("gemma3", vocab_size=520)
    fields = metadata(read(export_model(model, tok, tmp_path / "g", "gguf")))
    assert fields["tokenizer.ggml.tokens"][512:] == [f"[PAD{i}]" for i in range(512, 520)]
    assert set(fields["tokenizer.ggml.token_type"][512:]) == {gguf.TokenType.UNUSED}
    assert fields["tokenizer.ggml.scores"][512:] == [-10000.0] * 8


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_quantised_types_hold_the_quantised_values(kind, models, tok, tmp_path):
    model = models["gemma3"]
    reader = read(export_model(model, tok, tmp_path / kind, "gguf", quantize=kind))
    expected = expected_tensors(model)
    file_type = {"f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2}[kind]
    assert metadata(reader)["general.file_type"] == file_type
    for t in reader.tensors:
        value = expected[t.name]
        if value.ndim == 1:
            assert t.tensor_type.name == "F32" and np.array_equal(np.asarray(t.data), value), t.name
            continue
        want = "Q8_0" if (kind == "q4_0" and t.name == "token_embd.weight") else TYPES[kind]
        assert t.tensor_type.name == want, t.name
        qtype = gguf.GGMLQuantizationType[want]
        exact = gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype)
        np.testing.assert_array_equal(gguf.quants.dequantize(np.asarray(t.data), qtype), exact, err_msg=t.name)


def test_rows_not_a_multiple_of_32_fall_back_to_f16(tok, tmp_path, caplog):
    model = random_model("gemma3", hidden_size=48)
    with caplog.at_level(logging.WARNING, logger="gemma_tune"):
        reader = read(export_model(model, tok, tmp_path / "q8", "gguf", quantize="q8_0"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    for name in ("token_embd", "blk.0.attn_q", "blk.0.attn_k", "blk.0.attn_v", "blk.0.ffn_gate", "blk.0.ffn_up"):
        assert types[name + ".weight"] == "F16", name  # rows of 48 inputs
    assert types["blk.0.attn_output.weight"] == types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 64, 128
    assert "F16 instead" in caplog.text and "multiple of Q8_0's block of 32" in caplog.text


def test_lora_is_merged_and_a_quantised_base_dequantised(tok, tmp_path):
    model = add_lora(random_model("gemma2"))
    reader = read(export_model(model, tok, tmp_path / "lora", "gguf"))
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    layer = model.blocks[1].mlp.down_proj
    a, b, base = (keras.ops.convert_to_numpy(v).astype(np.float32)
                  for v in (layer.lora_kernel_a, layer.lora_kernel_b, layer._kernel))
    np.testing.assert_allclose(tensors["blk.1.ffn_down.weight"], (base + 2.0 * a @ b).T, rtol=1e-6, atol=1e-6)
    assert np.abs(tensors["blk.1.ffn_down.weight"] - base.T).max() > 0.05
    unmerged = {t.name: np.asarray(t.data) for t in read(export_model(model, tok, tmp_path / "base", "gguf",
                                                                      merge_lora=False)).tensors}
    np.testing.assert_array_equal(unmerged["blk.1.ffn_down.weight"], base.T)

    quantised = random_model("gemma3", num_layers=1)  # (Keras collects garbage for each quantised kernel)
    quantize_base(quantised, "int8")
    add_lora(quantised)
    got = {t.name: np.asarray(t.data) for t in read(export_model(quantised, tok, tmp_path / "q", "gguf")).tensors}
    np.testing.assert_array_equal(got["blk.0.attn_v.weight"], float_weight(quantised, "blocks.0.attention.v_proj.kernel").T)


def test_modelfile_beside_the_gguf(exports):
    text = (exports["gemma"] / "Modelfile").read_text()
    lines = text.splitlines()
    assert lines[0] == "FROM ./model.gguf"
    assert 'PARAMETER stop "<end_of_turn>"' in lines
    assert {"PARAMETER temperature 1.0", "PARAMETER top_k 64", "PARAMETER top_p 0.95"} <= set(lines)
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert "<start_of_turn>user" in template and "<start_of_turn>model" in template and "<end_of_turn>" in template
    assert "<bos>" not in template  # llama.cpp adds it (add_bos_token)
    assert sorted(p.name for p in exports["gemma"].iterdir()) == ["Modelfile", "model.gguf"]


def test_modelfile_takes_the_recipe_sampling():
    recipe = load_recipe("recipes/quickstart_grpo.yaml", ["rl.temperature=0.7", "rl.top_k=20"])
    assert sampling_defaults(recipe) == {"temperature": 0.7, "top_k": 20, "top_p": 0.95}
    assert "PARAMETER temperature 0.7" in modelfile_text("model.gguf", sampling_defaults(recipe))


def test_what_llama_cpp_cannot_compute_is_refused(tok, tmp_path):
    with pytest.raises(CheckpointError, match="always soft-caps"):
        export_model(random_model("gemma2", attn_logit_softcap=None), tok, tmp_path / "a", "gguf")
    with pytest.raises(UserError, match="reward model"):
        export_model(RewardModel(random_model("gemma3")), tok, tmp_path / "b", "gguf")
    with pytest.raises(UserError, match="no tokenizer"):
        export_model(random_model("gemma3"), None, tmp_path / "c", "gguf")
    with pytest.raises(UserError, match="not a gguf quantisation.*llama-quantize"):
        export_model(random_model("gemma3"), tok, tmp_path / "d", "gguf", quantize="q4_k_m")
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def hf_dirs(models, tok, tmp_path_factory):
    """An HF export of the Gemma 3 model, and a copy of it without tokenizer files."""
    root = tmp_path_factory.mktemp("hf")
    full = export_model(models["gemma3"], tok, root / "full", "safetensors")
    bare = export_model(models["gemma3"], None, root / "bare", "safetensors")
    return full, bare


def test_cli_exports_gguf_with_a_quantisation(hf_dirs, tmp_path, capsys):
    full, _ = hf_dirs
    assert main(["export", str(full), "--format", "gguf", "--quantize", "q8_0", "--out", str(tmp_path / "g")]) == 0
    assert "exported" in capsys.readouterr().out
    assert metadata(read(tmp_path / "g"))["general.file_type"] == 7
    assert (tmp_path / "g" / "Modelfile").is_file()


def test_cli_errors_exit_2_with_one_message(hf_dirs, tmp_path, capsys):
    full, bare = hf_dirs
    assert main(["export", str(full), "--format", "gguf", "--quantize", "q5_k", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "'q5_k' is not a gguf quantisation" in err and "f32, f16, bf16, q8_0, q4_0" in err
    assert "Traceback" not in err
    assert main(["export", str(full), "--format", "keras", "--quantize", "q8_0", "--out", str(tmp_path / "b")]) == 2
    assert "expected one of int8, int4" in capsys.readouterr().err
    assert main(["export", str(bare), "--format", "gguf", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "--tokenizer PATH" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())
    assert main(["export", str(bare), "--format", "gguf", "--tokenizer", str(TOKENIZER),
                 "--out", str(tmp_path / "d")]) == 0
    assert len(metadata(read(tmp_path / "d"))["tokenizer.ggml.tokens"]) == 512


def test_recipe_export_quantize_is_checked_against_the_formats():
    recipe = load_recipe("recipes/quickstart.yaml", ["export.formats=[gguf]", "export.quantize=q4_0"])
    assert recipe.export.formats == ["gguf"] and recipe.export.quantize == "q4_0"
    with pytest.raises(ConfigError, match="q4_0 is not a keras quantisation"):
        load_recipe("recipes/quickstart.yaml", ["export.formats=[gguf, keras]", "export.quantize=q4_0"])
    with pytest.raises(ConfigError, match="applies to gguf, keras or safetensors"):
        load_recipe("recipes/quickstart.yaml", ["export.formats=[]", "export.quantize=int8"])
    recipe = load_recipe("recipes/quickstart_grpo.yaml", ["export.formats=[gguf, peft]", "export.quantize=q8_0"])
    assert recipe_export_options(recipe, "gguf") == {"quantize": "q8_0", "sampling": {"temperature": 1.0, "top_k": 4,
                                                                                       "top_p": 0.95}}
    assert recipe_export_options(recipe, "peft") == {"quantize": None, "sampling": None}


# ------------------------------------------------------------------------------------ llama.cpp itself


def _bench():
    spec = importlib.util.spec_from_file_location("gguf_llama_cpp", ROOT / "bench" / "gguf_llama_cpp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


F32_TOLERANCE = 2e-3  # relative to max |logit|: llama.cpp's CPU GELU reads a float16 table (GGML_GELU_FP16)


@pytest.mark.llama_cpp
@pytest.mark.parametrize("family", sorted(ARCHS))
def test_llama_cpp_computes_our_logits_and_tokens(family, models, exports, tok):
    bench = _bench()
    model = models[family]
    refs = bench.reference(model, tok)
    llm = bench.open_llama(exports[family] / "model.gguf")
    assert list(llm.tokenize(bench.CHAT.encode(), add_bos=True, special=True)) == refs[0][0]
    for ids, ours, greedy in refs:
        theirs = bench.llama_logits(llm, ids)
        assert np.abs(theirs - ours).max() <= F32_TOLERANCE * np.abs(ours).max()
        assert (theirs.argmax(-1) == ours.argmax(-1)).all()
        llamas = bench.llama_greedy(llm, ids, len(greedy))
        if llamas != greedy:  # only where our own top two were closer than llama.cpp's float error
            step = next(i for i, (a, b) in enumerate(zip(greedy, llamas)) if a != b)
            logits = bench.our_logits(model, ids + greedy[:step])[-1]
            assert logits[greedy[step]] - logits[llamas[step]] <= F32_TOLERANCE * np.abs(logits).max()
