"""Initial weights drawn on the host (gemma_tune.models.init): the same seed gives the same model on every
backend, each weight its own values, and loaders build without drawing.

CI runs this file once per backend: each pass recomputes the expected values with NumPy alone, from the
seed sequence the module documents, so the three backends are checked against one reference."""

from __future__ import annotations

import random

import numpy as np
import pytest
from keras import ops

from gemma_tune.config.presets import preset_architecture
from gemma_tune.models import build_model, enable_lora, get_variable
from gemma_tune.models.init import HostNormal, HostUniform, no_initial_draws, seed_initialisers


def _tiny():
    return preset_architecture("gemma3_tiny")


def test_embedding_is_the_numpy_draw_of_its_documented_seed():
    """The first initializer made after seed_initialisers(s) takes the seed Random(s).randint(1, 1e9) and
    draws default_rng([seed, 0]).standard_normal · stddev: on every backend, bit for bit."""
    arch = _tiny()
    seed_initialisers(3)
    model = build_model(arch)
    expected_seed = random.Random(3).randint(1, 10 ** 9)
    expected = (np.random.default_rng([expected_seed, 0]).standard_normal((arch.vocab_size, arch.hidden_size),
                                                                          dtype=np.float32)
                * np.float32(arch.hidden_size ** -0.5))
    np.testing.assert_array_equal(ops.convert_to_numpy(model.token_embedding.embeddings), expected)


def test_same_seed_same_model_other_seed_other_model():
    arch = _tiny()
    seed_initialisers(0)
    first = [ops.convert_to_numpy(v) for v in build_model(arch).weights]
    seed_initialisers(0)
    again = [ops.convert_to_numpy(v) for v in build_model(arch).weights]
    seed_initialisers(1)
    other = [ops.convert_to_numpy(v) for v in build_model(arch).weights]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    drawn = [i for i, w in enumerate(first) if np.any(w)]  # norms start at zero scale
    assert drawn and not any(np.array_equal(first[i], other[i]) for i in drawn)


def test_weights_sharing_an_initializer_get_their_own_values():
    """k/v (the same shape) and gate/up share an initializer in each block; a Keras RandomNormal with an int
    seed would give them identical kernels."""
    seed_initialisers(0)
    model = build_model(_tiny())
    for a, b in (("attention.k_proj", "attention.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
        ka = ops.convert_to_numpy(get_variable(model, f"blocks.0.{a}.kernel"))
        kb = ops.convert_to_numpy(get_variable(model, f"blocks.0.{b}.kernel"))
        assert ka.shape == kb.shape and not np.array_equal(ka, kb)
        assert abs(float(ka.std()) - 0.02) < 0.004


def test_lora_a_is_he_uniform_drawn_on_the_host_and_b_zero():
    arch = _tiny()
    seed_initialisers(0)
    model = build_model(arch)
    enable_lora(model, rank=4, alpha=8.0, targets=["q"])
    a = ops.convert_to_numpy(get_variable(model, "blocks.0.attention.q_proj.lora_kernel_a"))
    b = ops.convert_to_numpy(get_variable(model, "blocks.0.attention.q_proj.lora_kernel_b"))
    limit = np.sqrt(6.0 / arch.hidden_size)
    assert a.shape == (arch.hidden_size, 4) and np.abs(a).max() <= limit and np.abs(a).max() > 0.5 * limit
    assert not np.any(b)
    seed_initialisers(0)
    again = build_model(arch)
    enable_lora(again, rank=4, alpha=8.0, targets=["q"])
    np.testing.assert_array_equal(ops.convert_to_numpy(get_variable(again, "blocks.0.attention.q_proj.lora_kernel_a")), a)


def test_loaders_build_without_drawing():
    model = build_model(_tiny(), random_init=False)
    assert not any(np.any(ops.convert_to_numpy(v)) for v in model.weights)
    with no_initial_draws():
        assert not np.any(ops.convert_to_numpy(HostNormal(1.0)((3, 2))))
    assert np.any(ops.convert_to_numpy(HostNormal(1.0)((3, 2))))


@pytest.mark.parametrize("fans, shape, limit", [("in", (8, 4), np.sqrt(6 / 8)),
                                                ("in+out", (8, 4), np.sqrt(6 / 12)),
                                                ("in+out", (2, 2, 3, 5), np.sqrt(6 / (4 * 3 + 4 * 5)))])
def test_uniform_limits_follow_the_fans(fans, shape, limit):
    values = ops.convert_to_numpy(HostUniform(fans=fans, seed=5)(shape))
    expected = np.random.default_rng([5, 0]).uniform(-limit, limit, shape).astype(np.float32)
    np.testing.assert_array_equal(values, expected)


def test_uniform_needs_fans_or_a_limit():
    with pytest.raises(ValueError, match="fans"):
        HostUniform()
    with pytest.raises(ValueError, match="fans"):
        HostUniform(fans="in", limit=0.1)
