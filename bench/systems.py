"""The two systems the benchmark trains, each run in its own process by `sft_bench.py --child`.

ours       gemma_tune's trainer exactly as `gemma-tune run` sets it up (gemma_tune.train.loop.train):
           `build_model` with the recipe's dtype policy, `enable_lora`, `build_optimizer` with a
           `WarmupSchedule` from a `TrainSection`, the `MethodTrainer` with the SFT method (chunked loss),
           `compile(jit_compile=…)` (`auto` resolved as the trainer does), and Keras' `fit` over `train_batches` of a `Split` through
           `for_fit`, with the trainer's own `Throughput` callback.
keras-hub  `Gemma3CausalLM` on a `Gemma3Backbone` with the same hyperparameters, `enable_lora(rank)`
           on the same projections, Keras AdamW, sparse cross-entropy from logits, trained with
           `keras.Model.fit` as ../shared/bench/anchors_gpu.py does, on the same rows (token ids, a
           padding mask, the targets as labels and the loss mask as sample weights).

Both run `warmup + steps` steps in one `fit`; `StepClock` times the last `steps` of them.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import keras

# gemma_tune LoRA target -> keras-hub Gemma 3 layer name
KERAS_HUB_LAYERS = {"q": "query", "k": "key", "v": "value", "o": "attention_output",
                    "gate": "ffw_gating", "up": "ffw_gating_2", "down": "ffw_linear"}


class StepClock(keras.callbacks.Callback):
    """Wall time of the steps after the first `warmup`: from the end of step `warmup` to the end of the
    last. Each step's end fetches its loss to the host, which waits for the device, so a mark is taken
    with the device idle; data feeding and callbacks between steps are inside the timed span.
    Alongside, the process's CPU time (user + system, all threads): on a shared CPU it varies less
    with other processes' load than wall time does."""

    def __init__(self, warmup: int):
        super().__init__()
        self.warmup = warmup
        self.marks: list[float] = []
        self.cpu_marks: list[float] = []
        self.losses: list[float] = []

    def _mark(self):
        self.marks.append(time.perf_counter())
        self.cpu_marks.append(time.process_time())

    def on_train_begin(self, logs=None):
        self.marks, self.cpu_marks = [], []
        self._mark()

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))
        self._mark()

    def figures(self, tokens_per_step: int) -> dict:
        timed = self.marks[self.warmup:]
        seconds = timed[-1] - timed[0]
        steps = len(timed) - 1
        durations = [b - a for a, b in zip(timed[:-1], timed[1:])]
        return {"timed_steps": steps, "seconds": seconds,
                "tokens_per_s": tokens_per_step * steps / seconds,
                "step_s_median": statistics.median(durations), "step_s": [round(d, 4) for d in durations],
                "cpu_s_per_step": (self.cpu_marks[-1] - self.cpu_marks[self.warmup]) / steps,
                "first_step_s": self.marks[1] - self.marks[0],
                "slowest_warmup_step_s": max((b - a for a, b in zip(self.marks[:self.warmup],
                                                                      self.marks[1:self.warmup + 1])), default=None),
                "loss_first": self.losses[0], "loss_last": self.losses[-1]}


def _versions(system: str) -> dict:
    import importlib.metadata as md

    names = ["keras", {"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}[keras.backend.backend()]]
    if system == "keras-hub":
        names.append("keras-hub")
    return {"python": platform.python_version(), **{n: md.version(n) for n in names}}


def _seed(seed: int) -> None:
    keras.utils.set_random_seed(seed)


def resident_bytes() -> int | None:
    """The process's resident memory now (Linux /proc), for the host-memory baseline."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def run_ours(cfg: dict, arch, split, callbacks=()) -> dict:
    """Trains gemma_tune's model per `cfg` on `split` (extra Keras `callbacks` last); the raw figures."""
    from gemma_tune.config.schema import TrainSection
    from gemma_tune.environment import devices
    from gemma_tune.models import build_model, count_params, enable_lora, quantize_base
    from gemma_tune.train import measure
    from gemma_tune.train.build import POLICIES
    from gemma_tune.train.compiling import jit_compile_for
    from gemma_tune.train.callbacks import Throughput
    from gemma_tune.train.data import for_fit, train_batches
    from gemma_tune.train.optim import WarmupSchedule, build_optimizer
    from gemma_tune.methods.sft import SFT
    from gemma_tune.train.task import MethodTrainer

    _seed(cfg["seed"])
    total = cfg["warmup"] + cfg["steps"]
    train = TrainSection(max_steps=total, batch_size=cfg["batch"], jit_compile=cfg["jit"], remat=cfg["remat"],
                         loss_chunk_size=cfg["loss_chunk_size"])
    policy = cfg["ours_policy"] or POLICIES[cfg["dtype"]]
    lm = build_model(arch, dtype=policy, attention_implementation=cfg["attention"])
    if cfg["quantize"]:
        quantize_base(lm, cfg["quantize"])
    if not cfg["full"]:
        enable_lora(lm, cfg["lora_rank"], cfg["lora_alpha"], targets=cfg["lora_targets"])
    lm.remat = train.remat
    schedule = WarmupSchedule.for_recipe(train, total)
    optimizer = build_optimizer(train, schedule, loss_scaling=policy == "mixed_float16")
    method = SFT(recipe=None, options={})
    trainer = MethodTrainer(lm, method, chunk_size=train.loss_chunk_size, accum=train.grad_accum)
    backend = keras.backend.backend()
    trainer.compile(optimizer=optimizer,
                    jit_compile=jit_compile_for(train.jit_compile, backend, devices(backend)[0]["kind"]))
    trainer.built = True
    optimizer.build(trainer.trainable_variables)
    counts = count_params(lm)
    throughput = Throughput(measure.flops_per_token(counts["total"], counts["trainable"], arch, cfg["length"]),
                            measure.peak_flops(measure.accelerator()))
    clock = StepClock(cfg["warmup"])
    trainer.fit(for_fit(train_batches(split, train.batch_size, train.grad_accum, cfg["seed"], method.count)),
                steps_per_epoch=total, epochs=1, verbose=0, callbacks=[throughput, clock, *callbacks])
    return {"policy": policy, "params_total": counts["total"],
            "params_trainable": counts["trainable"],
            "trainer_tokens_per_s": throughput.summary()["tokens_per_s"],
            **clock.figures(cfg["batch"] * cfg["length"])}


def keras_hub_backbone(arch, dtype: str):
    """A `Gemma3Backbone` with `arch`'s hyperparameters (keras-hub hard-codes Gemma 3's layer pattern:
    local iff i % 6 < 5, local θ 10k, global θ 1M)."""
    import keras_hub

    if arch.family != "gemma3":
        raise SystemExit(f"keras-hub reference: Gemma3CausalLM needs a gemma3 architecture, not {arch.family}")
    if arch.sliding_window is not None and arch.sliding_window_pattern != 6:
        raise SystemExit("keras-hub reference: Gemma3Backbone fixes sliding_window_pattern at 6")
    return keras_hub.models.Gemma3Backbone(
        vocabulary_size=arch.vocab_size, image_size=896, num_layers=arch.num_layers,
        num_query_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads, hidden_dim=arch.hidden_size,
        intermediate_dim=arch.intermediate_size, head_dim=arch.head_dim,
        query_head_dim_normalize=(arch.query_pre_attn_scalar or arch.head_dim) == arch.head_dim,
        use_query_key_norm=arch.use_qk_norm, use_post_ffw_norm=arch.use_post_ffw_norm,
        use_post_attention_norm=arch.use_post_attention_norm, attention_logit_soft_cap=arch.attn_logit_softcap,
        final_logit_soft_cap=arch.final_logit_softcap,
        use_sliding_window_attention=arch.sliding_window is not None,
        sliding_window_size=arch.sliding_window or 1024, global_rope_scaling_factor=arch.rope_scaling_factor,
        layer_norm_epsilon=arch.rms_norm_eps, dtype=dtype)


def keras_hub_inputs(batch: dict) -> tuple:
    """(x, y, sample_weight) for keras-hub from contract arrays: token ids and a padding mask, the
    targets as labels, the loss mask as weights (keras-hub has no segments: a row is one sequence)."""
    x = {"token_ids": batch["token_ids"], "padding_mask": (batch["segment_ids"] > 0).astype("int32")}
    return x, batch["target_ids"], batch["loss_mask"]


def run_keras_hub(cfg: dict, arch, split, callbacks=()) -> dict:
    """Trains keras-hub's Gemma3CausalLM per `cfg` on the same batches as `run_ours`."""
    import keras_hub
    import numpy as np

    _seed(cfg["seed"])
    policy = cfg["keras_hub_dtype"] or cfg["dtype"]
    backbone = keras_hub_backbone(arch, policy)
    lm = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
    if cfg["quantize"]:  # the decoder's projections, as ours (the embedding stays float)
        from keras.quantizers import Int4QuantizationConfig

        backbone.quantize(cfg["quantize"], filters=lambda layer: isinstance(layer, keras.layers.EinsumDense),
                          config=Int4QuantizationConfig(block_size=-1) if cfg["quantize"] == "int4" else None)
    if not cfg["full"]:
        backbone.enable_lora(cfg["lora_rank"], target_layer_names=[KERAS_HUB_LAYERS[t] for t in cfg["lora_targets"]])
    lm.compile(optimizer=keras.optimizers.AdamW(1e-5),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), weighted_metrics=[],
               jit_compile=cfg["jit"])
    total = cfg["warmup"] + cfg["steps"]
    stream = split.batches(cfg["batch"], cfg["seed"])
    batches = [next(stream) for _ in range(total)]
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    x, y, weights = keras_hub_inputs(rows)
    clock = StepClock(cfg["warmup"])
    keras.Model.fit(lm, x, y, sample_weight=weights, batch_size=cfg["batch"],
                    epochs=1, verbose=0, shuffle=False, callbacks=[clock, *callbacks])
    trainable = sum(int(np.prod(v.shape)) for v in lm.trainable_weights)
    return {"policy": policy, "params_total": backbone.count_params(),
            "params_trainable": trainable,
            **clock.figures(cfg["batch"] * cfg["length"])}


def run_system(system: str, cfg: dict, arch) -> dict:
    """One system's JSON record: config, throughput, FLOP rates, MFU where the peak is known, memory."""
    from gemma_tune.train import loop, measure  # noqa: F401
    if "keras-hub" in cfg["systems"]:  # both stacks imported in both processes: host memory compares
        import keras_hub  # noqa: F401
    from workload import flops_per_token, random_split

    baseline = resident_bytes()
    split = random_split(cfg["batch"], cfg["warmup"] + cfg["steps"], cfg["length"], arch.vocab_size, cfg["seed"])
    raw = (run_keras_hub if system == "keras-hub" else run_ours)(cfg, arch, split)  # ours and its variants
    flops = flops_per_token(raw["params_total"], raw["params_trainable"], arch, cfg["length"], cfg["full"])
    device = measure.accelerator()
    peak_flops = cfg["peak_tflops"] * 1e12 if cfg["peak_tflops"] else measure.peak_flops(device)
    peak_bytes, peak_of = measure.peak_memory_bytes()
    rate = raw["tokens_per_s"]
    host = peak_of == "host" and peak_bytes and baseline
    return {
        "system": system, "backend": keras.backend.backend(), "device": device or f"cpu ({os.cpu_count()} cores)",
        "mode": "full" if cfg["full"] else f"lora r{cfg['lora_rank']} {','.join(cfg['lora_targets'])}",
        "quantize": cfg["quantize"],
        "batch": cfg["batch"], "length": cfg["length"], "dtype": cfg["dtype"], "jit": cfg["jit"],
        "attention": cfg["attention"] if system != "keras-hub" else None, **raw,
        "flops_per_token": flops["ours"], "tflops_per_s": rate * flops["ours"] / 1e12,
        "mfu": rate * flops["ours"] / peak_flops if peak_flops else None,
        "model_tflops_per_s": rate * flops["anchor"] / 1e12,
        "peak_memory_gib": peak_bytes / 2**30 if peak_bytes else None, "peak_memory_of": peak_of,
        "host_rss_before_model_gib": baseline / 2**30 if host else None,
        "peak_memory_above_baseline_gib": (peak_bytes - baseline) / 2**30 if host else None,
        "versions": _versions(system),
    }
