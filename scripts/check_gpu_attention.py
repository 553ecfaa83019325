"""GPU check of the attention fast paths against the keras.ops reference (run on a CUDA machine).

    KERAS_BACKEND=jax python scripts/check_gpu_attention.py [LENGTH LONG_LENGTH]   (default 2048 8192)
    KERAS_BACKEND=torch python scripts/check_gpu_attention.py [LENGTH LONG_LENGTH]

Builds a small Gemma 3 model in bfloat16 and in float32, runs a packed batch through each attention path of the
backend ("plain", "fused", JAX's "cudnn"; torch's "chunked" and "flex") and prints the max abs logit difference of
each against the plain path. On torch it also checks FlexAttention's gradient of every weight under torch.compile
against the plain path's (its backward exists on a GPU only, so this is where it is checked: relative to the largest
plain gradient of that weight), and says whether "auto" takes FlexAttention here. Then the forward+backward time of
each path at batch 1 × LONG_LENGTH (on torch the chunked and flex paths, the step compiled). Exits 1 if a path
disagrees beyond bfloat16 tolerance or fails to run.
"""

from __future__ import annotations

import json
import sys
import time

import keras
import numpy as np
from keras import ops

from gemma_tune.models import Architecture, build_model
from gemma_tune.models.attention import cudnn_attention_available


def packed_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(1, vocab, (batch, length)).astype("int32")
    segment_ids = np.zeros((batch, length), "int32")
    positions = np.zeros((batch, length), "int32")
    for row in range(batch):
        start, seg = 0, 1
        while start < length - 8:
            size = int(rng.integers(8, max(9, length // 3)))
            end = min(length - 8, start + size)
            segment_ids[row, start:end] = seg
            positions[row, start:end] = np.arange(end - start)
            start, seg = end, seg + 1
    return {"token_ids": token_ids, "segment_ids": segment_ids, "positions": positions}


def check_torch_gradients(arch, weights, batch) -> bool:
    """Every weight's gradient of mean(logits²) over the real tokens, FlexAttention's under torch.compile, against
    the plain path's (eager): the largest difference relative to the largest plain gradient of that weight. Prints whether
    attention "auto" takes FlexAttention on this GPU."""
    import torch

    from gemma_tune.models.flex import FLEX_CAPABILITY_MAJORS

    device = "cuda" if torch.cuda.is_available() else "cpu"  # a CPU: the script's logic (flex has no backward)
    capability = torch.cuda.get_device_capability() if device == "cuda" else None
    print(json.dumps({"check": "flex for auto", "capability": capability,
                      "auto_takes_flex": capability is not None and capability[0] in FLEX_CAPABILITY_MAJORS}),
          flush=True)
    inputs = {key: torch.as_tensor(value, device=device) for key, value in batch.items()}
    real = inputs["segment_ids"] > 0
    ok, reference = True, None
    for dtype in ("float32", "bfloat16"):
        for path in ("plain", "flex"):  # the other paths' gradients are checked on the CPU (tests/)
            model = build_model(arch, dtype=dtype, attention_implementation=path)
            model.set_weights(weights)
            variables = [v.value for v in model.trainable_variables]

            def loss(inputs):
                return torch.mean(model(inputs, training=True).float()[real] ** 2)

            torch._dynamo.reset()  # each model its own compilation
            try:  # the plain path eagerly: the reference; FlexAttention compiled, as "auto" takes it
                value = (torch.compile(loss) if path == "flex" else loss)(inputs)
                grads = [g.float() for g in torch.autograd.grad(value, variables)]
            except Exception as e:  # a path that cannot run here is a finding
                ok = False
                print(json.dumps({"check": "gradients", "dtype": dtype, "path": path, "error": repr(e)[:400]}),
                      flush=True)
                continue
            if path == "plain":
                reference = grads
            worst = max(float((g - r).abs().max() / r.abs().max().clamp_min(1e-30)) for g, r in zip(grads, reference))
            tol = 1e-3 if dtype == "float32" else 0.1
            ok &= worst <= tol
            print(json.dumps({"check": "gradients", "dtype": dtype, "path": path, "loss": float(value),
                              "max_rel_diff": worst, "tol": tol}), flush=True)
    return ok


def main(length: int = 2048, long_length: int = 8192) -> int:
    arch = Architecture(family="gemma3", vocab_size=4096, hidden_size=512, intermediate_size=1024, num_layers=6,
                        num_heads=4, num_kv_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                        sliding_window_pattern=6, rope_theta=1e6, rope_local_theta=1e4,
                        use_post_attention_norm=True, use_post_ffw_norm=True, use_qk_norm=True)
    backend = keras.backend.backend()
    paths = ["plain", "fused"] + {"jax": ["cudnn"] if cudnn_attention_available("bfloat16") else [],
                                  "torch": ["chunked", "flex"]}.get(backend, [])
    weights = build_model(arch, attention_implementation="plain").get_weights()
    batch = packed_batch(2, length, arch.vocab_size)
    real = batch["segment_ids"] > 0
    ok, reference = True, None
    for dtype in ("float32", "bfloat16"):
        for path in paths:
            if path == "cudnn" and dtype == "float32":
                continue
            model = build_model(arch, dtype=dtype, attention_implementation=path)
            model.set_weights(weights)
            logits = ops.convert_to_numpy(ops.cast(model.predict_on_batch(batch), "float32"))
            reference = logits if reference is None else reference
            diff = float(np.abs(logits - reference)[real].max())
            tol = 1e-4 if dtype == "float32" else 0.25
            ok &= diff <= tol
            print(json.dumps({"check": "logits", "dtype": dtype, "path": path, "max_abs_diff": diff, "tol": tol}),
                  flush=True)
    if backend == "torch":
        ok &= check_torch_gradients(arch, weights, batch)
    long_batch = packed_batch(1, long_length, arch.vocab_size, seed=1)
    # torch: the paths "auto" took on a GPU at long lengths before FlexAttention and takes now (each compile costs)
    for path in (["chunked", "flex"] if backend == "torch" else paths):
        model = build_model(arch, dtype="bfloat16", attention_implementation=path)
        model.compile(optimizer="sgd", loss=lambda y, p: ops.mean(ops.cast(p, "float32") ** 2),
                      jit_compile=True if backend == "torch" else "auto")
        target = np.zeros((1,), "float32")
        try:
            graphs = None
            if backend == "torch":  # as the trainer compiles the step (gemma_tune.train.compiling)
                import torch

                from gemma_tune.train.compiling import eager_first_call

                model.make_train_function()
                model.train_function = eager_first_call(model.train_function)
                torch._dynamo.reset()
            model.train_on_batch(long_batch, target)
            model.train_on_batch(long_batch, target)  # torch: the first compiled call
            if backend == "torch":
                graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            for _ in range(3):
                model.train_on_batch(long_batch, target)
            seconds = (time.perf_counter() - start) / 3
            timing = {"check": f"fwd+bwd 1x{long_length} bf16", "path": path, "seconds_per_step": round(seconds, 4)}
            if graphs is not None:  # graphs compiled during the timed steps: 0 when the step compiled once
                timing["graphs_compiled_while_timed"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
            print(json.dumps(timing), flush=True)
        except Exception as e:  # report, don't hide: a path that cannot run here is a finding
            ok = False
            print(json.dumps({"check": f"fwd+bwd 1x{long_length} bf16", "path": path, "error": repr(e)[:400]}),
                  flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*(int(a) for a in sys.argv[1:3])))
