"""Keras callbacks of a training run, each with one job.

Keras calls `on_train_batch_end` once per micro-batch; `StepCallback` turns those calls into one
`on_step_end(step, stats)` per optimisation step (every `accum` micro-batches), with the step's
statistics — the method's (`gemma_tune.methods.base.Method`) — summed over its micro-batches: `loss`
(the step's objective, divided by its count), `tokens` (real tokens), `targets` (trained tokens) and the
method's own sums. Steps are numbered from 1 and continue across a resume (`first_step`).

  NonFiniteGuard  stops the run on a non-finite loss, before anything is logged or saved for that step
                  (the Checkpointer refuses non-finite weights: a checkpoint always holds finite ones)
  Throughput      tokens/s, MFU (on a known accelerator) and peak memory — usable on its own (bench/)
  MetricsLogger   the progress bar every step; metrics.jsonl / metrics.csv / TensorBoard rows every log_every
  Evaluator       the method's eval metrics every eval_every; sample generations
  Checkpointer    checkpoints every save_every, at the end, and when SIGTERM/SIGINT asks to stop
  RestoreRNG      a resumed run's global random generators, set at its first step
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import math
import signal
import time
from pathlib import Path

import keras

from gemma_tune.console import ProgressBar
from gemma_tune.errors import UserError
from gemma_tune.train import checkpoint, measure
from gemma_tune.train.data import for_fit

log = logging.getLogger("gemma_tune")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


class StepCallback(keras.callbacks.Callback, abc.ABC):
    """Base: micro-batch events -> `on_step_end(step, stats)` per optimisation step."""

    def __init__(self, accum: int = 1, first_step: int = 0):
        super().__init__()
        self.accum, self.first_step = accum, first_step
        self._sums: dict[str, float] = {}

    def on_train_batch_end(self, batch, logs=None):
        add_stats(self._sums, logs)
        if (batch + 1) % self.accum:
            return
        stats, self._sums = self._sums, {}
        self.on_step_end(self.first_step + (batch + 1) // self.accum, stats)

    @abc.abstractmethod
    def on_step_end(self, step: int, stats: dict) -> None:
        """Called once per optimisation step with the step's summed statistics."""


def add_stats(sums: dict[str, float], stats: dict, weight_loss_by: str | None = None) -> None:
    """Add a batch's (or step's) statistics to `sums`; with `weight_loss_by`, its loss times that stat (the
    step count), so that summed losses are plain sums of per-item losses (gemma_tune.methods.base)."""
    for key, value in stats.items():
        value = float(value)
        if key == "loss" and weight_loss_by is not None:
            value *= float(stats[weight_loss_by])
        sums[key] = sums.get(key, 0.0) + value


def diverged(what: str, step: int, run_dir: Path) -> "TrainingDiverged":
    """The error for a run whose `what` (the loss, the weights) became non-finite at `step`, naming the last
    finite checkpoint (non-finite weights are never saved) and what to do next."""
    last = checkpoint.latest(run_dir)
    advice = "lower train.learning_rate, or set train.max_grad_norm"
    kept = (f"the last finite checkpoint, {last}, is kept: {advice}, then continue from it with --resume "
            "(resume=True in Python)" if last else
            f"no checkpoint was written before it: {advice} and run again")
    return TrainingDiverged(f"{what} at step {step}; {kept}", where="train")


class NonFiniteGuard(StepCallback):
    """Raises `TrainingDiverged` naming the step and the last finite checkpoint when the loss is NaN/inf."""

    def __init__(self, run_dir: Path, **kw):
        super().__init__(**kw)
        self.run_dir = Path(run_dir)

    def on_step_end(self, step, stats):
        if not math.isfinite(stats["loss"]):
            raise diverged(f"the training loss became {stats['loss']}", step, self.run_dir)


class Throughput(StepCallback):
    """Tokens/s, MFU and peak memory. A step is timed from the start of its first micro-batch to the
    end of its last (the statistics' transfer to the host waits for the device), so the work of other
    callbacks (eval, checkpoints) is not counted; the first step, which compiles, is left out of rates.

    `current()` gives the figures since the previous `current()` call; `summary()` those of the run.
    """

    def __init__(self, flops_per_token: float | None = None, peak_flops: float | None = None, **kw):
        super().__init__(**kw)
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.tokens = self.trained_tokens = 0.0
        self.steps = 0
        self._timed_tokens, self._timed_s = 0.0, 0.0
        self._window_tokens, self._window_s = 0.0, 0.0
        self._last = self._step_start = None
        self.started = None
        self.last_rate: float | None = None  # tokens/s of the latest step

    def on_train_begin(self, logs=None):
        self.started = self._last = time.perf_counter()

    def on_train_batch_begin(self, batch, logs=None):
        if batch % self.accum == 0:  # a step starts: time from here, not counting other callbacks' work
            self._step_start = time.perf_counter()

    def on_step_end(self, step, stats):
        now = time.perf_counter()
        elapsed, self._last = now - self._step_start, now
        self.tokens += stats["tokens"]
        self.trained_tokens += stats["targets"]
        self.steps += 1
        if self.steps > 1:
            self._timed_tokens += stats["tokens"]
            self._timed_s += elapsed
        self._window_tokens += stats["tokens"]
        self._window_s += elapsed
        self.last_rate = stats["tokens"] / elapsed if elapsed > 0 else None

    def _figures(self, tokens: float, seconds: float) -> dict:
        rate = tokens / seconds if seconds > 0 else None
        mfu = (rate * self.flops_per_token / self.peak_flops
               if rate and self.flops_per_token and self.peak_flops else None)
        peak, _ = measure.peak_memory_bytes()
        return {"tokens_per_s": rate, "mfu": mfu, "peak_memory_gib": peak / 2**30 if peak else None}

    def current(self) -> dict:
        figures = self._figures(self._window_tokens, self._window_s)
        self._window_tokens, self._window_s = 0.0, 0.0
        return figures

    def summary(self) -> dict:
        seconds = self._timed_s if self.steps > 1 else (self._last - self.started if self.started else 0.0)
        tokens = self._timed_tokens if self.steps > 1 else self.tokens
        peak, where = measure.peak_memory_bytes()
        return dict(self._figures(tokens, seconds), steps=self.steps, tokens=self.tokens,
                    trained_tokens=self.trained_tokens,
                    seconds=(self._last - self.started) if self.started else 0.0, peak_memory_of=where)


class MetricsLogger(StepCallback):
    """Every `log_every` steps (and the last): a train row — the method's metrics over the steps since the
    previous row, learning rate, tokens, throughput — to `sink` and the log. Every step: the progress bar
    (`gemma_tune.console.ProgressBar`), whose loss is the same mean over the steps since the last row."""

    def __init__(self, sink, schedule, total_steps: int, log_every: int, throughput: Throughput, method,
                 progress: bool = True, **kw):
        super().__init__(**kw)
        self.sink, self.schedule, self.total_steps = sink, schedule, total_steps
        self.log_every, self.throughput, self.method = log_every, throughput, method
        self.progress = ProgressBar(total_steps, enabled=progress)
        self._window: dict[str, float] = {}
        self.started = None

    def on_train_begin(self, logs=None):
        self.started = time.perf_counter()
        log.info("step %d compiles the training step: it takes longer than the others", self.first_step + 1)

    def learning_rate(self, step: int) -> float:
        """The rate applied at step `step` (1-based): the schedule at its last micro-iteration."""
        return float(keras.ops.convert_to_numpy(self.schedule(step * self.accum - 1)))

    def on_step_end(self, step, stats):
        add_stats(self._window, stats, weight_loss_by=self.method.count_of)
        metrics = self.method.metric_values(self._window, "train")
        lr = self.learning_rate(step)
        rate = self.throughput.last_rate or 0.0
        loss = metrics["loss"] if metrics["loss"] is not None else float("nan")
        figures = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{rate:,.0f}"}
        if self.throughput.flops_per_token and self.throughput.peak_flops:
            figures["MFU"] = f"{rate * self.throughput.flops_per_token / self.throughput.peak_flops:.1%}"
        if step % self.log_every and step != self.total_steps:
            self.progress.update(step, **figures)
            return
        row = {"step": step, "split": "train", **metrics, "learning_rate": lr, "tokens": self._window["tokens"],
               **self.throughput.current(), "elapsed_s": time.perf_counter() - self.started}
        self.sink.write(row)
        mfu = f" MFU {row['mfu']:.1%}" if row.get("mfu") else ""
        rate = f"{row['tokens_per_s']:,.0f}" if row.get("tokens_per_s") else "-"
        log.info("step %d/%d %s lr %.2e tokens/s %s%s", step, self.total_steps, format_metrics(metrics), lr,
                 rate, mfu)
        self.progress.update(step, **figures)
        self._window = {}

    def close(self) -> None:
        self.progress.close()


def format_metrics(metrics: dict) -> str:
    """`name value` pairs of a row's metrics, for log lines."""
    return " ".join(f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}"
                    for name, value in metrics.items() if value is not None)


def _inference():
    """No autograd bookkeeping while generating (torch records it by default)."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


class _SumTestBatches(keras.callbacks.Callback):
    def __init__(self, count_of: str):
        super().__init__()
        self.count_of = count_of
        self.sums: dict[str, float] = {}

    def on_test_batch_end(self, batch, logs=None):
        add_stats(self.sums, logs, weight_loss_by=self.count_of)


def evaluate(trainer, split, batch_size: int, step: int = 0) -> dict:
    """The method's eval metrics over the whole `split` (every row once, as its `eval_stream` gives them at
    optimisation step `step`), and its tokens."""
    summed = _SumTestBatches(trainer.method.count_of)
    with _inference():
        batches, count = trainer.method.eval_stream(trainer, split, batch_size, step)
    trainer.evaluate(for_fit(batches), steps=count, verbose=0, callbacks=[summed])
    return {**trainer.method.metric_values(summed.sums, "eval"), "tokens": summed.sums["tokens"]}


class Evaluator(StepCallback):
    """Every `every` steps and at the last step: an eval row to `sink` (with an eval split); with `prompts`, greedy
    samples appended to `run_dir/samples.jsonl` as {"step", "prompt", "completion"} (and "images", the sample's
    image files, for a vision model)."""

    def __init__(self, split, batch_size: int, sink, every: int | None, total_steps: int, *, lm=None,
                 tokenizer=None, prompts=(), run_dir: Path | None = None, max_new_tokens: int = 48, **kw):
        super().__init__(**kw)
        self.split, self.batch_size, self.sink = split, batch_size, sink
        self.every, self.total_steps = every, total_steps
        self.lm, self.tokenizer, self.prompts = lm, tokenizer, list(prompts)
        self.samples = Path(run_dir) / "samples.jsonl" if run_dir is not None else None
        self.max_new_tokens = max_new_tokens

    def on_step_end(self, step, stats):
        if not ((self.every and step % self.every == 0) or step == self.total_steps):
            return
        trainer = self.model  # on JAX this syncs the training state into the variables
        if self.split is not None:
            result = evaluate(trainer, self.split, self.batch_size, step)
            self.sink.write({"step": step, "split": "eval", **result})
            log.info("eval at step %d: %s", step, format_metrics({k: v for k, v in result.items() if k != "tokens"}))
        if self.prompts and self.samples is not None:
            self.sample(step)

    def sample(self, step: int) -> list[str]:
        from gemma_tune.generate import generate

        texts = [p if isinstance(p, str) else p.prompt for p in self.prompts]
        images = [[] if isinstance(p, str) else list(p.images) for p in self.prompts]
        with _inference():
            outputs = generate(self.lm, self.tokenizer, texts, images=images if any(images) else None,
                               max_new_tokens=self.max_new_tokens)
        with open(self.samples, "a", encoding="utf-8") as f:
            for prompt, shown, completion in zip(texts, images, outputs):
                row = {"step": step, "prompt": prompt, **({"images": shown} if shown else {}), "completion": completion}
                f.write(json.dumps(row) + "\n")
        log.info("sample at step %d: %r -> %r", step, texts[0], outputs[0])
        return outputs


class StopRequest:
    """While active, SIGTERM and SIGINT ask the run to stop at the end of the current step (a second
    SIGINT interrupts at once)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("received %s: saving a checkpoint at the end of this step, then stopping",
                    signal.Signals(signum).name)

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with whoever owns them
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Checkpointer(StepCallback):
    """Saves `run_dir/checkpoints/step_N` every `every` steps, at the last step and on a stop request
    (then stops training). `state(step)` gives what besides the weights a resume needs, `method_state(step)`
    the method's own arrays (`Method.state`)."""

    def __init__(self, run_dir: Path, every: int | None, total_steps: int, state, stop: StopRequest,
                 method_state=None, **kw):
        super().__init__(**kw)
        self.run_dir, self.every, self.total_steps = Path(run_dir), every, total_steps
        self.state, self.stop = state, stop
        self.method_state = method_state or (lambda step: {})
        self.saved: Path | None = None
        self.stopped_at: int | None = None

    def on_step_end(self, step, stats):
        due = (self.every and step % self.every == 0) or step == self.total_steps
        if not due and self.stop.signal is None:
            return
        trainer = self.model  # syncs the JAX state
        try:
            self.saved = checkpoint.save(self.run_dir, step, trainer, self.state(step), self.method_state(step))
        except checkpoint.NonFiniteWeights as e:
            raise diverged(f"the weights became non-finite ({e})", step, self.run_dir) from None
        log.info("checkpoint saved: %s", self.saved)
        if self.stop.signal is not None and step != self.total_steps:
            self.stopped_at = step
            trainer.stop_training = True


class RestoreRNG(keras.callbacks.Callback):
    """Sets the global RNG states saved with a checkpoint at the first batch: after Keras' set-up of
    `fit` and its data iterator (torch's DataLoader draws a seed from the global generator), so the
    resumed steps draw what the uninterrupted run drew."""

    def __init__(self, state: dict):
        super().__init__()
        self.state = state

    def on_train_batch_begin(self, batch, logs=None):
        if self.state is not None:
            checkpoint.set_global_rng_state(self.state)
            self.state = None
