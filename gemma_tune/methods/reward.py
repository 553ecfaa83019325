"""Reward modelling: the Bradley–Terry pairwise loss, with optional reward centering.

With r_w = r(x, y_w) and r_l = r(x, y_l) the scalar scores of the chosen and the rejected completion,

    loss = −log σ(r_w − r_l) + c · (r_w + r_l)²

The first term is the Bradley–Terry likelihood of the preference (Bradley & Terry 1952; Ouyang et
al. 2022, "Training language models to follow instructions with human feedback", arXiv:2203.02155,
eq. 1); the second pushes the scores towards zero mean (Eisenstein et al. 2023, "Helping or Herding?
Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking", arXiv:2312.09244, eq. 2). Averaged over
pairs this is TRL RewardTrainer's loss `-logsigmoid(r_w - r_l).mean() + center_rewards_coefficient *
mean((r_w + r_l)**2)`.
"""

from __future__ import annotations

from keras import ops


def bradley_terry_loss(chosen_scores, rejected_scores, *, center_coefficient: float = 0.0):
    """Per-pair reward-model losses [B] in float32 (module docstring); the caller masks padding pairs and
    averages."""
    chosen_scores, rejected_scores = ops.cast(chosen_scores, "float32"), ops.cast(rejected_scores, "float32")
    return (-ops.log_sigmoid(chosen_scores - rejected_scores)
            + center_coefficient * ops.square(chosen_scores + rejected_scores))
