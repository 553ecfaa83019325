#!/usr/bin/env bash
# The GPU benchmark in one command (bench/README.md, "GPU run"): Gemma 3 1B (random init, bf16) on the
# JAX backend, LoRA rank 16 on q,v, AdamW —
#   1. ours and keras-hub at 4 x 2048 (the anchors' configuration), each in its own process;
#   2. ours at 1 x 8192.
# `bench/gpu.sh more` runs instead: full fine-tuning at 4 x 2048 (ours and keras-hub), and keras-hub
# LoRA with the same dtype policy as ours (mixed_bfloat16: float32 variables, bfloat16 compute).
# `bench/gpu.sh long` runs the long-context set: ours LoRA at 1 x 32768 on attention "auto" (cuDNN, dense
# [B, T, T] masks) and "chunked" (tiles of 1024 queries, no mask), and keras-hub at 1 x 8192 (the anchor of
# issue 17's 32k target). `bench/gpu.sh torch` runs, on the torch backend at 4 x 2048, ours as a run gets
# it (jit_compile auto: torch.compile on a GPU), ours eager and keras-hub on torch, then the transformers +
# peft anchor (../shared/bench/anchors_gpu.py hf-lora, or $ANCHORS: carry a copy where ../shared is not
# beside the checkout) at the same shape, its JSON line appended to gpu.jsonl.
# `bench/gpu.sh all` is issue 17's set in one device call (under 600 s): JAX ours and keras-hub LoRA at
# 4 x 2048, torch ours (compiled) and the transformers + peft anchor at 4 x 2048, JAX ours LoRA at 1 x 32768
# (ALL_TIMEOUT s per system, 110 by default; STEPS 6 there unless set).
# `bench/gpu.sh qlora` runs QLoRA (an int4 per-channel base, LoRA r16 on q,v) at 4 x 2048: on torch ours compiled
# (jit_compile auto) and ours eager, on JAX ours and keras-hub (its decoder projections quantised the same way).
# `bench/gpu.sh flex` checks torch's attention paths against the plain one on the GPU (scripts/check_gpu_attention.py:
# logits, every weight's gradient under torch.compile — FlexAttention's backward exists on a GPU only — and the
# forward+backward time at 1 x LONG_LENGTH; JSON lines in attention.jsonl), then trains on torch at 4 x 2048 ours
# as a run gets it (compiled; FlexAttention on Hopper and Blackwell) beside ours on the chunked path (what "auto" took
# there before), and ours at 1 x 32768: CHECK_TIMEOUT (240 s) + 3 x ALL_TIMEOUT (110 s), 6 timed steps unless STEPS.
# `bench/gpu.sh decode` runs bench/decode_speed.py at DECODE_BATCH (64) rows x 256 new tokens: on torch ours
# eager, ours with the compiled step and transformers; on JAX ours and keras-hub (its JSON lines in decode.jsonl).
# Output: the table per run on stdout, JSON lines in $OUT/gpu.jsonl, the whole log in $OUT/gpu.log.
# Environment (defaults for the GPU run; a CPU check sets a tiny preset): PYTHON (python3), PRESET
# (gemma3_1b), ARCH (extra sft_bench.py arguments, e.g. "--arch num_layers=2"), BATCH (4), LENGTH (2048),
# XLONG_LENGTH (32768, the long and flex sets), CHECK_LENGTH (1024, the flex set's packed check rows),
# LONG_LENGTH (8192), STEPS (10), WARMUP (3), DTYPE (bfloat16), SYSTEM_TIMEOUT (190 s per system and
# run), LONG_TIMEOUT (140 s, the 1 x 8192 run): 2 x 190 + 140 s at most, inside a 600 s device call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gemma_tune_bench}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
PYTHON=${PYTHON:-python3}
PRESET=${PRESET:-gemma3_1b} BATCH=${BATCH:-4} LENGTH=${LENGTH:-2048} LONG_LENGTH=${LONG_LENGTH:-8192}
STEPS_SET=${STEPS:-} STEPS=${STEPS:-10} WARMUP=${WARMUP:-3} DTYPE=${DTYPE:-bfloat16} XLONG_LENGTH=${XLONG_LENGTH:-32768}
SYSTEM_TIMEOUT=${SYSTEM_TIMEOUT:-190} LONG_TIMEOUT=${LONG_TIMEOUT:-140}
export KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1

# keras, keras-hub, pydantic, datasets, … travel as wheels in .whl/ where the machine lacks them.
if ! "$PYTHON" -c "import keras, keras_hub, pydantic, datasets" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PYTHON" - <<'EOF' || exit 1
import importlib.metadata as md, jax, keras, keras_hub  # noqa: F401
import gemma_tune.data, gemma_tune.train.callbacks, gemma_tune.train.task  # noqa: F401  (datasets, pydantic)
print("devices:", jax.devices(), "|", ", ".join(f"{n} {md.version(n)}" for n in
      ("jax", "keras", "keras-hub", "pydantic", "datasets", "pyarrow", "numpy")))
EOF

bench() {
    "$PYTHON" bench/sft_bench.py --preset "$PRESET" ${ARCH:-} --dtype "$DTYPE" --steps "$STEPS" \
        --warmup "$WARMUP" --out "$OUT/gpu.jsonl" "$@"
}
anchor() {  # transformers + peft LoRA at BATCH x LENGTH, its JSON line appended to gpu.jsonl
    local script=${ANCHORS:-../shared/bench/anchors_gpu.py}
    if [ ! -f "$script" ]; then
        echo "no anchor script at $script: transformers + peft not run"; return 1
    fi
    BATCH=$BATCH SEQ=$LENGTH STEPS=$STEPS timeout "${ALL_TIMEOUT:-$SYSTEM_TIMEOUT}" "$PYTHON" "$script" hf-lora \
        | tee -a "$OUT/gpu.jsonl"
}
status=0
if [ "${1:-main}" = long ]; then
    bench --batch 1 --length "$XLONG_LENGTH" --systems ours,ours-chunked --timeout "$LONG_TIMEOUT" || status=1
    bench --batch 1 --length "$LONG_LENGTH" --systems keras-hub --timeout "$LONG_TIMEOUT" || status=1
elif [ "${1:-main}" = torch ]; then
    export KERAS_BACKEND=torch
    bench --backend torch --batch "$BATCH" --length "$LENGTH" --systems ours,ours-eager,keras-hub \
        --timeout "$SYSTEM_TIMEOUT" || status=1
    anchor || status=1
elif [ "${1:-main}" = all ]; then
    ALL_TIMEOUT=${ALL_TIMEOUT:-110}
    [ -n "${STEPS_SET:-}" ] || STEPS=6
    bench --batch "$BATCH" --length "$LENGTH" --systems ours,keras-hub --timeout "$ALL_TIMEOUT" || status=1
    KERAS_BACKEND=torch bench --backend torch --batch "$BATCH" --length "$LENGTH" --systems ours \
        --timeout "$ALL_TIMEOUT" || status=1
    anchor || status=1
    bench --batch 1 --length "$XLONG_LENGTH" --systems ours --timeout "$ALL_TIMEOUT" || status=1
elif [ "${1:-main}" = decode ]; then
    decode() {
        "$PYTHON" bench/decode_speed.py --preset "$PRESET" ${ARCH:-} --dtype "$DTYPE" --batch "${DECODE_BATCH:-64}" \
            --prompt-length 64 --new-tokens 256 --repeats 3 --timeout "$SYSTEM_TIMEOUT" --out "$OUT/decode.jsonl" "$@"
    }
    KERAS_BACKEND=torch decode --backend torch --systems ours,ours-compiled,transformers || status=1
    decode --backend jax --systems ours,keras-hub || status=1
elif [ "${1:-main}" = qlora ]; then
    KERAS_BACKEND=torch bench --backend torch --quantize int4 --batch "$BATCH" --length "$LENGTH" \
        --systems ours,ours-eager --timeout "$SYSTEM_TIMEOUT" || status=1
    bench --quantize int4 --batch "$BATCH" --length "$LENGTH" --systems ours,keras-hub --timeout "$SYSTEM_TIMEOUT" \
        || status=1
elif [ "${1:-main}" = flex ]; then
    ALL_TIMEOUT=${ALL_TIMEOUT:-110}
    [ -n "${STEPS_SET:-}" ] || STEPS=6
    KERAS_BACKEND=torch timeout "${CHECK_TIMEOUT:-240}" "$PYTHON" scripts/check_gpu_attention.py \
        "${CHECK_LENGTH:-1024}" "$LONG_LENGTH" | tee -a "$OUT/attention.jsonl" || status=1
    KERAS_BACKEND=torch bench --backend torch --batch "$BATCH" --length "$LENGTH" --systems ours,ours-chunked \
        --timeout "$ALL_TIMEOUT" || status=1
    KERAS_BACKEND=torch bench --backend torch --batch 1 --length "$XLONG_LENGTH" --systems ours \
        --timeout "$ALL_TIMEOUT" || status=1
elif [ "${1:-main}" = more ]; then
    bench --full --batch "$BATCH" --length "$LENGTH" --timeout "$SYSTEM_TIMEOUT" || status=1
    bench --batch "$BATCH" --length "$LENGTH" --systems keras-hub --keras-hub-dtype mixed_bfloat16 \
        --timeout "$LONG_TIMEOUT" || status=1
else
    bench --batch "$BATCH" --length "$LENGTH" --timeout "$SYSTEM_TIMEOUT" || status=1
    bench --batch 1 --length "$LONG_LENGTH" --systems ours --timeout "$LONG_TIMEOUT" || status=1
fi
exit $status
