"""GGUF export: one `model.gguf` file that llama.cpp (and so Ollama, LM Studio, llama-cpp-python) runs.

`write_gguf(model, tokenizer, path, quantize="f32", merge_lora=True, name=None) -> Path` writes the text
decoder of a Gemma 1, 2 or 3 model (CodeGemma shares Gemma 1's) with gguf-py's writer, following the
conventions of llama.cpp's own converter (`convert_hf_to_gguf.py`, its Gemma, Gemma2 and Gemma3 classes), so
that llama.cpp computes our logits:

  * `general.architecture` "gemma" | "gemma2" | "gemma3"; the `{arch}.*` hyperparameters: context_length
    (max_position_embeddings), embedding_length, block_count, feed_forward_length, attention.head_count,
    head_count_kv, key_length = value_length = head_dim, layer_norm_rms_epsilon, rope.freq_base (global
    layers), rope.scaling.type "linear" + rope.scaling.factor when the global layers scale positions;
    Gemma 2/3 with sliding layers: attention.sliding_window, attention.sliding_window_pattern (p: layer i is
    local iff (i + 1) % p != 0, llama.cpp's "every p-th layer global") and rope.freq_base_swa (the local θ);
    Gemma 2: attn_logit_softcapping and final_logit_softcapping (Gemma 3: the final one when set).
  * Tensors by llama.cpp's names, each [out, in] in NumPy row-major order (the HF orientation; our Dense
    kernels [in, out] are transposed): token_embd (the tied output head too), per block attn_norm, attn_q,
    attn_k, attn_v, attn_output, attn_q_norm / attn_k_norm (Gemma 3), post_attention_norm (Gemma 2/3),
    ffn_norm, ffn_gate, ffn_up, ffn_down, post_ffw_norm (Gemma 2/3); output_norm. RMSNorm weights are
    written as 1 + w: llama.cpp multiplies by the stored weight, Gemma by (1 + w).
  * The query scale: llama.cpp does not read one. It scales queries by 1/√head_dim, or 1/√(d_model/heads)
    for a model it takes for a 27B (Gemma 2: 46 layers, Gemma 3: 62 layers; `llama_cpp_query_scale`). When
    ours (1/√query_pre_attn_scalar) differs, the ratio is folded into the weights: the attn_q matrix
    (Gemma 1/2), or the q-norm weight (Gemma 3, whose RMSNorm would undo a scaled projection). Every
    released Gemma has ratio 1.
  * The tokenizer (`tokenizer.ggml.*`): model "llama" (SentencePiece), pre "default", every piece with its
    score and type (normal, unknown, control, user-defined, unused, byte, as the SentencePiece model says;
    Gemma's special pieces — `<start_of_turn>`, `<end_of_turn>`, … — are control tokens, as the HF
    tokenizer files mark them; other user-defined pieces have "▁" written as " ", as the converter does);
    rows of the embedding past the tokenizer's pieces are `[PADn]` unused tokens. bos / eos / unknown /
    padding ids, eot = `<end_of_turn>`, CodeGemma's fill-in-the-middle ids when the pieces exist,
    add_bos_token true, add_eos_token false, add_space_prefix as the SentencePiece normalizer says (false for
    Gemma), and `tokenizer.chat_template`: the chat template gemma_tune renders
    (`hf_tokenizer.CHAT_TEMPLATE`).

Types (`quantize`, `QUANT_TYPES`): f32, f16, bf16, q8_0, q4_0, computed in NumPy by `gguf.quants`. 1-D
tensors (the norms) stay F32, as llama.cpp keeps them. q8_0 / q4_0 quantise rows in blocks of 32: a matrix
whose rows (its input size) are not a multiple of 32 falls back to F16, as `convert_hf_to_gguf.py` falls
back (a warning names them). With q4_0 the tied token embedding — also the output projection — is written
Q8_0: llama.cpp's `llama-quantize` keeps that tensor at a higher precision too (Q6_K, which gguf-py cannot
write). Other llama.cpp types (the K-quants Q4_K_M, Q5_K_M, Q6_K, …) come from llama.cpp itself:
`llama-quantize model.gguf model-Q4_K_M.gguf Q4_K_M` on an f16 or f32 export.

LoRA adapters are merged in float32 (`float_weight`) and a quantised (int8/int4) base is dequantised before
anything is written; `merge_lora=False` writes the base alone. What llama.cpp cannot compute the same way
is a CheckpointError before anything is written (`check_gguf_expressible`): PaliGemma (prefix-LM), a reward
model, Gemma 2 without either soft-cap (llama.cpp always applies both) or with RoPE scaling on a model that
has sliding layers (its local layers would scale too), Gemma 1 with sliding layers, soft-caps or post-norms,
Gemma 3 with an attention soft-cap or without QK-norm, a family's missing post-norms. A Gemma 3 vision
model is written as its text decoder, with a warning (llama.cpp keeps the vision tower in a separate
mmproj file, which this export does not write).

Tensors are computed and written one at a time (the header first, from their shapes), so memory holds the
model and one tensor. The caller makes the write atomic (`gemma_tune.export.export_model`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
import numpy as np

from gemma_tune.errors import CheckpointError, UserError

log = logging.getLogger("gemma_tune")

GGUF_FILE = "model.gguf"
QUANT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
ARCH_NAMES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3"}
# llama.cpp takes a model of this many layers for a 27B and scales queries by 1/sqrt(d_model / heads)
LLAMA_CPP_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
GEMMA_SPECIAL_PIECES = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<mask>",
                        "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|file_separator|>")
# CodeGemma's fill-in-the-middle pieces, by their gguf.Keys.Tokenizer name
FIM_PIECES = {"FIM_PRE_ID": "<|fim_prefix|>", "FIM_SUF_ID": "<|fim_suffix|>", "FIM_MID_ID": "<|fim_middle|>",
              "FIM_SEP_ID": "<|file_separator|>"}
SPIECE_SPACE = "\u2581"
NO_TOKENIZER = ("a GGUF file holds its tokenizer and no tokenizer was found beside the weights; give one with "
                "--tokenizer PATH (a SentencePiece .model file, or an HF checkpoint / keras-hub preset directory "
                "holding one; export_model(model, tokenizer, ...) in Python)")


def _gguf():
    try:
        import gguf
    except ImportError as e:  # a dependency of gemma_tune; a broken environment says so plainly
        raise UserError("the gguf package is needed to write GGUF files: pip install gguf") from e
    return gguf


def llama_cpp_query_scale(arch) -> float:
    """The query scale llama.cpp applies to a model of `arch` (module docstring)."""
    if LLAMA_CPP_27B_LAYERS.get(arch.family) == arch.num_layers:
        return (arch.hidden_size / arch.num_heads) ** -0.5
    return arch.head_dim ** -0.5


def check_gguf_expressible(model) -> None:
    """CheckpointError when llama.cpp cannot compute `model` as we do (module docstring)."""
    from gemma_tune.models import reward_parts

    if reward_parts(model)[1] is not None:
        raise CheckpointError("a reward model has no GGUF form (llama.cpp runs causal language models); export "
                              "it as safetensors or peft", where="format gguf")
    arch = model.architecture
    if arch.prefix_lm:
        raise CheckpointError("PaliGemma's prefix-LM decoder has no llama.cpp architecture; export it as "
                              "safetensors", where="format gguf")
    sliding = any(arch.is_sliding(i) for i in range(arch.num_layers))
    post_norms = arch.use_post_attention_norm and arch.use_post_ffw_norm
    problems = []
    if arch.family == "gemma":
        if sliding or arch.attn_logit_softcap or arch.final_logit_softcap:
            problems.append("llama.cpp's gemma has no sliding window and no soft-caps")
        if arch.use_post_attention_norm or arch.use_post_ffw_norm or arch.use_qk_norm:
            problems.append("llama.cpp's gemma has no post-norms and no QK-norm")
    elif not post_norms:
        problems.append(f"llama.cpp's {arch.family} has post-attention and post-FFN norms")
    if arch.family == "gemma2":
        if arch.attn_logit_softcap is None or arch.final_logit_softcap is None:
            problems.append("llama.cpp's gemma2 always soft-caps attention and final logits")
        if arch.use_qk_norm:
            problems.append("llama.cpp's gemma2 has no QK-norm")
        if sliding and arch.rope_scaling_factor != 1.0:
            problems.append("llama.cpp's gemma2 scales RoPE positions on sliding layers too")
    if arch.family == "gemma3":
        if arch.attn_logit_softcap is not None:
            problems.append("llama.cpp's gemma3 has no attention soft-cap")
        if not arch.use_qk_norm:
            problems.append("llama.cpp's gemma3 has QK-norm")
    if problems:
        raise CheckpointError("this architecture cannot be written as GGUF: " + "; ".join(problems),
                              where=f"family {arch.family}")


# --------------------------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of the file: its GGUF name, our weight path, whether it is a matrix transposed from our
    [in, out] kernel, and the constant added (1 for RMSNorm weights) and factor applied (the folded query
    scale) in float32 before it is cast."""

    name: str
    ours: str
    transpose: bool = False
    add: float = 0.0
    scale: float = 1.0

    def value(self, model, merge_lora: bool) -> np.ndarray:
        from gemma_tune.models import float_weight

        value = float_weight(model, self.ours, merge_lora=merge_lora)
        if self.transpose:
            value = value.T
        if self.add:
            value = value + np.float32(self.add)
        if self.scale != 1.0:
            value = value * np.float32(self.scale)
        return np.ascontiguousarray(value, dtype=np.float32)


def gguf_tensors(arch) -> list[GgufTensor]:
    """Every tensor of the GGUF file of `arch`'s text decoder, in file order (module docstring)."""
    fold = arch.query_scale / llama_cpp_query_scale(arch)
    tensors = [GgufTensor("token_embd.weight", "token_embedding.embeddings")]
    for i in range(arch.num_layers):
        blk, ours = f"blk.{i}", f"blocks.{i}"

        def norm(name: str, path: str, scale: float = 1.0) -> GgufTensor:
            return GgufTensor(f"{blk}.{name}.weight", f"{ours}.{path}.scale", add=1.0, scale=scale)

        def matrix(name: str, path: str, scale: float = 1.0) -> GgufTensor:
            return GgufTensor(f"{blk}.{name}.weight", f"{ours}.{path}.kernel", transpose=True, scale=scale)

        tensors.append(norm("attn_norm", "pre_attention_norm"))
        tensors.append(matrix("attn_q", "attention.q_proj", 1.0 if arch.use_qk_norm else fold))
        tensors += [matrix("attn_k", "attention.k_proj"), matrix("attn_v", "attention.v_proj"),
                    matrix("attn_output", "attention.o_proj")]
        if arch.use_qk_norm:
            tensors += [norm("attn_q_norm", "attention.q_norm", fold), norm("attn_k_norm", "attention.k_norm")]
        if arch.use_post_attention_norm:
            tensors.append(norm("post_attention_norm", "post_attention_norm"))
        tensors.append(norm("ffn_norm", "pre_ffw_norm"))
        tensors += [matrix("ffn_gate", "mlp.gate_proj"), matrix("ffn_up", "mlp.up_proj"),
                    matrix("ffn_down", "mlp.down_proj")]
        if arch.use_post_ffw_norm:
            tensors.append(norm("post_ffw_norm", "post_ffw_norm"))
    tensors.append(GgufTensor("output_norm.weight", "final_norm.scale", add=1.0))
    return tensors


def _shape(model, tensor: GgufTensor) -> tuple[int, ...]:
    from gemma_tune.models import get_variable

    if tensor.ours.endswith(".kernel"):  # an int4 base packs its kernel: take the shape from the layer
        node = get_variable(model, tensor.ours)
        layer_units = _projection(model, tensor.ours).units
        return (layer_units, int(node.shape[0])) if tensor.transpose else (int(node.shape[0]), layer_units)
    return tuple(int(d) for d in get_variable(model, tensor.ours).shape)


def _projection(model, kernel_path: str):
    from gemma_tune.models import projections

    path = kernel_path.rsplit(".", 1)[0]
    return dict(projections(model))[path]


def tensor_type(name: str, shape: tuple[int, ...], quantize: str):
    """The GGML type `name` is written in under `quantize` (module docstring), and why it differs from the
    requested type (None when it does not)."""
    gguf = _gguf()
    types = gguf.GGMLQuantizationType
    wanted = {"f32": types.F32, "f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0, "q4_0": types.Q4_0}
    if len(shape) == 1:
        return types.F32, None
    qtype = wanted[quantize]
    if quantize == "q4_0" and name == "token_embd.weight":
        qtype, why = types.Q8_0, "the tied embedding is also the output projection"
    else:
        why = None
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return types.F16, f"rows of {shape[-1]} are not a multiple of {qtype.name}'s block of {block}"
    return qtype, why


def _encode(value: np.ndarray, qtype) -> np.ndarray:
    gguf = _gguf()
    types = gguf.GGMLQuantizationType
    if qtype == types.F32:
        return value
    if qtype == types.F16:
        return value.astype(np.float16)
    return gguf.quants.quantize(value, qtype)


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    gguf = _gguf()
    return int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))


# --------------------------------------------------------------------------------------------- metadata


def _file_type(quantize: str):
    gguf = _gguf()
    kinds = gguf.LlamaFileType
    return {"f32": kinds.ALL_F32, "f16": kinds.MOSTLY_F16, "bf16": kinds.MOSTLY_BF16, "q8_0": kinds.MOSTLY_Q8_0,
            "q4_0": kinds.MOSTLY_Q4_0}[quantize]


def write_hyperparameters(writer, arch, quantize: str, name: str) -> None:
    """general.* and {arch}.* keys (module docstring)."""
    gguf = _gguf()
    writer.add_name(name)
    writer.add_file_type(_file_type(quantize))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(arch.max_position_embeddings)
    writer.add_embedding_length(arch.hidden_size)
    writer.add_block_count(arch.num_layers)
    writer.add_feed_forward_length(arch.intermediate_size)
    writer.add_head_count(arch.num_heads)
    writer.add_head_count_kv(arch.num_kv_heads)
    writer.add_key_length(arch.head_dim)
    writer.add_value_length(arch.head_dim)
    writer.add_layer_norm_rms_eps(arch.rms_norm_eps)
    writer.add_rope_freq_base(arch.rope_theta)
    if arch.rope_scaling_factor != 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(arch.rope_scaling_factor)
    sliding = any(arch.is_sliding(i) for i in range(arch.num_layers))
    if arch.family == "gemma2":
        writer.add_attn_logit_softcapping(arch.attn_logit_softcap)
        writer.add_final_logit_softcapping(arch.final_logit_softcap)
        if not sliding:  # llama.cpp's gemma2 is always windowed unless no layer is: pattern 1
            writer.add_sliding_window_pattern(1)
    if arch.family == "gemma3" and arch.final_logit_softcap is not None:
        writer.add_final_logit_softcapping(arch.final_logit_softcap)
    if sliding:
        writer.add_sliding_window(arch.sliding_window)
        writer.add_sliding_window_pattern(arch.sliding_window_pattern)
        writer.add_rope_freq_base_swa(arch.rope_local_theta or arch.rope_theta)


@dataclass(frozen=True)
class Vocabulary:
    """The tokenizer as GGUF lists it: pieces (bytes), scores and token types, one per embedding row."""

    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    add_space_prefix: bool


def vocabulary(tokenizer, vocab_size: int) -> Vocabulary:
    """The SentencePiece model of `tokenizer` as GGUF lists it (module docstring), padded to `vocab_size`."""
    gguf = _gguf()
    from sentencepiece import sentencepiece_model_pb2

    kinds = gguf.TokenType
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer.model_path).read_bytes())
    if len(proto.pieces) > vocab_size:
        raise CheckpointError(f"the tokenizer has {len(proto.pieces)} pieces but the model only {vocab_size} "
                              "embeddings", where=str(tokenizer.model_path))
    piece_types = sentencepiece_model_pb2.ModelProto.SentencePiece
    by_type = {piece_types.NORMAL: kinds.NORMAL, piece_types.UNKNOWN: kinds.UNKNOWN,
               piece_types.CONTROL: kinds.CONTROL, piece_types.USER_DEFINED: kinds.USER_DEFINED,
               piece_types.UNUSED: kinds.UNUSED, piece_types.BYTE: kinds.BYTE}
    special = set(GEMMA_SPECIAL_PIECES) | set(tokenizer.special_ids)
    tokens, scores, types = [], [], []
    for piece in proto.pieces:
        kind = by_type[piece.type]
        text = piece.piece
        if piece.piece in special and kind in (kinds.NORMAL, kinds.USER_DEFINED):
            kind = kinds.CONTROL
        elif kind == kinds.USER_DEFINED:
            text = text.replace(SPIECE_SPACE, " ")
        tokens.append(text.encode("utf-8"))
        scores.append(float(piece.score))
        types.append(int(kind))
    for i in range(len(proto.pieces), vocab_size):
        tokens.append(f"[PAD{i}]".encode("utf-8"))
        scores.append(-10000.0)
        types.append(int(kinds.UNUSED))
    return Vocabulary(tokens, scores, types, bool(proto.normalizer_spec.add_dummy_prefix))


def write_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """tokenizer.ggml.* and tokenizer.chat_template (module docstring)."""
    from gemma_tune.checkpoints.hf_tokenizer import CHAT_TEMPLATE

    vocab = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_unk_token_id(tokenizer.token_to_id("<unk>"))
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_eot_token_id(tokenizer.end_of_turn_id)
    keys = _gguf().Keys.Tokenizer
    for key, piece in FIM_PIECES.items():
        if piece in tokenizer.special_ids:
            writer.add_uint32(getattr(keys, key), tokenizer.special_ids[piece])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    writer.add_chat_template(CHAT_TEMPLATE)


# --------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class Planned:
    tensor: GgufTensor
    shape: tuple[int, ...]
    qtype: object


def plan_tensors(model, quantize: str) -> list[Planned]:
    """Each tensor with its shape and GGML type; warns once about the tensors that fall back."""
    planned, fallbacks = [], {}
    for tensor in gguf_tensors(model.architecture):
        shape = _shape(model, tensor)
        qtype, why = tensor_type(tensor.name, shape, quantize)
        if why is not None and qtype.name == "F16":
            fallbacks.setdefault(why, []).append(tensor.name)
        elif why is not None:
            log.info("GGUF %s: %s written %s (%s)", quantize, tensor.name, qtype.name, why)
        planned.append(Planned(tensor, shape, qtype))
    for why, names in fallbacks.items():
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        log.warning("GGUF %s: %s written F16 instead (%s), as llama.cpp's converter falls back", quantize,
                    shown, why)
    return planned


def write_gguf(model, tokenizer, path: str | Path, *, quantize: str = "f32", merge_lora: bool = True,
               name: str | None = None) -> Path:
    """Write `model`'s text decoder and `tokenizer` as one GGUF file at `path` (module docstring); returns
    `path`. `name`: general.name (default: the model's checkpoint source's name, else "gemma_tune")."""
    gguf = _gguf()
    if quantize not in QUANT_TYPES:
        raise UserError(f"unknown GGUF type {quantize!r}; expected one of {', '.join(QUANT_TYPES)} (K-quants: "
                        "llama.cpp's llama-quantize on an f16 export)", where="quantize")
    if tokenizer is None:
        raise UserError(NO_TOKENIZER, where="format gguf")
    check_gguf_expressible(model)
    arch = model.architecture
    if arch.vision is not None:
        log.warning("GGUF holds the text decoder only: the vision tower is not written (llama.cpp keeps it in a "
                    "separate mmproj file)")
    source = str(getattr(model, "checkpoint_source", "") or "").rstrip("/")
    name = name or (Path(source).name if source else "") or "gemma_tune"
    path = Path(path)
    planned = plan_tensors(model, quantize)
    writer = gguf.GGUFWriter(path, ARCH_NAMES[arch.family])
    write_hyperparameters(writer, arch, quantize, name)
    write_tokenizer(writer, tokenizer, arch.vocab_size)
    for item in planned:
        raw = (np.float32 if item.qtype == gguf.GGMLQuantizationType.F32 else
               np.float16 if item.qtype == gguf.GGMLQuantizationType.F16 else np.uint8)
        shape = item.shape if raw is not np.uint8 else gguf.quant_shape_to_byte_shape(item.shape, item.qtype)
        writer.add_tensor_info(item.tensor.name, shape, np.dtype(raw), _nbytes(item.shape, item.qtype),
                               raw_dtype=item.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for item in planned:
        writer.write_tensor_data(_encode(item.tensor.value(model, merge_lora), item.qtype))
    writer.close()
    return path
