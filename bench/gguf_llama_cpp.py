"""GGUF exports read by llama.cpp itself: its logits and greedy tokens against ours, per family and type.

For tiny random Gemma 1, Gemma 2 and Gemma 3 models (every weight random, norms included; sliding windows
shorter than the prompts, soft-caps, a query scale that is not 1/√head_dim, RoPE scaling) and a Gemma 3
model with merged LoRA adapters, each GGUF type (f32, f16, bf16, q8_0, q4_0) is exported with
`gemma_tune.export.export_model(..., "gguf", quantize=TYPE)`, loaded with llama-cpp-python
(`llama_cpp.Llama(..., logits_all=True)`, float32 KV cache, no flash attention, no weight repacking: the
AMX repacking of llama.cpp crashed on tiny tensors on the test machine) and run on two prompts: a chat turn
as text (llama.cpp's tokenization of it is compared with ours) and random ids longer than the windows.
Recorded per (family, type): max |llama.cpp − ours| over every logit, that over max |ours|, the share of
positions whose argmax agrees, and whether 16 greedy tokens after each prompt are the same.

With `--llama-quantize PATH` (llama.cpp's `llama-quantize`, built from the llama-cpp-python sdist's vendored
sources) the f16 export of a wider Gemma 3 model (rows of 256, so that K-quants apply) is quantised to
Q4_K_M and compared the same way.

    KERAS_BACKEND=jax python bench/gguf_llama_cpp.py [--llama-quantize PATH] [--out bench/raw/gguf-llama-cpp.jsonl]

The rows go to `--out` (JSON lines); a table is printed. tests/test_export_gguf.py runs the same comparison
for f32 (marker `llama_cpp`, deselected by default).

`--quantized-exports OUT` measures instead the other quantised exports against the float model on the same
prompts: keras int8 / int4 (`model.keras` loaded back with `keras.saving.load_model`, safe mode) and
safetensors int8 / int4 (loaded by transformers, its built-in Gemma quantisation), each family and the wider
Gemma 3 model: max |quantised − float| logit, that over max |float|, argmax agreement, bytes of the weights
file against the float export's.

    KERAS_BACKEND=jax python bench/gguf_llama_cpp.py --quantized-exports bench/raw/gguf-quantized-exports.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKENIZER = ROOT / "data" / "tiny" / "tokenizer.model"
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
CHAT = "<start_of_turn>user\nWhat is 2 plus 3? Answer briefly.<end_of_turn>\n<start_of_turn>model\n"
NEW_TOKENS = 16
BASE = dict(vocab_size=512, num_layers=4, sliding_window=8, max_position_embeddings=128)
FAMILIES = {
    "gemma": dict(BASE, family="gemma", use_qk_norm=False, use_post_attention_norm=False, use_post_ffw_norm=False,
                  rope_local_theta=None, rope_scaling_factor=1.0, rope_theta=10_000.0, sliding_window=None,
                  sliding_window_pattern=None, query_pre_attn_scalar=None),
    "gemma2": dict(BASE, family="gemma2", use_qk_norm=False, rope_local_theta=None, rope_scaling_factor=1.0,
                   rope_theta=10_000.0, sliding_window_pattern=2, attn_logit_softcap=5.0, final_logit_softcap=3.0,
                   query_pre_attn_scalar=32),
    "gemma3": dict(BASE, sliding_window_pattern=2, rope_scaling_factor=4.0, query_pre_attn_scalar=24),
}
WIDE = dict(BASE, vocab_size=512, hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2, head_dim=64,
            sliding_window_pattern=2, query_pre_attn_scalar=64)


def random_model(overrides: dict, seed: int = 0, lora: bool = False):
    """A tiny model (configs/models/gemma3_tiny.yaml with `overrides`), every weight random; with `lora`,
    random adapters on every projection too."""
    from gemma_tune.config.presets import preset_architecture
    from gemma_tune.models import build_model, enable_lora, lora_projections

    model = build_model(preset_architecture("gemma3_tiny", **overrides))
    rng = np.random.RandomState(seed)
    for v in model.weights:
        v.assign(rng.normal(0.0, 0.3 if len(v.shape) == 1 else 0.08, v.shape).astype(np.float32))
    if lora:
        enable_lora(model, rank=4, alpha=8.0)
        for _, layer in lora_projections(model):
            for v in (layer.lora_kernel_a, layer.lora_kernel_b):
                v.assign(rng.normal(0.0, 0.2, v.shape).astype(np.float32))
    return model


def prompts(tokenizer) -> list[list[int]]:
    """The chat turn ([bos] + ids) and 40 random ids after bos."""
    rng = np.random.RandomState(7)
    return [[tokenizer.bos_id] + tokenizer.encode(CHAT), [tokenizer.bos_id] + list(map(int, rng.randint(13, 512, 40)))]


def open_llama(path: Path, n_ctx: int = 128):
    """llama-cpp-python's Llama over `path`: all logits kept, float32 KV cache, no flash attention, no weight
    repacking (extra buffer types off)."""
    import llama_cpp
    from llama_cpp import llama as module

    default = llama_cpp.llama_model_default_params

    def without_repacking():
        params = default()
        params.use_extra_bufts = False
        return params

    module.llama_cpp.llama_model_default_params = without_repacking
    try:
        return llama_cpp.Llama(str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_threads=2, verbose=False,
                               type_k=0, type_v=0, flash_attn=False)
    finally:
        module.llama_cpp.llama_model_default_params = default


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def our_logits(model, ids: list[int]) -> np.ndarray:
    from keras import ops

    batch = {"token_ids": np.array([ids], np.int32), "padding_mask": np.ones((1, len(ids)), np.int32)}
    return ops.convert_to_numpy(model(batch))[0].astype(np.float32)


def our_greedy(model, ids: list[int], n: int) -> list[int]:
    from gemma_tune.sampling import sample

    return [int(t) for t in sample(model, [ids], max_new_tokens=n, temperature=0.0).tokens[0]]


def reference(model, tokenizer, new_tokens: int = NEW_TOKENS) -> list[tuple[list[int], np.ndarray, list[int]]]:
    """(prompt ids, our logits, our greedy tokens) for each of `prompts(tokenizer)`."""
    return [(ids, our_logits(model, ids), our_greedy(model, ids, new_tokens)) for ids in prompts(tokenizer)]


def compare(refs, gguf_path: Path) -> dict:
    """llama.cpp on `gguf_path` against our `reference(...)` (module docstring)."""
    llm = open_llama(gguf_path)
    row = {"max_abs": 0.0, "max_ours": 0.0, "argmax_agree": [], "greedy_equal": [], "greedy_agree": []}
    theirs_tokens = llm.tokenize(CHAT.encode("utf-8"), add_bos=True, special=True)
    row["tokenization_equal"] = list(theirs_tokens) == refs[0][0]
    for ids, ours, mine in refs:
        theirs = llama_logits(llm, ids)
        row["max_abs"] = max(row["max_abs"], float(np.abs(theirs - ours).max()))
        row["max_ours"] = max(row["max_ours"], float(np.abs(ours).max()))
        row["argmax_agree"].append(float((theirs.argmax(-1) == ours.argmax(-1)).mean()))
        llamas = llama_greedy(llm, ids, len(mine))
        row["greedy_equal"].append(mine == llamas)
        row["greedy_agree"].append(float(np.mean([a == b for a, b in zip(mine, llamas)])))
    del llm
    row["relative"] = row["max_abs"] / row["max_ours"]
    row["argmax_agree"] = float(np.mean(row["argmax_agree"]))
    row["greedy_agree"] = float(np.mean(row["greedy_agree"]))
    row["greedy_equal"] = all(row["greedy_equal"])
    return row


def k_quant(model, tokenizer, refs, work: Path, llama_quantize: str, kind: str = "Q4_K_M") -> dict:
    """The f16 export quantised by llama.cpp's llama-quantize to `kind`, compared."""
    from gemma_tune.export import export_model

    f16 = export_model(model, tokenizer, work / "k-quant-f16", "gguf", quantize="f16") / "model.gguf"
    target = work / f"wide-{kind}.gguf"
    done = subprocess.run([llama_quantize, str(f16), str(target), kind], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama-quantize failed: {done.stderr[-2000:]}")
    lines = done.stdout.splitlines() + done.stderr.splitlines()
    types = sorted({line.split("converting to", 1)[1].split()[0] for line in lines if "converting to" in line})
    row = compare(refs, target)
    row.update(bytes=target.stat().st_size, f16_bytes=f16.stat().st_size, quantize_types=types)
    return row


def run(llama_quantize: str | None, out: Path) -> list[dict]:
    import keras

    from gemma_tune.export import export_model
    from gemma_tune.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = [(family, random_model(overrides), False) for family, overrides in FAMILIES.items()]
        cases.append(("gemma3+lora", random_model(FAMILIES["gemma3"], seed=1, lora=True), True))
        if llama_quantize:
            cases.append(("gemma3-wide", random_model(WIDE, seed=2), False))
        for name, model, _ in cases:
            refs = reference(model, tokenizer)
            for kind in TYPES:
                path = export_model(model, tokenizer, work / f"{name}-{kind}", "gguf", quantize=kind) / "model.gguf"
                rows.append({"model": name, "type": kind, "bytes": path.stat().st_size, **compare(refs, path)})
                print(table(rows[-1:]).splitlines()[-1], flush=True)
            if name == "gemma3-wide":
                rows.append({"model": name, "type": "Q4_K_M (llama-quantize)",
                             **k_quant(model, tokenizer, refs, work, llama_quantize)})
    out.parent.mkdir(parents=True, exist_ok=True)
    backend = keras.backend.backend()
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"backend": backend, **row}) + "\n")
    return rows


def transformers_logits(path: Path, ids: list[int]) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([ids])).logits[0].numpy()


def quantized_exports(out: Path) -> list[dict]:
    """keras and safetensors int8 / int4 exports against the float model (module docstring)."""
    import keras

    from gemma_tune.export import export_model
    from gemma_tune.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = {**FAMILIES, "gemma3-wide": WIDE}
        for name, overrides in cases.items():
            model = random_model(overrides)
            ids_list = prompts(tokenizer)
            from gemma_tune.export.keras import exported_model

            float_dirs = {"safetensors": export_model(model, tokenizer, work / f"{name}-safetensors", "safetensors"),
                          "keras": work / f"{name}-keras"}  # the float archive alone (keras-hub's preset cannot
            float_dirs["keras"].mkdir()                      # express every tiny pattern)
            keras.saving.save_model(exported_model(model), str(float_dirs["keras"] / "model.keras"))
            for fmt, weights in (("keras", "model.keras"), ("safetensors", "model.safetensors")):
                for mode in ("int8", "int4"):
                    path = export_model(model, tokenizer, work / f"{name}-{fmt}-{mode}", fmt, quantize=mode)
                    if fmt == "keras":
                        loaded = keras.saving.load_model(str(path / weights), safe_mode=True)
                        pairs = [(our_logits(loaded, ids), our_logits(model, ids)) for ids in ids_list]
                    else:
                        pairs = [(transformers_logits(path, ids), transformers_logits(float_dirs[fmt], ids))
                                 for ids in ids_list]
                    diff = max(float(np.abs(q - f).max()) for q, f in pairs)
                    scale = max(float(np.abs(f).max()) for _, f in pairs)
                    rows.append({"model": name, "format": fmt, "quantize": mode, "max_abs": diff,
                                 "relative": diff / scale,
                                 "argmax_agree": float(np.mean([(q.argmax(-1) == f.argmax(-1)).mean()
                                                                for q, f in pairs])),
                                 "bytes": (path / weights).stat().st_size,
                                 "float_bytes": (float_dirs[fmt] / weights).stat().st_size})
                    r = rows[-1]
                    print(f"| {name} | {fmt} | {mode} | {r['max_abs']:.3f} | {r['relative']:.3f} | "
                          f"{r['argmax_agree']:.3f} | {r['bytes']} / {r['float_bytes']} |", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"backend": keras.backend.backend(), **row}) + "\n")
    return rows


def table(rows: list[dict]) -> str:
    head = "| model | type | bytes | max abs diff | / max abs logit | argmax agree | greedy 16 equal | tokenization |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['model']} | {r['type']} | {r['bytes']} | {r['max_abs']:.2e} | {r['relative']:.2e} | "
                     f"{r['argmax_agree']:.3f} | {r['greedy_equal']} ({r['greedy_agree']:.2f}) | "
                     f"{'same' if r['tokenization_equal'] else 'DIFFERS'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-quantize", default=None, help="path of llama.cpp's llama-quantize (K-quant route)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "raw" / "gguf-llama-cpp.jsonl")
    parser.add_argument("--quantized-exports", type=Path, default=None, metavar="OUT",
                        help="measure keras / safetensors int8 / int4 exports instead, rows into OUT")
    args = parser.parse_args(argv)
    if args.quantized_exports is not None:
        quantized_exports(args.quantized_exports)
        print(f"rows -> {args.quantized_exports}")
        return 0
    rows = run(args.llama_quantize, args.out)
    print(table(rows))
    print(f"rows -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
