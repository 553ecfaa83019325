"""Identity Preference Optimization (IPO).

With ā(y) the policy's LENGTH-AVERAGED log-probability of a completion (Σ_t log π(y_t | …) / |y|,
i.e. logp_sum / count from `gemma_tune.methods.logps.sequence_logps`), ā_ref the reference model's,
y_w the chosen and y_l the rejected completion,

    Δ̄    = (ā(y_w) − ā_ref(y_w)) − (ā(y_l) − ā_ref(y_l))
    loss = (Δ̄ − 1 / (2β))²

Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences"
(arXiv:2310.12036, eq. 17). The per-token average follows TRL DPOTrainer's `loss_type="ipo"`, which
divides each sequence's log-probability by its completion length; the rewards β·(ā − ā_ref) are its
`rewards/chosen` and `rewards/rejected` for IPO.
"""

from __future__ import annotations

from keras import ops

from gemma_tune.methods.preference import PreferenceMethod


def ipo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1):
    """Per-pair IPO losses (module docstring) -> (losses, chosen_rewards, rejected_rewards), each [B].

    All inputs are length-averaged completion log-probabilities [B]; the caller masks padding pairs and
    averages. Computed in float32; the rewards are metrics, no gradient flows through them.
    """
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps = (
        ops.cast(x, "float32") for x in (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps))
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    losses = ops.square(chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta))
    return losses, ops.stop_gradient(beta * chosen_ratio), ops.stop_gradient(beta * rejected_ratio)


class IPO(PreferenceMethod):
    """IPO against a reference model, on length-averaged log-probabilities; option beta."""

    uses_reference = True

    def pair_terms(self, policy, reference, batch):
        losses, chosen, rejected = ipo_loss(policy.chosen_mean, policy.rejected_mean, reference.chosen_mean,
                                            reference.rejected_mean, beta=self.options["beta"])
        return {"losses": losses, "chosen_rewards": chosen, "rejected_rewards": rejected}
