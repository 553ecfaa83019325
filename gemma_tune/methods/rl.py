"""The equations of online RL from rewards (GRPO, RLOO): advantages, the clipped surrogate, the KL term and
how per-token losses are averaged. Pure functions: advantages over NumPy (computed on the host, per round of
completions), the loss over `keras.ops`.

Notation: a round samples G completions o_1 … o_G per prompt q from the policy π_θ_old (the current weights
when the round is sampled), with rewards r_i; per completion token t,

    ρ_i,t = π_θ(o_i,t | q, o_i,<t) / π_θ_old(o_i,t | q, o_i,<t) = exp(log π_θ − log π_θ_old)

Advantages (one per completion, the same for all its tokens):
  GRPO (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300, §4.1.2, outcome supervision):
      A_i = (r_i − mean_group(r)) / (std_group(r) + 1e-4)        scale_rewards: group
      A_i = (r_i − mean_group(r)) / (std_batch(r) + 1e-4)        scale_rewards: batch (std over the whole
                                                                   round, as TRL's scale_rewards="batch")
      A_i =  r_i − mean_group(r)                                  scale_rewards: none (Liu et al. 2025,
                                                                   "Understanding R1-Zero-Like Training"
                                                                   — Dr. GRPO, arXiv:2503.20783)
      std is the unbiased sample standard deviation (torch.std, as TRL).
  RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
  Human Feedback in LLMs", arXiv:2402.14740, eq. 10; Kool et al. 2019):
      A_i = r_i − (1 / (G − 1)) Σ_{j≠i} r_j  =  G / (G − 1) · (r_i − mean_group(r))

Per-token loss (the PPO clipped surrogate, Schulman et al. 2017, arXiv:1707.06347, eq. 7, as GRPO uses it;
the asymmetric bound 1 + ε_high is DAPO's clip-higher, Yu et al. 2025, arXiv:2503.14476, eq. 10):
      ℓ_i,t = −min(ρ_i,t · A_i, clip(ρ_i,t, 1 − ε, 1 + ε_high) · A_i)  +  β · KL_i,t
      KL_i,t = exp(ref − logp) − (ref − logp) − 1                 the k3 estimator (Schulman 2020,
               (logp = log π_θ, ref = log π_ref of the token)    "Approximating KL divergence"; GRPO eq. 4)
  RLOO puts no KL in the loss: β enters its reward, r_i − β Σ_t (log π_θ_old − log π_ref) (Ahmadian et al.
  §3, the sequence-level KL penalty of RLHF; `kl_penalised_rewards`).

Averaging (`loss_type`), over the completions of the whole optimisation step (all micro-batches), m_i,t = 1
on completion tokens:
      grpo     (1/N) Σ_i (Σ_t m ℓ / Σ_t m)                      N = completions of the step (GRPO eq. 3)
      dr_grpo  Σ_i Σ_t m ℓ / (N · L_max)                        L_max = max_completion_length (Dr. GRPO)
      dapo     Σ_i Σ_t m ℓ / Σ_i Σ_t m                          token-level mean of the step (DAPO eq. 8)
`clipped_surrogate` returns ℓ and the token masks TRL logs as clip_ratio (ρ < 1 − ε with A < 0, or ρ > 1 + ε_high
with A > 0: the tokens whose gradient the clip removes).
"""

from __future__ import annotations

import numpy as np
from keras import ops

STD_EPSILON = 1e-4
LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def _groups(rewards, group_size: int) -> np.ndarray:
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 1 or len(rewards) % group_size:
        raise ValueError(f"{rewards.shape} rewards do not split into groups of {group_size}")
    return rewards.reshape(-1, group_size)


def group_std(rewards, group_size: int) -> np.ndarray:
    """Each completion's group reward std (unbiased) [n]."""
    grouped = _groups(rewards, group_size)
    return np.repeat(grouped.std(axis=1, ddof=1), group_size)


def grpo_advantages(rewards, group_size: int, scale: str = "group") -> np.ndarray:
    """GRPO advantages [n] (module docstring) of rewards [n] laid out group after group; float32."""
    grouped = _groups(rewards, group_size)
    centred = grouped - grouped.mean(axis=1, keepdims=True)
    if scale == "group":
        centred = centred / (grouped.std(axis=1, ddof=1, keepdims=True) + STD_EPSILON)
    elif scale == "batch":
        centred = centred / (grouped.std(ddof=1) + STD_EPSILON)
    elif scale != "none":
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale!r}")
    return centred.reshape(-1).astype(np.float32)


def rloo_advantages(rewards, group_size: int) -> np.ndarray:
    """RLOO advantages [n]: each reward minus the mean of the other G − 1 of its group; float32."""
    grouped = _groups(rewards, group_size)
    others = (grouped.sum(axis=1, keepdims=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(-1).astype(np.float32)


def kl_penalised_rewards(rewards, old_logps, ref_logps, mask, beta: float) -> np.ndarray:
    """RLOO's rewards with the sequence KL penalty: r_i − β Σ_t m (log π_old − log π_ref), [n] float32."""
    kl = ((np.asarray(old_logps, np.float64) - np.asarray(ref_logps, np.float64)) * mask).sum(axis=1)
    return (np.asarray(rewards, np.float64) - beta * kl).astype(np.float32)


def k3_kl(logps, ref_logps):
    """Per-token KL estimate exp(ref − logp) − (ref − logp) − 1 (≥ 0; module docstring)."""
    delta = ref_logps - logps
    return ops.exp(delta) - delta - 1.0


def clipped_surrogate(logps, old_logps, advantages, *, epsilon: float, epsilon_high: float):
    """(ℓ [B, T] without the KL term, low-clipped [B, T], high-clipped [B, T]) for per-token log-probs
    `logps` / `old_logps` [B, T] and advantages [B] (module docstring); float32."""
    ratio = ops.exp(logps - old_logps)
    adv = ops.expand_dims(ops.cast(advantages, "float32"), -1)
    unclipped = ratio * adv
    clipped = ops.clip(ratio, 1.0 - epsilon, 1.0 + epsilon_high) * adv
    loss = -ops.minimum(unclipped, clipped)
    low = ops.logical_and(ops.less(ratio, 1.0 - epsilon), ops.less(adv, 0.0))
    high = ops.logical_and(ops.greater(ratio, 1.0 + epsilon_high), ops.greater(adv, 0.0))
    return loss, ops.cast(low, "float32"), ops.cast(high, "float32")


def aggregate(per_token, mask, loss_type: str, *, step_completions, step_tokens, max_completion_length: int):
    """The micro-batch's share of the step's objective (module docstring: `loss_type`); per_token, mask
    [B, T]; step_completions / step_tokens: the whole optimisation step's counts."""
    mask = ops.cast(mask, "float32")
    summed = ops.sum(per_token * mask, axis=-1)
    if loss_type == "grpo":
        per_sequence = summed / ops.maximum(ops.sum(mask, axis=-1), 1.0)
        return ops.sum(per_sequence) / ops.maximum(step_completions, 1.0)
    if loss_type == "dr_grpo":
        return ops.sum(summed) / (ops.maximum(step_completions, 1.0) * max_completion_length)
    if loss_type == "dapo":
        return ops.sum(summed) / ops.maximum(step_tokens, 1.0)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
