"""Odds Ratio Preference Optimization (ORPO): SFT on the chosen completion plus an odds-ratio term.

With ā(y) the policy's length-averaged log-probability of a completion (logp_sum / count from
`gemma_tune.methods.logps.sequence_logps`), so that P(y) = exp ā(y) ∈ (0, 1),

    log odds(y) = log (P(y) / (1 − P(y))) = ā − log(1 − exp ā)      (computed as ā − log(−expm1 ā))
    L_OR        = −log σ(log odds(y_w) − log odds(y_l))                                  per pair
    loss        = NLL(y_w) + λ · mean_pairs L_OR

Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"
(arXiv:2403.07691, eqs. 4–7). λ is the recipe's preference.beta, as in TRL ORPOTrainer, whose loss is
`policy_nll_loss - losses.mean()` with `losses = beta * logsigmoid(log_odds)` per pair and
`rewards/chosen`, `rewards/rejected` = β·ā.

What the caller combines: `odds_ratio_loss` gives, per pair, log σ(log odds(y_w) − log odds(y_l)) (a
log-probability, ≤ 0: it is SUBTRACTED, times λ) and the log odds difference (TRL's `log_odds_ratio`
metric); `chosen_nll` gives NLL(y_w), the chosen tokens' negative log-likelihood per token over the
whole optimisation batch, over the tokens the chosen loss_mask counts (TRL ORPOTrainer's
`policy_nll_loss` is the mean cross-entropy over the chosen rows' prompt AND completion tokens of a
decoder-only model, while its log odds use the completion only). The ORPO loss is
`chosen_nll(...) − λ · Σ_pairs (mask · log_odds_ratio_term) / Σ_pairs mask` for a pair mask that is 0
on padding pairs.
"""

from __future__ import annotations

from keras import ops

from gemma_tune.methods.base import ratio
from gemma_tune.methods.preference import PreferenceMethod


def _log_odds(avg_logps):
    """log(p / (1 − p)) for p = exp(avg_logps) < 1, accurate where p is close to 1."""
    avg_logps = ops.cast(avg_logps, "float32")
    return avg_logps - ops.log(-ops.expm1(avg_logps))


def odds_ratio_loss(chosen_avg_logps, rejected_avg_logps):
    """Per-pair ORPO odds-ratio terms (module docstring) -> (log_odds_ratio_term, log_odds), each [B].

    `log_odds_ratio_term` = log σ(log odds(y_w) − log odds(y_l)) (≤ 0), `log_odds` = log odds(y_w) −
    log odds(y_l), in float32. Inputs are length-averaged completion log-probabilities [B], strictly below 0.
    """
    log_odds = _log_odds(chosen_avg_logps) - _log_odds(rejected_avg_logps)
    return ops.log_sigmoid(log_odds), log_odds


def chosen_nll(chosen_logp_sum, num_targets):
    """NLL(y_w) = −Σ_b logp_sum_b / N: the chosen tokens' mean negative log-likelihood.

    chosen_logp_sum [B] from `sequence_logps` over the chosen rows (padding pairs have no counted tokens
    and add nothing); N (`num_targets`) the number of counted chosen tokens in the WHOLE optimisation
    batch, as in `gemma_tune.methods.sft` (≥ 1 is enforced).
    """
    return -ops.sum(ops.cast(chosen_logp_sum, "float32")) / ops.maximum(ops.cast(num_targets, "float32"), 1.0)


class ORPO(PreferenceMethod):
    """ORPO, no reference model: NLL(y_w) − λ·mean log σ(log odds ratio), λ = preference.beta. Metrics add
    TRL's `nll_loss` (the chosen tokens' mean NLL) and `log_odds_ratio` (mean log σ term) and
    `log_odds_chosen` (mean log odds difference); the rewards are β·ā."""

    stats = PreferenceMethod.stats + ("nll", "log_odds_ratio", "log_odds_chosen")
    counts = ("pairs", "chosen_targets")
    metrics = PreferenceMethod.metrics + ("nll_loss", "log_odds_ratio", "log_odds_chosen")

    def pair_terms(self, policy, reference, batch):
        weight = self.options["beta"]
        term, log_odds = odds_ratio_loss(policy.chosen_mean, policy.rejected_mean)
        valid = ops.cast(ops.greater(policy.chosen_count, 0.0), "float32")
        return {"losses": -weight * term, "extra_loss": chosen_nll(policy.chosen, batch["step_chosen_targets"][0]),
                "chosen_rewards": ops.stop_gradient(weight * policy.chosen_mean),
                "rejected_rewards": ops.stop_gradient(weight * policy.rejected_mean),
                "nll": -ops.sum(ops.stop_gradient(policy.chosen)),
                "log_odds_ratio": ops.sum(ops.stop_gradient(term) * valid),
                "log_odds_chosen": ops.sum(ops.stop_gradient(log_odds) * valid)}

    def metric_values(self, sums, split):
        values = super().metric_values(sums, split)
        values.update({"nll_loss": ratio(sums["nll"], sums["chosen_targets"]),
                       "log_odds_ratio": ratio(sums["log_odds_ratio"], sums["pairs"]),
                       "log_odds_chosen": ratio(sums["log_odds_chosen"], sums["pairs"])})
        return values
