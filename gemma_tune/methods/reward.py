"""Reward modelling: the Bradley–Terry pairwise loss, with optional reward centering.

With r_w = r(x, y_w) and r_l = r(x, y_l) the scalar scores of the chosen and the rejected completion,

    loss = −log σ(r_w − r_l) + c · (r_w + r_l)²

The first term is the Bradley–Terry likelihood of the preference (Bradley & Terry 1952; Ouyang et
al. 2022, "Training language models to follow instructions with human feedback", arXiv:2203.02155,
eq. 1); the second pushes the scores towards zero mean (Eisenstein et al. 2023, "Helping or Herding?
Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking", arXiv:2312.09244, eq. 2). Averaged over
pairs this is TRL RewardTrainer's loss `-logsigmoid(r_w - r_l).mean() + center_rewards_coefficient *
mean((r_w + r_l)**2)`.

`Reward` is the method (`method: reward`, option `reward.center_coefficient` = c, default 0): the
decoder plus a scalar head (`gemma_tune.models.reward`: r(x) = the head on the final hidden state of
the sequence's last real token) trained on preference pairs, chosen and rejected stacked in one forward
pass as the preference methods do. A step's objective is Σ_pairs loss_i / P, P the real pairs of the
whole optimisation step (`step_pairs`). Metrics carry TRL RewardTrainer's names, means over pairs:
`loss`, `accuracy` (the share of pairs with r_w > r_l) and `margin` (r_w − r_l); eval rows the same.
"""

from __future__ import annotations

from keras import ops

from gemma_tune.methods.base import MODEL_INPUTS, Method, ratio
from gemma_tune.methods.preference import SIDES, count_pairs, pair_tokens, stack_pairs
from gemma_tune.models.reward import SCORE, score_head, sequence_scores


def bradley_terry_loss(chosen_scores, rejected_scores, *, center_coefficient: float = 0.0):
    """Per-pair reward-model losses [B] in float32 (module docstring); the caller masks padding pairs and
    averages."""
    chosen_scores, rejected_scores = ops.cast(chosen_scores, "float32"), ops.cast(rejected_scores, "float32")
    return (-ops.log_sigmoid(chosen_scores - rejected_scores)
            + center_coefficient * ops.square(chosen_scores + rejected_scores))


class Reward(Method):
    """A Bradley–Terry reward model on preference pairs (module docstring); its layer is the score head."""

    stats = ("pairs", "accurate", "margins", "targets", "tokens")
    counts = ("pairs",)
    metrics = ("loss", "accuracy", "margin")
    loss_label = "loss (per pair)"

    def count(self, batch):
        return {"pairs": count_pairs(batch)}

    def layers(self, lm):
        return {SCORE: score_head(lm.architecture.hidden_size)}

    def forward(self, trainer, batch, training):
        stacked = stack_pairs(batch, MODEL_INPUTS)
        scores = sequence_scores(trainer.lm, trainer.heads[SCORE], stacked, training=training)
        rows = batch["chosen_token_ids"].shape[0]
        chosen, rejected = scores[:rows], scores[rows:]
        valid = ops.cast(ops.greater(ops.sum(ops.cast(batch["chosen_loss_mask"], "float32"), axis=1), 0.0), "float32")
        pairs = ops.maximum(ops.cast(batch["step_pairs"][0], "float32"), 1.0)
        losses = bradley_terry_loss(chosen, rejected, center_coefficient=self.options["center_coefficient"])
        margin = ops.stop_gradient(chosen - rejected)
        return {"loss": ops.sum(losses * valid) / pairs, "pairs": ops.sum(valid),
                "accurate": ops.sum(ops.cast(ops.greater(margin, 0.0), "float32") * valid),
                "margins": ops.sum(margin * valid),
                "targets": sum(ops.sum(ops.cast(batch[f"{side}_loss_mask"], "float32")) for side in SIDES),
                "tokens": pair_tokens(batch)}

    def metric_values(self, sums, split):
        pairs = sums["pairs"]
        return {"loss": ratio(sums["loss"], pairs), "accuracy": ratio(sums["accurate"], pairs),
                "margin": ratio(sums["margins"], pairs)}
