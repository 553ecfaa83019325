"""Chunked per-sequence log-probabilities: a NumPy reference, transformers' log-probabilities of the
same tiny random Gemma 2 / Gemma 3 models, and equal gradients with several chunks and with one."""

import keras
import numpy as np
import pytest
import torch
import transformers
from keras import ops

from gemma_tune import load_model
from gemma_tune.methods.logps import sequence_logps


pytestmark = pytest.mark.usefixtures("exact_float32_matmuls")


def numpy_logps(hidden, embedding, targets, mask, softcap=None):
    """Reference: full logits in float64, log-softmax, per-row masked sums and counts."""
    logits = hidden.astype(np.float64) @ embedding.astype(np.float64).T
    if softcap is not None:
        logits = softcap * np.tanh(logits / softcap)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return (picked * mask).sum(-1), mask.sum(-1)


def ragged_mask(batch, length, seed):
    """Rows with a prompt (mask 0), a completion of varied length (mask 1) and padding (mask 0); the
    last row has no completion at all."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((batch, length), np.float32)
    for row in range(batch - 1):
        start = rng.integers(0, length // 2)
        mask[row, start:rng.integers(start + 1, length + 1)] = 1.0
    return mask


def random_inputs(batch, length, width, vocab, seed):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(batch, length, width)).astype(np.float32)
    embedding = (0.5 * rng.normal(size=(vocab, width))).astype(np.float32)
    targets = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
    return hidden, embedding, targets, ragged_mask(batch, length, seed)


@pytest.mark.parametrize("softcap,chunk_size", [(None, 8), (None, 1), (None, 1000), (3.0, 5), (3.0, 12)])
def test_matches_numpy(softcap, chunk_size):
    # B = 4, T = 9: chunks of 2, 1, 9 (all), 1 and 3 positions; 2 does not divide 9 (a padded tail)
    hidden, embedding, targets, mask = random_inputs(4, 9, 8, 33, seed=0)
    expected, expected_count = numpy_logps(hidden, embedding, targets, mask, softcap)
    logp_sum, count = sequence_logps(hidden, embedding, targets, mask, chunk_size=chunk_size,
                                     final_logit_softcap=softcap)
    logp_sum, count = ops.convert_to_numpy(logp_sum), ops.convert_to_numpy(count)
    assert logp_sum.dtype == np.float32 and count.dtype == np.float32 and logp_sum.shape == (4,)
    np.testing.assert_allclose(logp_sum, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(count, expected_count)
    assert expected[3] == 0.0 and count[3] == 0.0 and np.all(expected[:3] < -1.0)  # not vacuous


def test_bfloat16_hidden_states_give_float32_logps():
    hidden, embedding, targets, mask = random_inputs(2, 6, 8, 17, seed=1)
    expected, _ = numpy_logps(hidden, embedding, targets, mask)
    logp_sum, _ = sequence_logps(ops.cast(hidden, "bfloat16"), embedding, targets, mask, chunk_size=4)
    assert ops.convert_to_numpy(logp_sum).dtype == np.float32
    np.testing.assert_allclose(ops.convert_to_numpy(logp_sum), expected, rtol=0.05)  # bfloat16 rounding only


def test_dynamic_shapes_are_refused():
    with pytest.raises(ValueError, match="static shapes"):
        sequence_logps(keras.KerasTensor((None, 4, 8)), np.ones((5, 8), np.float32),
                       np.zeros((2, 4), np.int32), np.ones((2, 4), np.float32))


VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, max_position_embeddings=64, sliding_window=8)
CONFIGS = {
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                                                final_logit_softcapping=3.0),
    "gemma3": lambda: transformers.Gemma3TextConfig(**COMMON, sliding_window_pattern=2, query_pre_attn_scalar=16),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def models(request, tmp_path_factory):
    """(transformers model, the same random weights loaded by gemma_tune) through save_pretrained."""
    torch.manual_seed(3)
    config = CONFIGS[request.param]()
    config._attn_implementation = "eager"
    reference = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # every parameter random, norms included
        for p in reference.parameters():
            p.normal_(0.0, 0.3 if p.ndim == 1 else 0.08)
    path = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(path)
    return reference, load_model(path)


def test_sequence_logps_match_transformers(models):
    """Prompt + completion + right padding; the completion's summed next-token log-probabilities."""
    reference, ours = models
    batch, length = 3, 14
    rng = np.random.default_rng(4)
    ids = rng.integers(3, VOCAB, (batch, length)).astype(np.int32)
    real = np.zeros((batch, length), np.int32)
    completion = np.zeros((batch, length), np.float32)
    for row, (prompt, answer) in enumerate([(4, 10), (3, 5), (6, 2)]):
        real[row, :prompt + answer] = 1
        completion[row, prompt:prompt + answer] = 1.0
    ids = ids * real

    with torch.no_grad():
        logits = reference(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(real)).logits
        token_logps = torch.log_softmax(logits[:, :-1].double(), -1).gather(
            -1, torch.tensor(ids[:, 1:], dtype=torch.long)[..., None])[..., 0].numpy()
    expected = (token_logps * completion[:, 1:]).sum(-1)

    # the trainer's inputs: next-token targets, the mask moved onto the predicting positions
    targets = np.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    loss_mask = np.zeros_like(completion)
    loss_mask[:, :-1] = completion[:, 1:]
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape) * real
    hidden = ours({"token_ids": ids, "segment_ids": real, "positions": positions}, return_hidden_states=True)
    logp_sum, count = sequence_logps(hidden, ours.token_embedding.embeddings, targets, loss_mask, chunk_size=8,
                                     final_logit_softcap=ours.architecture.final_logit_softcap)
    np.testing.assert_array_equal(ops.convert_to_numpy(count), [10, 5, 2])
    assert np.all(expected < -2.0)  # far from zero: the comparison is not vacuous
    assert np.abs(ops.convert_to_numpy(logp_sum) - expected).max() <= 1e-4


@pytest.mark.parametrize("softcap", [None, 2.5])
def test_chunked_gradient_equals_one_chunk(softcap, value_and_grads):
    hidden, embedding, targets, mask = random_inputs(3, 11, 16, 40, seed=2)
    weights = np.array([0.7, -1.3, 2.0], np.float32)  # a different weight per row: rows stay apart

    def objective(chunk_size, remat):
        def fn(h, e, t, m):
            logp_sum, _ = sequence_logps(h, e, t, m, chunk_size=chunk_size, final_logit_softcap=softcap, remat=remat)
            return ops.sum(ops.multiply(logp_sum, weights))
        return fn

    # 6 tokens per chunk = 2 positions per row: 6 chunks (a padded tail), rematerialised or not
    value, (dh, de) = value_and_grads(objective(6, True), hidden, embedding, targets, mask)
    plain_value, (plain_dh, plain_de) = value_and_grads(objective(6, False), hidden, embedding, targets, mask)
    one_value, (one_dh, one_de) = value_and_grads(objective(1000, True), hidden, embedding, targets, mask)
    dh, de = ops.convert_to_numpy(dh), ops.convert_to_numpy(de)
    for v, h, e in [(one_value, one_dh, one_de), (plain_value, plain_dh, plain_de)]:
        assert abs(float(value) - float(v)) <= 1e-5
        np.testing.assert_allclose(dh, ops.convert_to_numpy(h), atol=1e-6)
        np.testing.assert_allclose(de, ops.convert_to_numpy(e), atol=1e-6)
    # masked positions get no gradient, counted ones do
    assert np.abs(dh[mask == 0]).max() == 0.0 and np.abs(dh[mask == 1]).max() > 1e-3


@pytest.mark.parametrize("softcap,chunk_size,temperature", [(None, 8, 1.0), (None, 5, 0.7), (3.0, 12, 1.3)])
def test_token_logps_and_entropy_match_numpy(softcap, chunk_size, temperature):
    from gemma_tune.methods.logps import token_logps

    hidden, embedding, targets, mask = random_inputs(4, 9, 6, 13, seed=3)
    logits = hidden.astype(np.float64) @ embedding.astype(np.float64).T
    if softcap is not None:
        logits = softcap * np.tanh(logits / softcap)
    logits = logits / temperature
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    entropy = -(np.exp(log_probs) * log_probs).sum(-1)
    logp, ent = token_logps(ops.convert_to_tensor(hidden), ops.convert_to_tensor(embedding),
                            ops.convert_to_tensor(targets), chunk_size=chunk_size, final_logit_softcap=softcap,
                            temperature=temperature)
    np.testing.assert_allclose(ops.convert_to_numpy(logp), expected, atol=1e-5)
    np.testing.assert_allclose(ops.convert_to_numpy(ent), entropy, atol=1e-5)
    if temperature == 1.0:  # summed over the mask, they are sequence_logps
        summed, _ = sequence_logps(ops.convert_to_tensor(hidden), ops.convert_to_tensor(embedding),
                                   ops.convert_to_tensor(targets), ops.convert_to_tensor(mask), chunk_size=chunk_size,
                                   final_logit_softcap=softcap)
        np.testing.assert_allclose((ops.convert_to_numpy(logp) * mask).sum(-1), ops.convert_to_numpy(summed), atol=1e-5)


def test_target_logits_are_the_gathered_entries_and_their_gradient_the_one_hot(value_and_grads):
    """`target_logits` (a select summed over the vocabulary on TensorFlow, a gather on JAX and torch) gives
    z[..., y] bit for bit, and its gradient is exactly the one-hot mask of the targets, with the weights of the
    objective — as NumPy's gather and its scatter, on every backend."""
    from gemma_tune.methods.logps import target_logits

    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 30.0, (2, 5, 37)).astype(np.float32)
    logits[0, 0, 3] = -0.0  # a zero target logit and others of every size
    targets = rng.integers(0, 37, (2, 5)).astype(np.int32)
    targets[0, 0], targets[1, -1] = 3, 36  # the first and the last ids among them
    weights = rng.normal(size=(2, 5)).astype(np.float32)
    expected = np.take_along_axis(logits, targets[..., None], -1)[..., 0]

    def objective(z, w, t):
        return ops.sum(target_logits(z, t) * w)

    value, (dz, dw) = value_and_grads(objective, logits, weights, targets)
    np.testing.assert_array_equal(ops.convert_to_numpy(target_logits(ops.convert_to_tensor(logits),
                                                                     ops.convert_to_tensor(targets))), expected)
    one_hot = np.zeros_like(logits)
    np.put_along_axis(one_hot, targets[..., None], weights[..., None], -1)
    np.testing.assert_array_equal(ops.convert_to_numpy(dz), one_hot)
    np.testing.assert_array_equal(ops.convert_to_numpy(dw), expected)
    assert float(value) == pytest.approx(float((expected * weights).sum()), rel=1e-6)
