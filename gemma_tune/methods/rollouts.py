"""Rollouts: the batches of online RL, made from the weights being trained.

A round is one batch of prompts (`train.batch_size` × `train.grad_accum` of them: one optimisation step's
worth), each completed `rl.num_generations` (G) times by `gemma_tune.sampling.sample` with the current
weights (its decoding step compiled on torch when the train step is: `train.jit_compile`), scored by the
reward functions (`gemma_tune.rewards`) and laid out as rows of the batch contract: prompt and completion
in one sequence of T = data.max_length + rl.max_completion_length slots, trained on the completion tokens
(its stop token included, as TRL's completion mask), with per row

    advantages [n]              the method's (GRPO, RLOO), from the round's rewards
    old_logps [n, T]            log π_θ_old of each completion token (a forward pass of the sampling weights,
                                when rl.num_iterations > 1; with one iteration the ratio is 1)
    ref_logps [n, T]            log π_ref (rl.beta > 0): the model with its LoRA adapters off, or a frozen copy
                                of the starting weights for full fine-tuning
    reward, reward_<i>, reward_<i>_count, reward_std, zero_std, length, clipped, valid [n]
                                what the metrics are made of (gemma_tune.methods.grpo)

The round's rows are cut into `grad_accum` micro-batches of batch_size × G rows (a prompt's group never
spans two), which carry the step's counts; they are trained `rl.num_iterations` (μ) times, one optimisation
step each, before the next round is sampled.

When: `Rollouts` makes the batches `fit` reads (`batches()`, a PyDataset read one micro-batch per step) and
is the Keras callback that refills them. The first round is made before the first step (`on_train_begin`, or
when TensorFlow's pipeline reads its first batch); each next round at the end
of the step that used up the previous one (`on_train_batch_end`, where the callback's `model` has synced
JAX's training state into the variables): always from the weights after the last optimisation step. `fit`
must not read ahead (gemma_tune.train.loop runs it so). The sampling seed of round r is [seed, r, chunk], so
a resumed run samples what the uninterrupted one did; `state(step)` holds the rows of a round still being
optimised (μ > 1), saved with the checkpoint and given back by `restore`.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import keras
import numpy as np

from gemma_tune.methods.base import MODEL_INPUTS
from gemma_tune.train.data import with_counts

ROW_KEYS = MODEL_INPUTS + ("target_ids", "loss_mask")  # a row of the batch contract


def completion_rows(prompt_ids: list[list[int]], tokens: np.ndarray, lengths: np.ndarray, width: int) -> dict:
    """Rows of the batch contract for prompt + completion sequences, [n, width]: the completion's first
    `lengths[i]` tokens of `tokens` [n, N] follow prompt i; `loss_mask` is 1 where the target is a completion
    token. Also `completion_start` [n] = the slot of the first completion token's target position."""
    n = len(prompt_ids)
    rows = {k: np.zeros((n, width), np.int32) for k in ("token_ids", "segment_ids", "positions", "target_ids")}
    rows["loss_mask"] = np.zeros((n, width), np.float32)
    start = np.zeros(n, np.int32)
    for i, (prompt, length) in enumerate(zip(prompt_ids, lengths)):
        sequence = list(prompt) + tokens[i, :length].tolist()
        size = len(sequence)
        rows["token_ids"][i, :size] = sequence
        rows["segment_ids"][i, :size] = 1
        rows["positions"][i, :size] = np.arange(size)
        rows["target_ids"][i, :size - 1] = sequence[1:]
        rows["loss_mask"][i, len(prompt) - 1:size - 1] = 1.0
        start[i] = len(prompt) - 1
    rows["completion_start"] = start
    return rows


def per_target(values: np.ndarray, start: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """Per-completion-token values [n, N] placed at their target positions in rows of `width` slots."""
    out = np.zeros((len(values), width), np.float32)
    for i, (s, length) in enumerate(zip(start, lengths)):
        out[i, s:s + length] = values[i, :length]
    return out


class TokenLogps(keras.Model):
    """`predict_on_batch(rows)` -> per-token log-probabilities [B, T] of the targets at the sampling temperature
    (gemma_tune.methods.logps.token_logps), of `lm` or of its frozen base (`lora_off`)."""

    def __init__(self, lm, *, temperature: float, chunk_size: int, lora_off: bool = False):
        super().__init__(name="token_logps")
        self.lm, self.temperature, self.chunk_size, self.lora_off = lm, temperature, chunk_size, lora_off

    def call(self, batch):
        import contextlib

        from gemma_tune.methods.base import model_inputs
        from gemma_tune.methods.logps import token_logps
        from gemma_tune.models import adapters_disabled

        with adapters_disabled(self.lm) if self.lora_off else contextlib.nullcontext():
            hidden = self.lm(model_inputs(batch), training=False, return_hidden_states=True)
        logp, _ = token_logps(hidden, self.lm.token_embedding.embeddings, batch["target_ids"],
                              chunk_size=self.chunk_size, final_logit_softcap=self.lm.architecture.final_logit_softcap,
                              temperature=self.temperature)
        return logp * batch["loss_mask"]


class RoundBatches(keras.utils.PyDataset):
    """The micro-batches `fit` reads, one `__getitem__` per micro-batch, in order. A PyDataset (read by Keras
    only when a step takes a batch), not a generator, which Keras' adapter reads two batches ahead of
    training to learn their shapes: a round made then would come from weights a step old."""

    def __init__(self, rollouts: "Rollouts"):
        super().__init__(workers=1, use_multiprocessing=False)
        self.rollouts = rollouts

    @property
    def num_batches(self):
        return None  # endless: fit's steps_per_epoch ends the run

    def __getitem__(self, index):
        return self.rollouts.next_batch()


class Rollouts(keras.callbacks.Callback):
    """The on-policy batch stream of one training run and the callback that refills it (module docstring)."""

    def __init__(self, method, split, *, batch_size: int, accum: int, seed: int, start_step: int, total_steps: int,
                 run_dir: Path | None, restored: dict | None = None):
        super().__init__()
        self.method, self.split = method, split
        self.batch_size, self.accum, self.seed = batch_size, accum, seed
        self.iterations = method.options["num_iterations"]
        self.total_steps = total_steps
        self.start_step = start_step
        self.handed_out = 0  # micro-batches `fit` has read in this run
        self.queue: collections.deque = collections.deque()
        self.round_batches: list[dict] | None = None  # the current round's micro-batches (for `state`)
        self.round_index: int | None = None
        self.log_path = Path(run_dir) / "completions.jsonl" if run_dir is not None else None
        if restored is not None:  # resumed inside a round: its rows, and the micro-batches left of it
            self._resume_round(restored, start_step)

    # ---- the batches `fit` reads ------------------------------------------------------------------------
    def batches(self) -> "RoundBatches":
        """What `fit` reads: the micro-batches in order, each read when its step takes it."""
        return RoundBatches(self)

    def next_batch(self) -> tuple[dict]:
        if not self.queue:  # before fit: TensorFlow's pipeline reads its first batch (train/data.py for_fit)
            self._fill(self._next_step())
        self.handed_out += 1
        return self.queue.popleft()

    # ---- the callback -----------------------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        if not self.queue and not self.handed_out:  # the first round, before JAX's fit takes the weights
            self._fill(self._next_step())          # out of the variables

    def on_train_batch_end(self, batch, logs=None):
        step = self._next_step()
        if not self.queue and step < self.total_steps:  # the round is used up: every batch read was trained
            _ = self.model  # on JAX: the training state synced into the variables the sampler reads
            self._fill(step)

    def _next_step(self) -> int:
        """The optimisation step (0-based) of the next micro-batch `fit` will read."""
        return self.start_step + self.handed_out // self.accum

    # ---- rounds -----------------------------------------------------------------------------------------
    def _fill(self, step: int) -> None:
        round_index = step // self.iterations
        rows = self.split.round_rows(self.batch_size * self.accum, self.seed, round_index)
        batch = self.method.rollout(self.split.take(rows), seed=[self.seed, round_index],
                                    chunk_rows=self.batch_size, step=step)
        self._log(batch, step, "train")
        self.round_index = round_index
        self.round_batches = self._micro_batches(batch)
        first = step - round_index * self.iterations  # > 0 only when resumed inside the round
        for _ in range(first, self.iterations):
            self.queue.extend(self.round_batches)

    def _micro_batches(self, rows: dict) -> list[tuple[dict]]:
        """The round's rows cut into `accum` micro-batches carrying the step's counts."""
        counts = self.method.count(rows)
        size = len(rows["token_ids"]) // self.accum
        return [with_counts({k: v[i * size:(i + 1) * size] for k, v in rows.items() if k in self.method.row_keys},
                             counts) for i in range(self.accum)]

    def state(self, step: int) -> dict[str, np.ndarray]:
        """The current round's rows when `step` ends inside it (μ > 1), else {}."""
        if self.round_batches is None or step % self.iterations == 0:
            return {}
        arrays = {k: np.concatenate([b[0][k] for b in self.round_batches]) for k in self.round_batches[0][0]
                  if not k.startswith("step_")}
        return {**arrays, "round": np.asarray([self.round_index], np.int64)}

    def _resume_round(self, arrays: dict, step: int) -> None:
        round_index = int(arrays.pop("round")[0])
        if round_index != step // self.iterations:
            raise ValueError(f"the checkpoint's rollouts are of round {round_index}, not {step // self.iterations}")
        self.round_index = round_index
        self.round_batches = self._micro_batches(arrays)
        for _ in range(step - round_index * self.iterations, self.iterations):
            self.queue.extend(self.round_batches)

    def _log(self, rows: dict, step: int, split: str) -> None:
        """The first prompt's group of completions of each round, with rewards, to completions.jsonl, under the
        (1-based) optimisation step that first trains on them."""
        if self.log_path is not None:
            write_completions(self.log_path, rows, step + 1, split, self.method.num_generations)


def write_completions(path: Path, rows: dict, step: int, split: str, limit: int | None = None) -> None:
    """Append completions (the first `limit`, or all) with their rewards to `path` as JSON lines
    {"step", "split", "prompt", "completion", "reward", "rewards": {name: value}, "advantage"}."""
    texts = rows["texts"]
    count = len(texts["completions"]) if limit is None else min(limit, len(texts["completions"]))
    with open(path, "a", encoding="utf-8") as f:
        for i in range(count):
            if not rows["valid"][i]:
                continue
            named = {name: (None if np.isnan(value[i]) else float(value[i])) for name, value in texts["rewards"].items()}
            f.write(json.dumps({"step": step, "split": split, "prompt": texts["prompts"][i],
                                "completion": texts["completions"][i], "reward": float(rows["reward"][i]),
                                "rewards": named, "advantage": float(rows["advantages"][i])}, default=str) + "\n")
