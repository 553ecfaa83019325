"""gemma_tune.methods: tuning methods as components of the one trainer.

A method is declared here, one registry line each (`METHODS`), by what a recipe needs to know without
importing Keras (so that validation runs before the backend is chosen): the data formats it trains on,
the recipe section of its options and each option's default, and where its behaviour lives. The
behaviour is a `gemma_tune.methods.base.Method` subclass in the method's own module: its batch count,
forward pass to statistics and loss, metrics, and any layers it adds. The trainer, the batches, the
callbacks, the metric files, the summary and checkpoints read everything from those two places; adding
a method is its module and its registry line.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class MethodSpec:
    """What a recipe knows of a method: `formats` it trains on, `section` of the recipe that holds its
    options (None: it takes none) with each option's `defaults`, `behaviour` = "module:Class", and
    `check(recipe, options)`, the rules a recipe of this method obeys beyond its types: [(dotted key, problem)]."""

    name: str
    formats: tuple[str, ...]
    behaviour: str
    section: str | None = None
    defaults: dict = field(default_factory=dict)
    check: Callable[[object, dict], list[tuple[str, str]]] | None = None  # more rules: [(key, problem)]

    def load(self):
        """The `Method` subclass (imports Keras)."""
        module, _, cls = self.behaviour.partition(":")
        return getattr(importlib.import_module(module), cls)


def reference_rules(recipe, options: dict) -> list[tuple[str, str]]:
    """DPO/IPO: a reference computed at every step exists only as the LoRA model with its adapters off."""
    if options["precompute_reference"] is False and (recipe.lora is None or options["reference"] is not None):
        return [("preference.precompute_reference", "false needs lora: and preference.reference null (the reference is then "
                                         "the model with its adapters off); a frozen second model is always "
                                         "precomputed")]
    return []


def reward_rules(recipe, options: dict) -> list[tuple[str, str]]:
    """A reward model scores sequences: it neither generates nor exports as a causal LM."""
    problems = []
    if "keras" in recipe.export.formats:
        problems.append(("export.formats", "a reward model exports as safetensors (transformers' "
                                           "*ForSequenceClassification) or peft (adapters and score head); the keras "
                                           "format holds a causal LM"))
    if recipe.train.sample_prompts:
        problems.append(("train.sample_prompts", "a reward model scores sequences, it does not generate: expected [] "
                                                 "(`gemma-tune score` scores rows)"))
    return problems


def rl_rules(recipe, options: dict) -> list[tuple[str, str]]:
    """grpo/rloo: rewards that exist (checked without importing them: gemma_tune.rewards.reward_problems),
    groups of at least two completions, a recipe section of its own."""
    from gemma_tune.rewards import reward_problems

    problems = list(reward_problems(recipe.rl.rewards if recipe.rl is not None and recipe.rl.rewards else []))
    if options["top_k"] is not None and options["top_k"] < 1:
        problems.append(("rl.top_k", "expected a positive number of tokens, or null"))
    return problems


SFT_FORMATS = ("text", "prompt_completion", "chat", "image_text")
# TRL GRPOConfig's defaults (num_generations 8, temperature 1, top_p 1, β 0, ε 0.2, loss_type dapo, scale_rewards
# group, num_iterations 1) but max_completion_length 256 (TRL: 256 since 0.23)
RL = {"num_generations": 8, "max_completion_length": 256, "temperature": 1.0, "top_p": 1.0, "top_k": None,
      "beta": 0.0, "epsilon": 0.2, "epsilon_high": None, "loss_type": "dapo", "num_iterations": 1, "rewards": []}
REFERENCE = {"reference": None, "precompute_reference": None}  # dpo/ipo; checked by reference_rules
METHODS = {spec.name: spec for spec in (
    MethodSpec("sft", SFT_FORMATS, "gemma_tune.methods.sft:SFT"),
    MethodSpec("dpo", ("preference",), "gemma_tune.methods.dpo:DPO", "preference",
               {"beta": 0.1, "label_smoothing": 0.0, **REFERENCE}, reference_rules),
    MethodSpec("ipo", ("preference",), "gemma_tune.methods.ipo:IPO", "preference", {"beta": 0.1, **REFERENCE},
               reference_rules),
    MethodSpec("simpo", ("preference",), "gemma_tune.methods.simpo:SimPO", "preference",
               {"beta": 2.0, "gamma": 1.0, "sft_weight": 0.0}),
    MethodSpec("orpo", ("preference",), "gemma_tune.methods.orpo:ORPO", "preference", {"beta": 0.1}),
    MethodSpec("reward", ("preference",), "gemma_tune.methods.reward:Reward", "reward", {"center_coefficient": 0.0},
               reward_rules),
    MethodSpec("grpo", ("prompt",), "gemma_tune.methods.grpo:GRPO", "rl", {**RL, "scale_rewards": "group"}, rl_rules),
    # RLOO: no reward scaling (the leave-one-out baseline alone); β 0.05 in the reward, as TRL's RLOOConfig
    MethodSpec("rloo", ("prompt",), "gemma_tune.methods.grpo:RLOO", "rl", {**RL, "beta": 0.05}, rl_rules),
)}


def build_method(recipe):
    """The `Method` object of a validated recipe."""
    spec = METHODS[recipe.method]
    return spec.load()(recipe, options=method_options(recipe))


def method_options(recipe) -> dict:
    """The chosen method's options: its defaults, overridden by the values its recipe section sets (a
    null there means the method's default)."""
    spec = METHODS[recipe.method]
    section = getattr(recipe, spec.section) if spec.section else None
    given = {} if section is None else section.model_dump()
    return {**spec.defaults, **{k: v for k, v in given.items() if k in spec.defaults and v is not None}}
