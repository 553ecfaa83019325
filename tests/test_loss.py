"""The chunked SFT loss: hand numbers, a NumPy reference, and equality (value and gradient) with the
plain full-logits loss on the active backend."""

import math

import numpy as np
import pytest
from keras import ops

from gemma_tune.methods.sft import sft_loss


pytestmark = pytest.mark.usefixtures("exact_float32_matmuls")


def numpy_loss(hidden, embedding, targets, mask, num_targets, softcap=None):
    """Reference: full logits in float64, log-softmax, masked sum / N; and the argmax hit count."""
    logits = hidden.astype(np.float64) @ embedding.astype(np.float64).T
    if softcap is not None:
        logits = softcap * np.tanh(logits / softcap)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    hits = (logits.argmax(-1) == targets).astype(np.float64)
    return (nll * mask).sum() / num_targets, (hits * mask).sum()


def plain_loss(hidden, embedding, targets, mask, num_targets, softcap=None):
    """The same objective over full [B, T, V] float32 logits in keras.ops (what chunking avoids)."""
    logits = ops.einsum("bth,vh->btv", hidden, embedding)
    if softcap is not None:
        logits = softcap * ops.tanh(logits / softcap)
    logp = ops.log_softmax(logits, axis=-1)
    nll = -ops.squeeze(ops.take_along_axis(logp, ops.expand_dims(targets, -1), axis=-1), -1)
    return ops.sum(nll * mask) / num_targets


def test_hand_numbers():
    # one hidden unit, two tokens: logits [0, ln 3] -> log-softmax [-ln 4, ln 3 - ln 4]
    hidden = np.array([[[1.0], [1.0], [1.0]]], np.float32)
    embedding = np.array([[0.0], [math.log(3.0)]], np.float32)
    targets = np.array([[0, 1, 1]], np.int32)
    mask = np.array([[1.0, 1.0, 0.0]], np.float32)
    loss, correct = sft_loss(hidden, embedding, targets, mask, num_targets=4, chunk_size=2)
    # (ln 4 + ln 4/3) / 4 over the two trained tokens, divided by a global count of 4
    assert float(loss) == pytest.approx((math.log(4) + math.log(4 / 3)) / 4, rel=1e-6)
    assert float(correct) == 1.0  # argmax is token 1: right for the second token only


@pytest.mark.parametrize("softcap,chunk", [(None, 5), (None, 64), (3.0, 7)])
def test_matches_numpy(softcap, chunk):
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 9, 8)).astype(np.float32)
    embedding = rng.normal(size=(33, 8)).astype(np.float32)
    targets = rng.integers(0, 33, size=(2, 9)).astype(np.int32)
    mask = (rng.random((2, 9)) < 0.7).astype(np.float32)
    expected, expected_hits = numpy_loss(hidden, embedding, targets, mask, 20.0, softcap)
    loss, correct = sft_loss(hidden, embedding, targets, mask, 20.0, chunk_size=chunk,
                             final_logit_softcap=softcap)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(correct) == expected_hits


def test_empty_mask_is_zero_not_nan():
    hidden = np.ones((1, 4, 2), np.float32)
    loss, correct = sft_loss(hidden, np.ones((5, 2), np.float32), np.zeros((1, 4), np.int32),
                             np.zeros((1, 4), np.float32), num_targets=0, chunk_size=3)
    assert float(loss) == 0.0 and float(correct) == 0.0


@pytest.mark.parametrize("softcap", [None, 2.5])
def test_chunked_equals_plain_value_and_gradient(softcap, value_and_grads):
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(3, 11, 16)).astype(np.float32)
    embedding = (0.5 * rng.normal(size=(40, 16))).astype(np.float32)
    targets = rng.integers(0, 40, size=(3, 11)).astype(np.int32)
    mask = (rng.random((3, 11)) < 0.6).astype(np.float32)
    n = float(mask.sum())

    def chunked(h, e, t, m):
        return sft_loss(h, e, t, m, n, chunk_size=4, final_logit_softcap=softcap)[0]

    def plain(h, e, t, m):
        return plain_loss(h, e, t, m, n, softcap)

    value, (dh, de) = value_and_grads(chunked, hidden, embedding, targets, mask)
    ref_value, (ref_dh, ref_de) = value_and_grads(plain, hidden, embedding, targets, mask)
    assert abs(float(value) - float(ref_value)) <= 1e-6
    np.testing.assert_allclose(ops.convert_to_numpy(dh), ops.convert_to_numpy(ref_dh), atol=1e-6)
    np.testing.assert_allclose(ops.convert_to_numpy(de), ops.convert_to_numpy(ref_de), atol=1e-6)
    # and the gradient is not trivially zero: masked-out tokens get none, trained ones do
    dh = ops.convert_to_numpy(dh)
    assert np.abs(dh[mask == 0]).max() == 0.0 and np.abs(dh[mask == 1]).max() > 1e-4
