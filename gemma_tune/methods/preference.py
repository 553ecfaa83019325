"""What the offline preference methods (DPO, IPO, SimPO, ORPO) share: pairs in, per-pair losses out.

A batch holds pairs (`chosen_*` and `rejected_*` rows of the data contract, one pair per row, never
packed; all-zero rows pad the last batch). Chosen and rejected go through the decoder in ONE forward
pass, stacked on the batch axis, and `sequence_logps` gives each sequence's log-probability summed over
its completion tokens (the tokens `loss_on: completion` trains: each answer's content and its
`<end_of_turn>`) and their count, from hidden states in chunks (never [B, T, vocab] logits). A method's
`pair_terms` turns them into per-pair losses and rewards; the step's objective is

    loss = Σ_pairs loss_i / P  (+ the method's own normalised terms)

with P the real pairs of the whole optimisation step (`step_pairs`). Metrics carry TRL's names:
`rewards/chosen`, `rewards/rejected`, `rewards/accuracies` (share of pairs whose chosen reward is the
larger), `rewards/margins`, `logps/chosen`, `logps/rejected` (summed log-probabilities), means over pairs.

The reference model of DPO/IPO (`uses_reference`), `preference.reference`: null is the starting model,
or any source `model.weights` accepts. Its log-probabilities are computed once, before training, and
cached in `RUN_DIR/reference/logps.safetensors`, keyed by the data's token arrays and what the reference
is, so that a resumed run reuses them — the only way with a second model (full fine-tuning's starting
weights, or a named reference), whose weights are dropped before training. With LoRA and the starting
model as reference they are computed at every step with the adapters switched off for that pass (no
second copy of the weights). `preference.precompute_reference`: null = the latter with LoRA and the
starting model as reference, else the former; true forces the one pass with LoRA too.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import ClassVar, NamedTuple

import keras
import numpy as np
from keras import ops

from gemma_tune.methods.base import MODEL_INPUTS, Method, ratio
from gemma_tune.methods.logps import sequence_logps

log = logging.getLogger("gemma_tune")

SIDES = ("chosen", "rejected")
CACHE = Path("reference") / "logps.safetensors"


class Logps(NamedTuple):
    """Summed completion log-probabilities and completion lengths of a batch's pairs, each [B]."""

    chosen: object
    rejected: object
    chosen_count: object
    rejected_count: object

    @property
    def chosen_mean(self):
        return self.chosen / ops.maximum(self.chosen_count, 1.0)

    @property
    def rejected_mean(self):
        return self.rejected / ops.maximum(self.rejected_count, 1.0)


def count_pairs(batch: dict[str, np.ndarray]) -> float:
    """The real pairs of a NumPy batch: those with a response token (all-zero rows pad the last batch)."""
    return float((batch["chosen_loss_mask"].sum(axis=1) > 0).sum())


def stack_pairs(batch, keys) -> dict:
    """`keys` of both sides of every pair, chosen then rejected, stacked on the batch axis."""
    return {k: ops.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0) for k in keys}


def pair_tokens(batch):
    """Σ real tokens of both sides of a batch of pairs."""
    return sum(ops.sum(ops.cast(ops.greater(batch[f"{side}_segment_ids"], 0), "float32")) for side in SIDES)


def pair_logps(lm, batch, training: bool, chunk_size: int) -> Logps:
    """Both sides of every pair through `lm` in one forward pass, stacked on the batch axis."""
    stacked = stack_pairs(batch, MODEL_INPUTS + ("target_ids", "loss_mask"))
    hidden = lm({k: stacked[k] for k in MODEL_INPUTS}, training=training, return_hidden_states=True)
    logps, counts = sequence_logps(hidden, lm.token_embedding.embeddings, stacked["target_ids"],
                                   stacked["loss_mask"], chunk_size=chunk_size,
                                   final_logit_softcap=lm.architecture.final_logit_softcap)
    rows = batch["chosen_token_ids"].shape[0]
    return Logps(logps[:rows], logps[rows:], counts[:rows], counts[rows:])


class PreferenceMethod(Method):
    """The shared behaviour (module docstring); subclasses give `pair_terms`."""

    stats = ("pairs", "chosen_rewards", "rejected_rewards", "accurate", "margins", "chosen_logps", "rejected_logps",
             "chosen_targets", "targets", "tokens")
    counts = ("pairs",)
    metrics = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")
    loss_label = "loss (per pair)"
    uses_reference: ClassVar[bool] = False

    def __init__(self, recipe, options: dict):
        super().__init__(recipe, options)
        self._cache: dict[str, np.ndarray] | None = None
        self._cache_key: str | None = None
        if self.uses_reference:  # validation allows precompute_reference false only with LoRA, reference null
            precompute = options.get("precompute_reference")
            on_the_fly = recipe.lora is not None and options.get("reference") is None
            self.precompute = not on_the_fly if precompute is None else precompute

    @abc.abstractmethod
    def pair_terms(self, policy: Logps, reference: Logps | None, batch) -> dict:
        """{"losses": [B], "chosen_rewards": [B], "rejected_rewards": [B]} and optionally "extra_loss" (a
        scalar already normalised per step) and further sums named in the subclass' `stats`."""

    def count(self, batch):
        counts = {"pairs": count_pairs(batch)}
        if "chosen_targets" in self.counts:
            counts["chosen_targets"] = float(batch["chosen_loss_mask"].sum())
        return counts

    def forward(self, trainer, batch, training):
        policy = pair_logps(trainer.lm, batch, training, trainer.chunk_size)
        reference = self._reference(trainer, batch, policy) if self.uses_reference else None
        terms = self.pair_terms(policy, reference, batch)
        valid = ops.cast(ops.greater(policy.chosen_count, 0.0), "float32")
        pairs = ops.maximum(ops.cast(batch["step_pairs"][0], "float32"), 1.0)
        loss = ops.sum(terms["losses"] * valid) / pairs + terms.get("extra_loss", 0.0)
        chosen_r, rejected_r = terms["chosen_rewards"], terms["rejected_rewards"]
        out = {"loss": loss, "pairs": ops.sum(valid),
               "chosen_rewards": ops.sum(chosen_r * valid), "rejected_rewards": ops.sum(rejected_r * valid),
               "accurate": ops.sum(ops.cast(ops.greater(chosen_r, rejected_r), "float32") * valid),
               "margins": ops.sum((chosen_r - rejected_r) * valid),
               "chosen_logps": ops.sum(ops.stop_gradient(policy.chosen) * valid),
               "rejected_logps": ops.sum(ops.stop_gradient(policy.rejected) * valid),
               "chosen_targets": ops.sum(policy.chosen_count),
               "targets": ops.sum(policy.chosen_count + policy.rejected_count),
               "tokens": pair_tokens(batch)}
        out.update({k: terms[k] for k in self.stats if k not in out})  # a method's own sums (ORPO's)
        return out

    def metric_values(self, sums, split):
        pairs = sums["pairs"]
        values = {"loss": ratio(sums["loss"], pairs), "rewards/chosen": ratio(sums["chosen_rewards"], pairs),
                  "rewards/rejected": ratio(sums["rejected_rewards"], pairs),
                  "rewards/accuracies": ratio(sums["accurate"], pairs), "rewards/margins": ratio(sums["margins"], pairs),
                  "logps/chosen": ratio(sums["chosen_logps"], pairs),
                  "logps/rejected": ratio(sums["rejected_logps"], pairs)}
        return values

    # ---- the reference model (DPO, IPO) -------------------------------------------------------------------
    def _reference(self, trainer, batch, policy: Logps) -> Logps:
        if self.precompute:
            chosen, rejected = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
        else:  # LoRA: the same weights with the adapters off
            from gemma_tune.models import adapters_disabled

            with adapters_disabled(trainer.lm):
                ref = pair_logps(trainer.lm, batch, False, trainer.chunk_size)
            chosen, rejected = ref.chosen, ref.rejected
        return Logps(ops.stop_gradient(ops.cast(chosen, "float32")), ops.stop_gradient(ops.cast(rejected, "float32")),
                     policy.chosen_count, policy.rejected_count)

    def setup(self, lm, data, run_dir, tokenizer=None):
        if not self.uses_reference:
            return
        source = self.options.get("reference")
        if not self.precompute:
            return
        splits = {name: split for name, split in (("train", data.train), ("eval", data.eval)) if split is not None}
        self._cache_key = self._key(splits, source)
        cached = self._read_cache(Path(run_dir) / CACHE)
        if cached is None:
            scorer_lm = self._reference_model(source) if source is not None else lm
            cached = {f"{name}_{side}": values for name, split in splits.items()
                      for side, values in zip(SIDES, self._score(scorer_lm, split, lora_off=source is None))}
            self._cache = cached
            log.info("reference log-probabilities computed for %s", ", ".join(splits))
        else:
            log.info("reference log-probabilities read from %s", Path(run_dir) / CACHE)
        for name, split in splits.items():
            for side in SIDES:
                split.arrays[f"reference_{side}_logps"] = cached[f"{name}_{side}"]

    def save(self, run_dir):
        if self._cache is None:
            return
        from safetensors.numpy import save_file

        from gemma_tune.export.atomic import share_permissions
        from gemma_tune.tempfiles import atomic_file

        path = Path(run_dir) / CACHE
        path.parent.mkdir(exist_ok=True)
        with atomic_file(path) as tmp:
            save_file(self._cache, str(tmp), metadata={"key": self._cache_key})
        share_permissions(path.parent)

    def _key(self, splits, source) -> str:
        """What the cached log-probabilities depend on: the reference (its source, or the starting model as
        the recipe builds it) and every split's token arrays."""
        recipe = self.recipe
        what = {"reference": source, "model": recipe.model.model_dump(mode="json"), "seed": recipe.seed,
                "quantize": recipe.quantize}
        digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
        for name, split in splits.items():
            for side in SIDES:
                for key in ("token_ids", "target_ids", "loss_mask"):
                    digest.update(f"{name}/{side}_{key}".encode())
                    digest.update(np.ascontiguousarray(split.arrays[f"{side}_{key}"]).tobytes())
        return digest.hexdigest()

    def _read_cache(self, path: Path) -> dict | None:
        if not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                if (f.metadata() or {}).get("key") != self._cache_key:
                    return None
                return {k: f.get_tensor(k) for k in f.keys()}
        except Exception:  # noqa: BLE001 - a damaged cache is recomputed
            log.warning("%s is unreadable: recomputing the reference log-probabilities", path)
            return None

    def _reference_model(self, source):
        """The model at `source`, in the recipe's compute dtype, for the one pass before training."""
        from gemma_tune.loading import load_model
        from gemma_tune.train.build import POLICIES

        return load_model(source, dtype=POLICIES[self.recipe.model.dtype])

    def _score(self, lm, split, lora_off: bool) -> tuple[np.ndarray, np.ndarray]:
        """Per-row summed completion log-probabilities of both sides of `split` under `lm` (with its LoRA
        adapters off when `lora_off`), in one pass of `predict`."""
        from gemma_tune.train.data import eval_batches, for_fit

        scorer = _Scorer(lm, lora_off, self.recipe.train.loss_chunk_size)
        batch_size = self.recipe.train.batch_size
        out = scorer.predict(for_fit(eval_batches(split, batch_size, self.count)),
                             steps=split.steps_per_epoch(batch_size), verbose=0)
        return tuple(np.asarray(out[side], np.float32)[:len(split)] for side in SIDES)


class _Scorer(keras.Model):
    """`predict` over pairs: {"chosen": [B], "rejected": [B]} summed completion log-probabilities."""

    def __init__(self, lm, lora_off: bool, chunk_size: int):
        super().__init__(name="reference_scorer")
        self.lm, self.lora_off, self.chunk_size = lm, lora_off, chunk_size

    def call(self, batch):
        from gemma_tune.models import adapters_disabled

        with adapters_disabled(self.lm) if self.lora_off else contextlib.nullcontext():
            logps = pair_logps(self.lm, batch, False, self.chunk_size)
        return {"chosen": logps.chosen, "rejected": logps.rejected}
