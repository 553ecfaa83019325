"""What each system's compiled training step costs, from XLA, and the bare step's time (JAX only).

    KERAS_BACKEND=jax python bench/step_cost.py [sft_bench.py options] [--repeats 8] [--what-if accuracy-max]

For each system of `--systems`, one after the other in this process: one `fit` step with the
sft_bench.py setup (bench/systems.py) builds the model, optimiser and compiled step; then the model's
`train_step` is jitted on the real state and one batch, and this prints one JSON line with XLA's cost
analysis of the compiled step (FLOPs and bytes accessed, XLA's estimates) and the mean wall time and
process CPU time of `--repeats` calls of it (no data feeding, no callbacks). Equal FLOPs and unequal
times point at kernels, not at work; unequal FLOPs at work one system does and the other doesn't.

--what-if accuracy-max measures ours with one change applied in this process only (not to gemma_tune):
the chunked loss counting a hit where z[y] ≥ max z instead of where argmax z = y (the same count
except on exact ties), the change RESULTS.md suggests.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

import keras  # noqa: E402

import sft_bench  # noqa: E402
import systems  # noqa: E402
from workload import random_split  # noqa: E402


def accuracy_by_max(hidden, embedding, targets, mask, softcap):
    """`gemma_tune.methods.sft._chunk_stats` with hit = [z[y] ≥ max z] instead of [argmax z = y]."""
    from keras import ops

    logits = ops.cast(ops.matmul(hidden, ops.transpose(embedding)), "float32")
    if softcap is not None:
        logits = softcap * ops.tanh(logits / softcap)
    target_logit = ops.squeeze(ops.take_along_axis(logits, ops.expand_dims(targets, -1), axis=-1), -1)
    nll = ops.logsumexp(logits, axis=-1) - target_logit
    hit = ops.cast(target_logit >= ops.max(logits, axis=-1), "float32")
    return ops.sum(nll * mask), ops.sum(hit * mask)


class Capture(keras.callbacks.Callback):
    """Keeps the model that `fit` trained."""

    def on_train_end(self, logs=None):
        self.trained = self.model


def step_cost(system: str, cfg: dict, arch, repeats: int) -> dict:
    import jax

    from gemma_tune.train.data import train_batches

    cfg = dict(cfg, warmup=0, steps=1)
    split = random_split(cfg["batch"], 1, cfg["length"], arch.vocab_size, cfg["seed"])
    capture = Capture()
    (systems.run_ours if system == "ours" else systems.run_keras_hub)(cfg, arch, split, callbacks=[capture])
    model = capture.trained
    state = tuple([v.value for v in group] for group in (model.trainable_variables, model.non_trainable_variables,
                                                          model.optimizer.variables, model.metrics_variables))
    if system == "ours":
        data = next(train_batches(split, cfg["batch"], 1, cfg["seed"], model.method.count))
    else:
        data = systems.keras_hub_inputs(next(split.batches(cfg["batch"], cfg["seed"])))
    data = jax.tree_util.tree_map(jax.numpy.asarray, data)
    step = jax.jit(model.train_step)
    cost = step.lower(state, data).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    jax.block_until_ready(step(state, data))
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        jax.block_until_ready(step(state, data))
    return {"system": system, "gflops": cost.get("flops", 0.0) / 1e9,
            "gbytes_accessed": cost.get("bytes accessed", 0.0) / 1e9,
            "wall_s": (time.perf_counter() - wall) / repeats, "cpu_s": (time.process_time() - cpu) / repeats}


def main() -> int:
    extra = sft_bench.parser()
    extra.add_argument("--repeats", type=int, default=8)
    extra.add_argument("--what-if", choices=("accuracy-max",), default=None)
    args = extra.parse_args()
    if keras.backend.backend() != "jax":
        raise SystemExit("step_cost.py reads XLA's cost analysis: run it with KERAS_BACKEND=jax")
    if args.what_if == "accuracy-max":
        import gemma_tune.methods.sft as sft

        sft._chunk_stats = accuracy_by_max
    cfg, arch = sft_bench.config(args), sft_bench.architecture(args)
    for system in cfg["systems"]:
        record = step_cost(system, cfg, arch, args.repeats)
        record.update(what_if=args.what_if if system == "ours" else None, batch=cfg["batch"], length=cfg["length"])
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
