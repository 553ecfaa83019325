"""Online RL's equations (gemma_tune.methods.rl) against hand numbers and NumPy, on every backend."""

import numpy as np
import pytest
from keras import ops

from gemma_tune.methods import rl


def numpy(x):
    return np.asarray(ops.convert_to_numpy(x), np.float64)


def test_grpo_advantages_by_hand():
    rewards = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    std = np.sqrt(4 * 0.5 ** 2 / 3)  # unbiased std of (1, 0, 0, 1)
    group = rl.grpo_advantages(rewards, 4, "group")
    np.testing.assert_allclose(group[:4], np.array([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4), rtol=1e-6)
    np.testing.assert_array_equal(group[4:], 0.0)  # all equal: no signal
    batch = rl.grpo_advantages(rewards, 4, "batch")
    np.testing.assert_allclose(batch[:4], np.array([0.5, -0.5, -0.5, 0.5]) / (np.std(rewards, ddof=1) + 1e-4),
                               rtol=1e-6)
    np.testing.assert_allclose(rl.grpo_advantages(rewards, 4, "none"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    np.testing.assert_allclose(rl.group_std(rewards, 4), [std] * 4 + [0.0] * 4, rtol=1e-6)
    with pytest.raises(ValueError, match="groups of 3"):
        rl.grpo_advantages(rewards, 3)


def test_rloo_advantages_are_leave_one_out():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 3.0, 1.0])
    out = rl.rloo_advantages(rewards, 3)
    expected = [1 - 0.0, 0 - 0.5, 0 - 0.5, 1 - 2.0, 3 - 1.0, 1 - 2.0]  # r_i − mean of the other two
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    grouped = rewards.reshape(2, 3)  # = G/(G−1) · (r − mean)
    np.testing.assert_allclose(out, (1.5 * (grouped - grouped.mean(1, keepdims=True))).ravel(), rtol=1e-6)


def test_kl_penalised_rewards():
    old = np.array([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    ref = np.array([[-1.5, -1.0, -9.0], [-0.5, 0.0, 0.0]])
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    out = rl.kl_penalised_rewards([1.0, 2.0], old, ref, mask, beta=0.1)
    np.testing.assert_allclose(out, [1.0 - 0.1 * (0.5 - 1.0), 2.0], rtol=1e-6)


def test_clipped_surrogate_by_hand():
    ratios = np.array([[1.5, 0.5, 1.1, 0.5]])
    advantages = np.array([1.0])
    old = np.zeros((1, 4), np.float32)
    loss, low, high = rl.clipped_surrogate(ops.convert_to_tensor(np.log(ratios).astype(np.float32)),
                                           ops.convert_to_tensor(old), ops.convert_to_tensor(advantages.astype(np.float32)),
                                           epsilon=0.2, epsilon_high=0.28)
    # A = +1: min(ρ, clip(ρ)) -> 1.28 (clipped high), 0.5 (unclipped: min), 1.1, 0.5
    np.testing.assert_allclose(numpy(loss), [[-1.28, -0.5, -1.1, -0.5]], rtol=1e-5)
    np.testing.assert_array_equal(numpy(high), [[1, 0, 0, 0]])
    np.testing.assert_array_equal(numpy(low), [[0, 0, 0, 0]])
    loss, low, high = rl.clipped_surrogate(ops.convert_to_tensor(np.log(ratios).astype(np.float32)),
                                           ops.convert_to_tensor(old), ops.convert_to_tensor(np.array([-2.0], np.float32)),
                                           epsilon=0.2, epsilon_high=0.2)
    # A = −2: −min(−2ρ, −2 clip(ρ)) = 2 · max(ρ, clip(ρ)) -> 3.0, 1.6 (clipped low), 2.2, 1.6
    np.testing.assert_allclose(numpy(loss), [[3.0, 1.6, 2.2, 1.6]], rtol=1e-5)
    np.testing.assert_array_equal(numpy(low), [[0, 1, 0, 1]])
    np.testing.assert_array_equal(numpy(high), [[0, 0, 0, 0]])


def test_k3_kl_by_hand():
    logp = np.array([[-1.0, -2.0, -0.3]], np.float32)
    ref = np.array([[-2.0, -2.0, -0.1]], np.float32)
    delta = ref - logp
    np.testing.assert_allclose(numpy(rl.k3_kl(ops.convert_to_tensor(logp), ops.convert_to_tensor(ref))),
                               np.exp(delta) - delta - 1, rtol=1e-5)
    assert numpy(rl.k3_kl(ops.convert_to_tensor(logp), ops.convert_to_tensor(logp))).max() == 0.0


@pytest.mark.parametrize("loss_type, expected", [("grpo", (1.5 + 4.0) / 4), ("dr_grpo", 7.0 / (4 * 3)),
                                                 ("dapo", 7.0 / 6)])
def test_aggregate_by_hand(loss_type, expected):
    per_token = ops.convert_to_tensor(np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32))
    mask = ops.convert_to_tensor(np.array([[1, 1, 0], [1, 0, 0]], np.float32))
    out = rl.aggregate(per_token, mask, loss_type, step_completions=4.0, step_tokens=6.0, max_completion_length=3)
    assert float(numpy(out)) == pytest.approx(expected, rel=1e-6)


def test_one_iteration_gradient_is_the_policy_gradient(value_and_grads):
    """ρ = 1 with old = stop_gradient(logp): d loss / d logp = −A · m / (step tokens), dapo."""
    logp = np.array([[-1.0, -0.5, -2.0], [-0.1, -3.0, -1.0]], np.float32)
    advantages = np.array([0.7, -1.3], np.float32)
    mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)

    def loss(logps, adv, mask):
        per_token, _, _ = rl.clipped_surrogate(logps, ops.stop_gradient(logps), adv, epsilon=0.2, epsilon_high=0.2)
        return rl.aggregate(per_token, mask, "dapo", step_completions=2.0, step_tokens=10.0, max_completion_length=3)

    value, (grad, _) = value_and_grads(loss, logp, advantages, mask)
    assert float(numpy(value)) == pytest.approx(-(0.7 * 2 - 1.3 * 3) / 10, rel=1e-6)
    np.testing.assert_allclose(numpy(grad), -advantages[:, None] * mask / 10, rtol=1e-6)
