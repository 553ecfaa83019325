"""Direct Preference Optimization (DPO), with conservative DPO's label smoothing.

With log π(y) the policy's log-probability of a completion summed over its tokens
(`gemma_tune.methods.logps.sequence_logps`), π_ref the frozen reference model, y_w the chosen and
y_l the rejected completion of one pair,

    Δ    = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))
    loss = −(1 − ε) · log σ(β·Δ) − ε · log σ(−β·Δ)

Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
Model" (arXiv:2305.18290, eq. 7) for ε = 0; ε > 0 is conservative DPO (Mitchell 2023, "A note on DPO
with noisy preferences and relationship to IPO"), TRL DPOTrainer's `loss_type="sigmoid"` with
`label_smoothing=ε`. The implicit rewards β·(log π(y) − log π_ref(y)) are TRL's `rewards/chosen` and
`rewards/rejected`.
"""

from __future__ import annotations

from keras import ops

from gemma_tune.methods.preference import PreferenceMethod


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1,
             label_smoothing: float = 0.0):
    """Per-pair DPO losses (module docstring) -> (losses, chosen_rewards, rejected_rewards), each [B].

    All inputs are summed completion log-probabilities [B]; the caller masks padding pairs and averages.
    Computed in float32; the rewards are metrics, no gradient flows through them.
    """
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps = (
        ops.cast(x, "float32") for x in (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps))
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    margin = beta * (chosen_ratio - rejected_ratio)
    losses = -(1.0 - label_smoothing) * ops.log_sigmoid(margin) - label_smoothing * ops.log_sigmoid(-margin)
    return losses, ops.stop_gradient(beta * chosen_ratio), ops.stop_gradient(beta * rejected_ratio)


class DPO(PreferenceMethod):
    """DPO against a reference model (`gemma_tune.methods.preference`); options beta, label_smoothing."""

    uses_reference = True

    def pair_terms(self, policy, reference, batch):
        losses, chosen, rejected = dpo_loss(policy.chosen, policy.rejected, reference.chosen, reference.rejected,
                                            beta=self.options["beta"], label_smoothing=self.options["label_smoothing"])
        return {"losses": losses, "chosen_rewards": chosen, "rejected_rewards": rejected}
