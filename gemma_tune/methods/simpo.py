"""Simple Preference Optimization (SimPO): a reference-free, length-normalised margin loss.

With ā(y) the policy's length-averaged log-probability of a completion (logp_sum / count from
`gemma_tune.methods.logps.sequence_logps`), y_w the chosen and y_l the rejected completion,

    loss = −log σ(β · (ā(y_w) − ā(y_l)) − γ)

Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
(arXiv:2405.14734, eq. 6). γ is the absolute target margin, as in the paper and in TRL CPOTrainer's
`loss_type="simpo"` (which subtracts `simpo_gamma / beta` inside β·(…)); the rewards β·ā(y) are
CPOTrainer's `rewards/chosen` and `rewards/rejected`. No reference model.
"""

from __future__ import annotations

from keras import ops

from gemma_tune.methods.orpo import chosen_nll
from gemma_tune.methods.preference import PreferenceMethod


def simpo_loss(chosen_avg_logps, rejected_avg_logps, *, beta: float = 2.0, gamma: float = 1.0):
    """Per-pair SimPO losses (module docstring) -> (losses, chosen_rewards, rejected_rewards), each [B].

    Inputs are length-averaged completion log-probabilities [B]; the caller masks padding pairs and
    averages. Computed in float32; the rewards are metrics, no gradient flows through them.
    """
    chosen = ops.cast(chosen_avg_logps, "float32")
    rejected = ops.cast(rejected_avg_logps, "float32")
    losses = -ops.log_sigmoid(beta * (chosen - rejected) - gamma)
    return losses, ops.stop_gradient(beta * chosen), ops.stop_gradient(beta * rejected)


class SimPO(PreferenceMethod):
    """SimPO, no reference model; options beta, gamma and sft_weight α, which adds α·NLL of the chosen
    completion tokens (their mean over the optimisation step, as CPO's NLL term)."""

    counts = ("pairs", "chosen_targets")

    def pair_terms(self, policy, reference, batch):
        losses, chosen, rejected = simpo_loss(policy.chosen_mean, policy.rejected_mean, beta=self.options["beta"],
                                              gamma=self.options["gamma"])
        terms = {"losses": losses, "chosen_rewards": chosen, "rejected_rewards": rejected}
        if self.options["sft_weight"]:
            terms["extra_loss"] = self.options["sft_weight"] * chosen_nll(policy.chosen, batch["step_chosen_targets"][0])
        return terms
