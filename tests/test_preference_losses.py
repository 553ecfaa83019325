"""The per-pair preference losses (DPO, IPO, SimPO, ORPO, Bradley–Terry reward modelling) against NumPy
on hand-chosen numbers, a few exact hand values, and the gradients of DPO and ORPO."""

import math

import keras
import numpy as np
import pytest
from keras import ops

from gemma_tune.methods.dpo import dpo_loss
from gemma_tune.methods.ipo import ipo_loss
from gemma_tune.methods.orpo import chosen_nll, odds_ratio_loss
from gemma_tune.methods.reward import bradley_terry_loss
from gemma_tune.methods.simpo import simpo_loss

# three pairs: chosen ahead of the reference, behind it, and an extreme margin (log σ must not overflow)
CHOSEN = np.array([-12.5, -20.0, -3.0], np.float32)
REJECTED = np.array([-15.0, -18.25, -900.0], np.float32)
REF_CHOSEN = np.array([-13.0, -19.5, -4.0], np.float32)
REF_REJECTED = np.array([-14.0, -18.0, -100.0], np.float32)
# length-averaged log-probabilities (IPO, SimPO, ORPO): all < 0, one close to 0 (p ≈ 0.99)
AVG_CHOSEN = np.array([-0.5, -1.25, -0.01], np.float32)
AVG_REJECTED = np.array([-0.75, -1.0, -2.5], np.float32)
AVG_REF_CHOSEN = np.array([-0.625, -1.0, -0.25], np.float32)
AVG_REF_REJECTED = np.array([-0.5, -1.5, -2.0], np.float32)


def f32(x):
    return np.asarray(x, np.float32)


def f64(x):
    return np.asarray(x, np.float64)


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def close(got, expected):
    np.testing.assert_allclose(ops.convert_to_numpy(got), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("beta,smoothing", [(0.1, 0.0), (0.1, 0.1), (0.5, 0.1)])
def test_dpo(beta, smoothing):
    losses, chosen_rewards, rejected_rewards = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=beta,
                                                        label_smoothing=smoothing)
    delta = (f64(CHOSEN) - f64(REF_CHOSEN)) - (f64(REJECTED) - f64(REF_REJECTED))
    expected = -(1 - smoothing) * log_sigmoid(beta * delta) - smoothing * log_sigmoid(-beta * delta)
    close(losses, expected)
    close(chosen_rewards, beta * (f64(CHOSEN) - f64(REF_CHOSEN)))
    close(rejected_rewards, beta * (f64(REJECTED) - f64(REF_REJECTED)))
    assert np.all(np.isfinite(ops.convert_to_numpy(losses)))  # β·Δ = 80·β: no overflow


def test_dpo_hand_values():
    # policy = reference: Δ = 0, loss = log 2 whatever ε; Δ = 1.5 with β = 0.1, ε = 0.1:
    # 0.9 · log(1 + e^-0.15) + 0.1 · log(1 + e^0.15)
    losses, _, _ = dpo_loss(f32([-3.0, -12.5]), f32([-5.0, -15.0]), f32([-3.0, -13.0]), f32([-5.0, -14.0]),
                            beta=0.1, label_smoothing=0.1)
    close(losses, [math.log(2.0), 0.9 * math.log1p(math.exp(-0.15)) + 0.1 * math.log1p(math.exp(0.15))])


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo(beta):
    losses, chosen_rewards, rejected_rewards = ipo_loss(AVG_CHOSEN, AVG_REJECTED, AVG_REF_CHOSEN,
                                                        AVG_REF_REJECTED, beta=beta)
    delta = (f64(AVG_CHOSEN) - f64(AVG_REF_CHOSEN)) - (f64(AVG_REJECTED) - f64(AVG_REF_REJECTED))
    close(losses, (delta - 1 / (2 * beta)) ** 2)
    close(chosen_rewards, beta * (f64(AVG_CHOSEN) - f64(AVG_REF_CHOSEN)))
    close(rejected_rewards, beta * (f64(AVG_REJECTED) - f64(AVG_REF_REJECTED)))
    # hand value, first pair: Δ̄ = 0.125 − (−0.25) = 0.375
    assert float(ops.convert_to_numpy(losses)[0]) == pytest.approx((0.375 - 1 / (2 * beta)) ** 2, rel=1e-6)


@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (2.5, 0.5), (2.0, 0.0)])
def test_simpo(beta, gamma):
    losses, chosen_rewards, rejected_rewards = simpo_loss(AVG_CHOSEN, AVG_REJECTED, beta=beta, gamma=gamma)
    close(losses, -log_sigmoid(beta * (f64(AVG_CHOSEN) - f64(AVG_REJECTED)) - gamma))
    close(chosen_rewards, beta * f64(AVG_CHOSEN))
    close(rejected_rewards, beta * f64(AVG_REJECTED))


def test_simpo_margin_is_absolute():
    # β(ā_w − ā_l) = 2 · 0.5 = γ: the margin is met exactly, loss = log 2 (γ/β would give log(1 + e^-0.5))
    losses, _, _ = simpo_loss(f32([-0.5]), f32([-1.0]), beta=2.0, gamma=1.0)
    close(losses, [math.log(2.0)])


def numpy_log_odds(avg):
    return f64(avg) - np.log1p(-np.exp(f64(avg)))


def test_odds_ratio():
    term, log_odds = odds_ratio_loss(AVG_CHOSEN, AVG_REJECTED)
    expected = numpy_log_odds(AVG_CHOSEN) - numpy_log_odds(AVG_REJECTED)
    close(log_odds, expected)
    close(term, log_sigmoid(expected))
    # hand values: p_w = 1/2 (odds 1), p_l = 1/5 (odds 1/4): log odds ratio = log 4, log σ(log 4) = log(4/5)
    term, log_odds = odds_ratio_loss(np.log(f32([0.5])), np.log(f32([0.2])))
    close(log_odds, [math.log(4.0)])
    close(term, [math.log(0.8)])


def test_orpo_combination():
    """What the caller combines — NLL(chosen) − λ · mean over real pairs of the odds-ratio term — is
    TRL ORPOTrainer's `policy_nll_loss - (beta * logsigmoid(log_odds)).mean()`; pair 4 is padding."""
    lam = 0.25
    logp_sum = np.array([-5.0, -12.5, -0.25, 0.0], np.float32)  # summed over 10, 10 and 25 chosen tokens
    counts = np.array([10.0, 10.0, 25.0, 0.0], np.float32)
    pair_mask = np.array([1.0, 1.0, 1.0, 0.0], np.float32)
    avg_chosen = np.concatenate([AVG_CHOSEN, [-1.0]]).astype(np.float32)
    avg_rejected = np.concatenate([AVG_REJECTED, [-1.0]]).astype(np.float32)
    nll = chosen_nll(logp_sum, ops.sum(counts))
    term, _ = odds_ratio_loss(avg_chosen, avg_rejected)
    loss = nll - lam * ops.sum(ops.multiply(term, pair_mask)) / ops.sum(pair_mask)
    trl_nll = (5.0 + 12.5 + 0.25) / 45.0
    trl_losses = lam * log_sigmoid(numpy_log_odds(AVG_CHOSEN) - numpy_log_odds(AVG_REJECTED))
    close(nll, trl_nll)
    close(loss, trl_nll - trl_losses.mean())
    close(chosen_nll(np.zeros(2, np.float32), 0.0), 0.0)  # no chosen tokens: 0, not NaN


@pytest.mark.parametrize("center", [0.0, 0.01, 0.5])
def test_bradley_terry(center):
    chosen = np.array([1.5, -0.25, 3.0, 40.0], np.float32)
    rejected = np.array([0.5, 0.75, -2.0, -60.0], np.float32)
    losses = bradley_terry_loss(chosen, rejected, center_coefficient=center)
    close(losses, -log_sigmoid(f64(chosen) - f64(rejected)) + center * (f64(chosen) + f64(rejected)) ** 2)
    # averaged over pairs it is TRL RewardTrainer's loss: mean(-log σ(Δ)) + c · mean((r_w + r_l)²)
    trl = -log_sigmoid(f64(chosen) - f64(rejected)).mean() + center * ((f64(chosen) + f64(rejected)) ** 2).mean()
    close(ops.mean(losses), trl)


def test_bradley_terry_hand_values():
    # equal scores: log 2, plus c · (2r)² = 0.5 · 4 = 2 for r = 1
    close(bradley_terry_loss(f32([1.0]), f32([1.0]), center_coefficient=0.5), [math.log(2.0) + 2.0])


def gradient(fn, x):
    """d Σ fn(x) / dx on the active backend."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda v: ops.sum(fn(v)))(x))
    if backend == "tensorflow":
        import tensorflow as tf

        v = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(v)
            total = ops.sum(fn(v))
        return tape.gradient(total, v).numpy()
    v = ops.convert_to_tensor(x).requires_grad_()
    ops.sum(fn(v)).backward()
    return ops.convert_to_numpy(v.grad)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_dpo_gradient():
    # d loss / d log π(y_w) = −β · ((1 − ε) · σ(−βΔ) − ε · σ(βΔ))
    beta, eps = 0.1, 0.1
    got = gradient(lambda c: dpo_loss(c, REJECTED, REF_CHOSEN, REF_REJECTED, beta=beta, label_smoothing=eps)[0],
                   CHOSEN)
    delta = (f64(CHOSEN) - f64(REF_CHOSEN)) - (f64(REJECTED) - f64(REF_REJECTED))
    np.testing.assert_allclose(got, -beta * ((1 - eps) * sigmoid(-beta * delta) - eps * sigmoid(beta * delta)),
                               rtol=1e-5, atol=1e-7)


def test_odds_ratio_gradient():
    # d log odds(ā) / dā = 1 / (1 − e^ā), so d log σ(·) / dā_w = σ(−log odds ratio) / (1 − e^ā_w)
    got = gradient(lambda c: odds_ratio_loss(c, AVG_REJECTED)[0], AVG_CHOSEN)
    ratio = numpy_log_odds(AVG_CHOSEN) - numpy_log_odds(AVG_REJECTED)
    np.testing.assert_allclose(got, sigmoid(-ratio) / (1.0 - np.exp(f64(AVG_CHOSEN))), rtol=1e-5)
