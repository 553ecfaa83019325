"""Online RL from rewards: GRPO and RLOO (`method: grpo | rloo`, options in `rl:`).

Each optimisation step trains on completions the current policy sampled for a batch of prompts (a round,
gemma_tune.methods.rollouts), scored by the recipe's reward functions (gemma_tune.rewards); the equations —
advantages, the clipped surrogate, the KL term, the averaging of `rl.loss_type` — are in
gemma_tune.methods.rl with their papers. What differs between the two methods is the advantage: GRPO's
group-normalised reward with the KL to the reference in the loss (k3, weight β), RLOO's leave-one-out
baseline with the KL in the reward (β Σ_t log π_old/π_ref, Ahmadian et al. 2024).

Forward pass of a micro-batch: per-token log π_θ and entropy of the completion tokens at the sampling
temperature (methods.logps.token_logps, in chunks); ρ = exp(log π_θ − log π_old) with log π_old the rollout's
(`old_logps`, rl.num_iterations > 1) or log π_θ itself under stop_gradient (one iteration: ρ = 1, the gradient
that of A · log π_θ, as TRL). Counts: the step's completions and completion tokens (`step_completions`,
`step_completion_tokens`), by which `rl.loss_type` normalises.

Metrics (TRL GRPOTrainer's names), means over the completions (or their tokens) of the logging window:
`loss`, `reward` (the weighted sum), `reward_std` (the std of the rewards within a prompt's group),
`rewards/<name>` per reward function (over completions it applies to), `kl` (β > 0: the k3 estimate per
token), `clip_ratio` (share of completion tokens whose ratio the clip holds), `completions/mean_length`
(tokens, the stop token included), `completions/clipped_ratio` (share cut at rl.max_completion_length without
a stop token), `frac_reward_zero_std` (share of groups whose rewards are all equal: no signal) and `entropy`
(nats per completion token). Eval rows: the same, over completions of the eval prompts; those completions and
the first group of each training round go to completions.jsonl with their rewards.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from keras import ops

from gemma_tune.methods.base import Method, model_inputs, ratio
from gemma_tune.methods.logps import token_logps
from gemma_tune.methods.rl import (aggregate, clipped_surrogate, grpo_advantages, group_std, k3_kl,
                                   kl_penalised_rewards, rloo_advantages)
from gemma_tune.methods.rollouts import (ROW_KEYS, Rollouts, TokenLogps, completion_rows, per_target,
                                         write_completions)

log = logging.getLogger("gemma_tune")

ROW_STATS = ("reward", "reward_std", "zero_std", "length", "clipped", "valid")


class GRPO(Method):
    """Group Relative Policy Optimization (module docstring; equations in gemma_tune.methods.rl)."""

    counts = ("completions", "completion_tokens")
    loss_label = "reward (weighted sum, mean per completion)"
    curve = "reward"  # the surrogate's value says little; the reward is what climbs
    on_policy = True
    kl_in_loss = True  # GRPO: β · k3 KL per token in the loss; RLOO: β in the reward

    def __init__(self, recipe, options: dict):
        super().__init__(recipe, options)
        self.num_generations = options["num_generations"]
        self.max_completion_length = options["max_completion_length"]
        self.temperature = options["temperature"]
        self.epsilon = options["epsilon"]
        self.epsilon_high = options["epsilon_high"] if options["epsilon_high"] is not None else options["epsilon"]
        self.beta = options["beta"]
        self.width = recipe.data.max_length + self.max_completion_length
        self.rewards = []
        self.metrics = ()
        self.stream: Rollouts | None = None
        self._restored: dict | None = None
        self.lm = self.tokenizer = self.run_dir = None  # set by setup
        self.compile_sampling = False  # the trainer's jit_compile, set by the streams: a compiled decoding step on torch
        self.logps = self.reference_logps = None  # TokenLogps of the policy (μ > 1) and the reference (β > 0)

    # ---- set-up ------------------------------------------------------------------------------------------
    def setup(self, lm, data, run_dir, tokenizer=None):
        from gemma_tune.rewards import load_rewards

        self.lm, self.tokenizer, self.run_dir = lm, tokenizer, Path(run_dir)
        self.rewards = load_rewards(self.recipe.rl.rewards, max_completion_length=self.max_completion_length,
                                    dtype=self.recipe.model.dtype, tokenizer=tokenizer)
        self.metrics = ("loss", "reward", "reward_std", *(f"rewards/{f.name}" for f in self.rewards),
                        *(("kl",) if self.beta > 0 else ()), "clip_ratio", "completions/mean_length",
                        "completions/clipped_ratio", "frac_reward_zero_std", "entropy")
        chunk = self.recipe.train.loss_chunk_size
        self.logps = TokenLogps(lm, temperature=self.temperature, chunk_size=chunk)
        if self.beta > 0:
            self.reference_logps = TokenLogps(self._reference_model(lm), temperature=self.temperature,
                                              chunk_size=chunk, lora_off=self.recipe.lora is not None)
        log.info("%s: %d completions per prompt, rewards %s", self.recipe.method, self.num_generations,
                 ", ".join(f"{f.name} × {f.weight:g}" for f in self.rewards))

    def _reference_model(self, lm):
        """With LoRA the decoder itself (its adapters switched off by TokenLogps); else a frozen copy of the
        starting weights (full fine-tuning: twice the weights' memory, as TRL's reference model)."""
        if self.recipe.lora is not None:
            return lm
        from gemma_tune.models import build_model

        copy = build_model(lm.architecture, dtype=lm.dtype_policy.name, random_init=False)
        for target, source in zip(copy.variables, lm.variables):  # own buffers: JAX's predict donates its inputs
            target.assign(ops.copy(source.value))
        copy.trainable = False
        return copy

    @property
    def row_keys(self) -> tuple[str, ...]:
        keys = ROW_KEYS + ("advantages",) + ROW_STATS
        keys += tuple(k for i in range(len(self.rewards)) for k in (f"reward_{i}", f"reward_{i}_count"))
        if self.options["num_iterations"] > 1:
            keys += ("old_logps",)
        if self.beta > 0:
            keys += ("ref_logps",)
        return keys

    def steps_per_epoch(self, split, train) -> float:
        rounds = split.steps_per_epoch(train.batch_size * train.grad_accum)
        return rounds * self.options["num_iterations"]

    # ---- batches -----------------------------------------------------------------------------------------
    def train_stream(self, trainer, split, *, batch_size, accum, seed, start_step, total_steps=None):
        self.compile_sampling = trainer.jit_compile is True
        self.stream = Rollouts(self, split, batch_size=batch_size, accum=accum, seed=seed, start_step=start_step,
                               total_steps=total_steps if total_steps is not None else float("inf"),
                               run_dir=self.run_dir, restored=self._restored)
        return self.stream.batches()

    def callbacks(self):
        return [self.stream] if self.stream is not None else []

    def state(self, step):
        return self.stream.state(step) if self.stream is not None else {}

    def restore(self, arrays, step):
        self._restored = dict(arrays) if arrays else None

    def eval_stream(self, trainer, split, batch_size, step):
        """Completions of every eval prompt (batch_size prompts × G per batch), sampled now, before `evaluate`
        (which on JAX holds the weights outside the variables)."""
        self.compile_sampling = trainer.jit_compile is True
        seed = self.recipe.seed
        batches = []
        for index, prompts in enumerate(split.one_pass(batch_size)):
            real = len(prompts.rows)
            if real < batch_size:  # pad with the chunk's first prompt, its rows marked invalid
                prompts = split.take(prompts.rows + [prompts.rows[0]] * (batch_size - real))
            rows = self.rollout(prompts, seed=[seed, step, index, 1], chunk_rows=batch_size, step=step,
                                real_prompts=real)
            write_completions(self.run_dir / "completions.jsonl", rows, step, "eval")
            batches.append(rows)
        ready = [self._eval_batch(rows) for rows in batches]
        return (batch for batch in ready), len(ready)

    def _eval_batch(self, rows):
        from gemma_tune.train.data import with_counts

        return with_counts({k: rows[k] for k in self.row_keys}, self.count(rows))

    def rollout(self, prompts, *, seed, chunk_rows: int, step: int, real_prompts: int | None = None) -> dict:
        """The rows of a round (module gemma_tune.methods.rollouts) for `prompts` (a data.prompts.PromptBatch):
        each prompt's G completions sampled in chunks of `chunk_rows` prompts with seeds [*seed, chunk],
        scored, laid out, with advantages. `real_prompts`: the first so many are real, the rest padding."""
        from gemma_tune.rewards import score_completions

        G, tok = self.num_generations, self.tokenizer
        ids = [p for p in prompts.ids for _ in range(G)]
        texts_in = [p for p in prompts.prompts for _ in range(G)]
        columns = {k: [v for v in values for _ in range(G)] for k, values in prompts.columns.items()}
        tokens, sampled_logps, lengths, stopped = self._sample(ids, seed, chunk_rows * G)
        n = len(ids)
        valid = np.ones(n, np.float32)
        if real_prompts is not None:
            valid[real_prompts * G:] = 0.0
        completion_ids = [tokens[i, :lengths[i] - int(stopped[i])].tolist() for i in range(n)]
        completions = [tok.decode([t for t in c if t < tok.vocab_size]) for c in completion_ids]
        total, per_function = score_completions(self.rewards, texts_in, completions, columns, completion_ids)
        rows = completion_rows(ids, tokens, lengths, self.width)
        start = rows.pop("completion_start")
        rows["loss_mask"] *= valid[:, None]
        for key, chunked in (("old_logps", self.logps if self.options["num_iterations"] > 1 else None),
                             ("ref_logps", self.reference_logps)):
            if chunked is not None:
                rows[key] = self._forward(chunked, rows, chunk_rows * G)
        rewards = total
        if not self.kl_in_loss and self.beta > 0:  # RLOO: the sequence KL to the reference in the reward
            old = rows.get("old_logps", per_target(sampled_logps, start, lengths, self.width))
            rewards = kl_penalised_rewards(total, old, rows["ref_logps"], rows["loss_mask"], self.beta)
        rows["advantages"] = self.advantages(rewards) * valid
        spread = group_std(total, G)  # of the rewards themselves (RLOO's KL penalty is not a reward), as TRL logs it
        rows.update(reward=total * valid, reward_std=spread * valid,
                    zero_std=np.isclose(spread, 0.0).astype(np.float32) * valid,
                    length=lengths.astype(np.float32) * valid, clipped=(~stopped).astype(np.float32) * valid,
                    valid=valid)
        for i, f in enumerate(self.rewards):
            values = per_function[f.name]
            applies = ~np.isnan(values)
            rows[f"reward_{i}"] = np.where(applies, values, 0.0).astype(np.float32) * valid
            rows[f"reward_{i}_count"] = applies.astype(np.float32) * valid
        rows["texts"] = {"prompts": texts_in, "completions": completions, "rewards": per_function}
        return rows

    def _sample(self, ids: list[list[int]], seed, size: int):
        """(tokens, logps, lengths, stopped) of completions of the prompt `ids`, `size` at a time, the k-th
        chunk with seed [*seed, k] (gemma_tune.sampling.sample), every chunk's prompts in data.max_length slots
        (one shape for every round: the sampler compiles once)."""
        from gemma_tune.sampling import sample

        o, tok = self.options, self.tokenizer
        parts = [sample(self.lm, ids[start:start + size], max_new_tokens=self.max_completion_length,
                        temperature=self.temperature, top_k=o["top_k"], top_p=o["top_p"], seed=[*seed, k],
                        stop_ids=(tok.end_of_turn_id, tok.eos_id), pad_id=tok.pad_id,
                        compile_step=self.compile_sampling, prompt_slots=self.recipe.data.max_length)
                 for k, start in enumerate(range(0, len(ids), size))]
        return tuple(np.concatenate([getattr(p, name) for p in parts])
                     for name in ("tokens", "logps", "lengths", "stopped"))

    def _forward(self, scorer, rows, size: int) -> np.ndarray:
        """Per-token log-probabilities of `scorer` over the rows, `size` rows at a time."""
        inputs = {k: rows[k] for k in ROW_KEYS}
        out = [np.asarray(scorer.predict_on_batch({k: v[i:i + size] for k, v in inputs.items()}), np.float32)
               for i in range(0, len(rows["token_ids"]), size)]
        return np.concatenate(out)

    def advantages(self, rewards) -> np.ndarray:
        return grpo_advantages(rewards, self.num_generations, self.options["scale_rewards"])

    # ---- the step ----------------------------------------------------------------------------------------
    def count(self, batch):
        return {"completions": float(np.sum(batch["valid"])), "completion_tokens": float(np.sum(batch["loss_mask"]))}

    def forward(self, trainer, batch, training):
        lm = trainer.lm
        hidden = lm(model_inputs(batch), training=training, return_hidden_states=True)
        logp, entropy = token_logps(hidden, lm.token_embedding.embeddings, batch["target_ids"],
                                    chunk_size=trainer.chunk_size,
                                    final_logit_softcap=lm.architecture.final_logit_softcap,
                                    temperature=self.temperature)
        mask = ops.cast(batch["loss_mask"], "float32")
        old = batch["old_logps"] if "old_logps" in batch else ops.stop_gradient(logp)
        per_token, low, high = clipped_surrogate(logp, old, batch["advantages"], epsilon=self.epsilon,
                                                 epsilon_high=self.epsilon_high)
        out = {}
        if self.beta > 0:
            kl = k3_kl(logp, ops.cast(batch["ref_logps"], "float32"))
            if self.kl_in_loss:
                per_token = per_token + self.beta * kl
            out["kl"] = ops.sum(ops.stop_gradient(kl) * mask)
        loss = aggregate(per_token, mask, self.options["loss_type"], step_completions=batch["step_completions"][0],
                         step_tokens=batch["step_completion_tokens"][0],
                         max_completion_length=self.max_completion_length)
        valid = ops.cast(batch["valid"], "float32")
        out.update({"loss": loss, "completions": ops.sum(valid), "completion_tokens": ops.sum(mask),
                    "clipped_tokens": ops.sum(ops.maximum(low, high) * mask),
                    "entropy": ops.sum(ops.stop_gradient(entropy) * mask),
                    "targets": ops.sum(mask),
                    "tokens": ops.sum(ops.cast(ops.greater(batch["segment_ids"], 0), "float32"))})
        summed = ("reward", "reward_std", "zero_std", "length", "clipped")
        for key in summed + tuple(k for i in range(len(self.rewards)) for k in (f"reward_{i}", f"reward_{i}_count")):
            out[key] = ops.sum(ops.cast(batch[key], "float32"))
        return out

    def metric_values(self, sums, split):
        n, tokens = sums["completions"], sums["completion_tokens"]
        values = {"loss": ratio(sums["loss"], n), "reward": ratio(sums["reward"], n),
                  "reward_std": ratio(sums["reward_std"], n)}
        for i, f in enumerate(self.rewards):
            values[f"rewards/{f.name}"] = ratio(sums[f"reward_{i}"], sums[f"reward_{i}_count"])
        if self.beta > 0:
            values["kl"] = ratio(sums["kl"], tokens)
        values.update({"clip_ratio": ratio(sums["clipped_tokens"], tokens),
                       "completions/mean_length": ratio(sums["length"], n),
                       "completions/clipped_ratio": ratio(sums["clipped"], n),
                       "frac_reward_zero_std": ratio(sums["zero_std"], n),
                       "entropy": ratio(sums["entropy"], tokens)})
        return values


class RLOO(GRPO):
    """REINFORCE Leave-One-Out: GRPO's step with the leave-one-out baseline and the KL in the reward."""

    kl_in_loss = False

    def advantages(self, rewards) -> np.ndarray:
        return rloo_advantages(rewards, self.num_generations)
