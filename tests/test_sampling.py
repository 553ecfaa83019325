"""The on-device sampler: greedy decoding and stored log-probabilities against full forward passes, current
weights, stop ids and the early end of the loop, the sampling rule on hand numbers and its distribution,
seeds, and compilation once per shape."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from gemma_tune.config.presets import preset_architecture
from gemma_tune.models import build_model
from gemma_tune import sampling
from gemma_tune.sampling import next_tokens, sample

PROMPTS = [[2] + list(range(20, 33)), [2, 7, 8], [2, 100, 101, 102, 103]]  # 14 + N > the sliding window of 8


def tiny_model():
    """A random 3-layer Gemma 3 (2 sliding layers, window 8), default init: a spread next-token distribution."""
    keras.utils.set_random_seed(0)
    return build_model(preset_architecture("gemma3_tiny", num_layers=3, sliding_window_pattern=3, sliding_window=8))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def full_pass(model, prompts, samples, temperature: float):
    """(log softmax(z / τ)[token], argmax z, rank: how many logits exceed the token's) [B, N] at every produced
    token (0, -1, -1 after a row's end), from one forward pass without a cache over each row's prompt + completion
    (right-padded to one width)."""
    seqs = [list(p) + samples.tokens[b, :samples.lengths[b]].tolist() for b, p in enumerate(prompts)]
    width = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), width), "int32")
    mask = np.zeros((len(seqs), width), "int32")
    for b, s in enumerate(seqs):
        ids[b, :len(s)], mask[b, :len(s)] = s, 1
    z = ops.convert_to_numpy(model({"token_ids": ids, "padding_mask": mask})).astype(np.float64)
    logps = np.zeros(samples.tokens.shape)
    argmax = np.full(samples.tokens.shape, -1)
    rank = np.full(samples.tokens.shape, -1)
    for b, p in enumerate(prompts):
        for i in range(samples.lengths[b]):
            row = z[b, len(p) + i - 1] / (temperature or 1.0)
            row = row - row.max()
            logps[b, i] = row[samples.tokens[b, i]] - np.log(np.exp(row).sum())
            argmax[b, i] = row.argmax()
            rank[b, i] = (row > row[samples.tokens[b, i]]).sum()
    return logps, argmax, rank


def test_greedy_is_the_argmax_of_a_full_forward_pass(model):
    steps = 10
    s = sample(model, PROMPTS, max_new_tokens=steps)
    assert s.tokens.shape == (3, steps) and s.tokens.dtype == np.int32 and s.logps.dtype == np.float32
    assert s.lengths.tolist() == [steps] * 3 and not s.stopped.any()
    logps, argmax, _ = full_pass(model, PROMPTS, s, 0.0)
    np.testing.assert_array_equal(s.tokens, argmax)
    np.testing.assert_allclose(s.logps, logps, atol=1e-5)  # τ = 1 when greedy


def test_sampled_logps_are_the_full_softmax_at_the_temperature(model, exact_float32_matmuls):
    temperature, top_k, top_p, steps = 0.7, 40, 0.9, 12
    s = sample(model, PROMPTS, max_new_tokens=steps, temperature=temperature, top_k=top_k, top_p=top_p, seed=4)
    logps, argmax, rank = full_pass(model, PROMPTS, s, temperature)
    assert np.abs(s.logps - logps).max() <= 1e-5
    assert (s.tokens != argmax).sum() >= 3  # really sampled, not the argmax
    assert (rank >= 0).all() and (rank < top_k).all()  # inside the top-k of the full pass's distribution
    assert (s.logps < 0).all()


def test_samples_come_from_the_current_weights(exact_float32_matmuls):
    model = tiny_model()
    settings = dict(max_new_tokens=6, temperature=1.0, seed=7)
    before = sample(model, PROMPTS, **settings)
    scale = model.final_norm.scale
    scale.assign(np.random.default_rng(0).normal(0.0, 1.0, scale.shape).astype("float32"))
    after = sample(model, PROMPTS, **settings)
    assert np.abs(after.logps - before.logps).max() > 1e-2
    logps, _, _ = full_pass(model, PROMPTS, after, 1.0)
    assert np.abs(after.logps - logps).max() <= 1e-5


class Counting:
    """Wraps `model.call_with_cache`: `traces` counts its Python calls (tracings under JAX and TensorFlow; on
    PyTorch the eager prefill of a call of new shapes, and the traces of the prefill and the decoding step per
    shape), `runs` its executions on the device (a callback in JAX's compiled loop, a resource variable in
    TensorFlow's XLA one; on PyTorch the prefill's and the step's calls, eager or traced, counted around
    `sampling._torch_graph`)."""

    def __init__(self, model, monkeypatch):
        self.traces, self._runs = 0, 0
        self.backend = keras.backend.backend()
        original = model.call_with_cache
        if self.backend == "tensorflow":
            import tensorflow as tf

            self._variable = tf.Variable(0)
        if self.backend == "torch":
            monkeypatch.setattr(sampling, "_torch_graph", self._counting_graph(sampling._torch_graph))

        def counted(*args):
            self.traces += 1
            logits, cache = original(*args)
            if self.backend == "jax":
                import jax

                jax.debug.callback(self._ran, logits[0, 0, 0])
            elif self.backend == "tensorflow":
                self._variable.assign_add(1)
            return logits, cache

        monkeypatch.setattr(model, "call_with_cache", counted)

    def _ran(self, *_):
        self._runs += 1

    def _counting_graph(self, torch_graph):
        def counting(*args, **kwargs):
            for_call = torch_graph(*args, **kwargs)

            def counted_for_call():
                run = for_call()

                def counted_run(*call_args):
                    self._ran()
                    return run(*call_args)

                return counted_run

            return counted_for_call

        return counting

    @property
    def runs(self) -> int:
        return int(self._variable.numpy()) if self.backend == "tensorflow" else self._runs

    def reset_runs(self):
        if self.backend == "tensorflow":
            self._variable.assign(0)
        self._runs = 0


def test_stop_ids_end_rows_and_the_loop(monkeypatch):
    model = tiny_model()
    counter = Counting(model, monkeypatch)
    steps = 8
    greedy = sample(model, PROMPTS, max_new_tokens=steps, pad_id=3)
    assert counter.runs == steps  # the prefill, then one step per token after the first
    stop = int(greedy.tokens[0, 2])
    at = greedy.tokens[0].tolist().index(stop)
    assert stop not in greedy.tokens[1] and stop not in greedy.tokens[2]
    s = sample(model, PROMPTS, max_new_tokens=steps, stop_ids=[stop, 9999], pad_id=3)
    assert s.tokens[0, :at + 1].tolist() == greedy.tokens[0, :at + 1].tolist()  # the stop id included
    assert (s.tokens[0, at + 1:] == 3).all() and (s.logps[0, at + 1:] == 0).all()
    np.testing.assert_allclose(s.logps[0, :at + 1], greedy.logps[0, :at + 1], atol=1e-6)
    assert s.lengths.tolist() == [at + 1, steps, steps] and s.stopped.tolist() == [True, False, False]
    np.testing.assert_array_equal(s.tokens[1:], greedy.tokens[1:])
    # every row stops at its first token: the loop ends after the prefill
    counter.reset_runs()
    everything = list(range(model.architecture.vocab_size))
    s = sample(model, PROMPTS, max_new_tokens=steps, stop_ids=everything, pad_id=3)
    assert counter.runs == 1
    assert s.lengths.tolist() == [1, 1, 1] and s.stopped.all()
    assert s.tokens[:, 0].tolist() == greedy.tokens[:, 0].tolist() and (s.tokens[:, 1:] == 3).all()
    # each row stops by its third token: the prefill and a step per token of the longest row after its first
    counter.reset_runs()
    s = sample(model, PROMPTS, max_new_tokens=steps, stop_ids=greedy.tokens[:, 2].tolist())
    assert s.stopped.all() and (s.lengths <= 3).all() and counter.runs == s.lengths.max()


def test_repeated_calls_compile_nothing(monkeypatch):
    model = tiny_model()
    counter = Counting(model, monkeypatch)
    sample(model, PROMPTS, max_new_tokens=5, temperature=0.8, seed=1)
    traced = counter.traces
    sample(model, PROMPTS, max_new_tokens=5, temperature=0.8, seed=2, stop_ids=[5, 6])
    # the prefill and the loop's step, traced once; torch runs a new shape's first prefill eagerly, then traces it
    prefill_traced_late = int(keras.backend.backend() == "torch")
    assert traced == 2 and counter.traces == 2 + prefill_traced_late
    sample(model, PROMPTS, max_new_tokens=6, temperature=0.8)  # a new shape traces again
    assert counter.traces == 4 + prefill_traced_late
    for seed in (3, 4):  # torch: the new shape's prefill traced at its second call, then nothing
        sample(model, PROMPTS, max_new_tokens=6, temperature=0.8, seed=seed)
    assert counter.traces == 4 + 2 * prefill_traced_late


def test_the_rule_on_hand_numbers():
    """probabilities [0.1, 0.5, 0.15, 0.25]; the inverse CDF at chosen uniforms (away from the boundaries)."""
    probs = np.array([0.1, 0.5, 0.15, 0.25])
    u = np.array([0.05, 0.3, 0.7, 0.9, 1.0], "float32")
    logits = np.tile(np.log(probs), (len(u), 1)).astype("float32")

    def tokens(*rule):
        return ops.convert_to_numpy(next_tokens(logits, u, *rule)[0]).tolist()

    assert tokens(0.0) == [1] * 5                       # greedy
    assert tokens(1.0) == [0, 1, 2, 3, 3]               # index order: cdf 0.1, 0.6, 0.75, 1
    assert tokens(1.0, 1) == [1] * 5                    # top-k 1 is greedy
    assert tokens(1.0, 3) == [1, 1, 3, 2, 2]            # sorted 0.5, 0.25, 0.15 (cdf /0.9: 0.56, 0.83, 1)
    assert tokens(1.0, None, 0.4) == [1] * 5            # 0.5 alone reaches 0.4
    assert tokens(1.0, None, 0.7) == [1, 1, 3, 3, 3]    # 0.5 + 0.25 reach 0.7 (cdf /0.75: 0.67, 1)
    assert tokens(1.0, 4, 1.0) == [0, 1, 2, 3, 3]       # top-k of the whole vocabulary, top-p 1: no filter
    logps = ops.convert_to_numpy(next_tokens(logits, u, 1.0, None, 0.4)[1])
    np.testing.assert_allclose(logps, np.log(0.5), atol=1e-6)  # the full softmax, not the renormalised one
    assert tokens(0.5) == [1, 1, 1, 3, 3]               # softmax(z / 0.5) ∝ p²: cdf 0.03, 0.75, 0.82, 1
    halved = ops.convert_to_numpy(next_tokens(logits, u, 0.5)[1])
    expected = 2 * np.log(probs) - np.log((probs ** 2).sum())  # log softmax(z / 0.5)
    np.testing.assert_allclose(halved, expected[[1, 1, 1, 3, 3]], atol=1e-5)


def filtered(z, temperature, top_k, top_p):
    """softmax(z / τ) restricted to the top_k largest, then to the smallest top_p nucleus, renormalised."""
    p = np.exp((z - z.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(len(p), bool)
    keep[order[:top_k or len(p)]] = True
    if top_p is not None:
        q = np.where(keep, p, 0.0) / p[keep].sum()
        before = np.cumsum(q[order]) - q[order]
        keep[order[before >= top_p]] = False
    p = np.where(keep, p, 0.0)
    return p / p.sum()


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, None, None), (1.3, 3, None), (0.8, None, 0.8),
                                                       (1.0, 4, 0.7)])
def test_sampling_distribution(temperature, top_k, top_p):
    z = np.array([1.0, 2.5, 0.3, 2.0, -1.0, 1.8], "float32")
    draws = 20_000
    u = (1.0 - np.random.default_rng(0).random(draws)).astype("float32")
    tokens, logps = next_tokens(np.tile(z, (draws, 1)), u, temperature, top_k, top_p)
    counts = np.bincount(ops.convert_to_numpy(tokens), minlength=len(z))
    expected = filtered(z.astype(np.float64), temperature, top_k, top_p)
    assert (counts[expected == 0] == 0).all()
    np.testing.assert_allclose(counts / draws, expected, atol=0.015)
    full = np.exp(z / temperature) / np.exp(z / temperature).sum()
    np.testing.assert_allclose(ops.convert_to_numpy(logps), np.log(full)[ops.convert_to_numpy(tokens)], atol=1e-5)


def test_top_k_one_is_greedy(model):
    z = np.random.default_rng(1).normal(size=(64, 50)).astype("float32")
    u = (1.0 - np.random.default_rng(2).random(64)).astype("float32")
    np.testing.assert_array_equal(ops.convert_to_numpy(next_tokens(z, u, 0.9, 1)[0]), z.argmax(-1))
    greedy = sample(model, PROMPTS, max_new_tokens=6)
    assert (sample(model, PROMPTS, max_new_tokens=6, temperature=0.9, top_k=1, seed=3).tokens == greedy.tokens).all()


def test_seeds(model):
    settings = dict(max_new_tokens=8, temperature=1.0, top_p=0.95)
    a = sample(model, PROMPTS, seed=[11, 0], **settings)
    again = sample(model, PROMPTS, seed=[11, 0], **settings)
    np.testing.assert_array_equal(a.tokens, again.tokens)
    np.testing.assert_array_equal(a.logps, again.logps)
    assert (sample(model, PROMPTS, seed=[11, 1], **settings).tokens != a.tokens).any()
    assert (sample(model, PROMPTS, seed=12, **settings).tokens != a.tokens).any()


def test_arguments_are_checked(model):
    for bad in (dict(max_new_tokens=0), dict(max_new_tokens=2, temperature=-1.0), dict(max_new_tokens=2, top_k=0),
                dict(max_new_tokens=2, top_p=0.0), dict(max_new_tokens=2, top_p=1.5)):
        with pytest.raises(ValueError):
            sample(model, PROMPTS, **bad)
    with pytest.raises(ValueError, match="at least one token"):
        sample(model, [[2], []], max_new_tokens=2)


@pytest.mark.parametrize("start,length", [(0, 5), (3, 1), (6, 2)])
def test_a_step_is_written_at_its_slots_as_numpy_assigns_it(start, length):
    from gemma_tune.models.cache import write_slots

    rng = np.random.default_rng(start)
    cache = rng.normal(size=(2, 8, 1, 4)).astype("float32")
    update = rng.normal(size=(2, length, 1, 4)).astype("float32")
    expected = cache.copy()
    expected[:, start:start + length] = update
    written = write_slots(ops.convert_to_tensor(cache), ops.convert_to_tensor(update),
                          ops.convert_to_tensor(start, "int32"))
    np.testing.assert_array_equal(ops.convert_to_numpy(written), expected)


def test_prompt_slots_pad_prompts_without_changing_a_sample(model):
    settings = dict(max_new_tokens=6, temperature=0.9, seed=5)
    plain = sample(model, PROMPTS, **settings)
    padded = sample(model, PROMPTS, prompt_slots=20, **settings)  # the longest prompt has 14 tokens
    np.testing.assert_array_equal(padded.tokens, plain.tokens)
    np.testing.assert_allclose(padded.logps, plain.logps, atol=1e-5)
