"""A quantised projection's base (`gemma_tune.models.quantized`, QLoRA's int8 and per-channel int4): the numbers
Keras' own quantised call computes, against NumPy on the same integers, with the same straight-through gradient,
LoRA dropout acting on it while training, and, on torch, one compiled graph with the eager values and gradients."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
from keras import ops

from gemma_tune.models.projection import Projection

BACKEND = os.environ.get("KERAS_BACKEND", "jax")


def quantised_projection(mode: str, dropout: float = 0.0) -> Projection:
    """A 16 → 12 projection of random weights, quantised as `quantize_base` does, with rank-4 adapters (B ones)."""
    from keras.quantizers import Int4QuantizationConfig

    layer = Projection(12, name="proj")
    layer.build((None, None, 16))
    layer.kernel.assign(np.random.default_rng(0).normal(size=(16, 12)).astype("float32"))
    layer.quantize(mode, type_check=False, config=Int4QuantizationConfig(block_size=-1) if mode == "int4" else None)
    layer.enable_lora(4, 8.0, dropout=dropout, b_initializer="ones")
    return layer


def numpy_base(layer, x: np.ndarray, mode: str) -> np.ndarray:
    """y = (q(x)·K) / (s·s_x) for int8 (q(x) = clip(round(x·s_x), ±127), s_x = 127 / (max|x| + ε)); x·K / s for
    int4; in NumPy, with K and s read from the layer."""
    from keras.quantizers import unpack_int4

    kernel = layer._kernel if mode == "int8" else unpack_int4(layer._kernel, 12, axis=-1)
    kernel = np.asarray(ops.convert_to_numpy(kernel), np.int64)
    scale = np.asarray(ops.convert_to_numpy(layer.kernel_scale), np.float32)
    if mode == "int4":
        return (x.astype(np.float64) @ kernel / scale).astype(np.float32)
    rows = np.float32(127.0) / (np.abs(x).max(axis=-1, keepdims=True) + np.float32(keras.config.epsilon()))
    quantised = np.clip(np.round(x * rows), -127, 127).astype(np.int64)
    return ((quantised @ kernel).astype(np.float32) / (scale * rows)).astype(np.float32)


def adapters(layer, x: np.ndarray) -> np.ndarray:
    a, b = (ops.convert_to_numpy(v) for v in (layer.lora_kernel_a, layer.lora_kernel_b))
    return (layer.lora_alpha / layer.lora_rank) * (x @ a @ b)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_base_is_keras_quantised_call_and_numpy(mode):
    layer = quantised_projection(mode)
    x = np.random.default_rng(1).normal(size=(2, 5, 16)).astype("float32")
    ours = ops.convert_to_numpy(layer(x))
    np.testing.assert_array_equal(ours, ops.convert_to_numpy(keras.layers.Dense.quantized_call(layer, x)))
    np.testing.assert_allclose(ours, numpy_base(layer, x, mode) + adapters(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_input_gradient_is_keras_straight_through_one(mode, value_and_grads):
    """∂L/∂x = upstream · K̂ᵀ with K̂ = K / s (the activation quantiser passes the gradient through), as Keras'
    custom gradient gives it, plus the adapters' (α/r)·upstream·(A·B)ᵀ."""
    from gemma_tune.models.adapters import float_kernel

    layer = quantised_projection(mode)
    x = np.random.default_rng(1).normal(size=(2, 5, 16)).astype("float32")
    upstream = np.random.default_rng(2).normal(size=(12,)).astype("float32")

    def loss(call):
        return lambda inputs, weights: ops.sum(call(inputs) * weights)

    _, (ours, _) = value_and_grads(loss(layer), x, upstream)
    _, (theirs, _) = value_and_grads(loss(lambda inputs: keras.layers.Dense.quantized_call(layer, inputs)), x,
                                     upstream)
    np.testing.assert_allclose(ops.convert_to_numpy(ours), ops.convert_to_numpy(theirs), rtol=1e-6, atol=1e-6)
    expected = upstream @ float_kernel(layer, merge_lora=True).T  # K / s + (α/r)·A·B
    np.testing.assert_allclose(ops.convert_to_numpy(ours), np.broadcast_to(expected, x.shape), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_lora_dropout_acts_on_a_quantised_base_in_training_only(mode):
    """Keras' `Layer.__call__` calls a quantised layer's `quantized_call`, never `call`: the dropout is applied
    there too (it once was not)."""
    layer = quantised_projection(mode, dropout=0.5)
    x = np.random.default_rng(1).normal(size=(2, 5, 16)).astype("float32")
    inference = ops.convert_to_numpy(layer(x))
    np.testing.assert_array_equal(ops.convert_to_numpy(layer(x, training=False)), inference)
    np.testing.assert_allclose(inference, numpy_base(layer, x, mode) + adapters(layer, x), rtol=1e-5, atol=1e-5)
    trained = ops.convert_to_numpy(layer(x, training=True))
    assert np.abs(trained - inference).max() > 1e-3  # the adapters saw dropout(x)


def test_lora_on_a_quantisation_qlora_does_not_train_is_an_error():
    from keras.quantizers import Int4QuantizationConfig

    layer = Projection(12, name="proj")
    layer.build((None, None, 16))
    layer.quantize("int4", type_check=False, config=Int4QuantizationConfig(block_size=8))  # sub-channel
    x = np.ones((1, 2, 16), "float32")
    assert ops.convert_to_numpy(layer(x)).shape == (1, 2, 12)  # Keras' own call
    layer.enable_lora(4, 8.0)
    with pytest.raises(ValueError, match="per-channel int4 base"):
        layer(x)


if BACKEND == "torch":
    import torch

    @pytest.mark.parametrize("mode", ["int8", "int4"])
    def test_the_compiled_base_is_one_graph_with_the_eager_values_and_gradients(mode):
        layer = quantised_projection(mode)
        x = np.random.default_rng(1).normal(size=(2, 5, 16)).astype("float32")

        def step(inputs):
            outputs = layer(inputs)
            return outputs, torch.autograd.grad(outputs.square().sum(), inputs)[0]

        eager = step(torch.tensor(x, requires_grad=True))
        explained = torch._dynamo.explain(lambda inputs: layer(inputs))(torch.tensor(x))
        assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
        compiled_layer = torch.compile(lambda inputs: layer(inputs), fullgraph=True)
        inputs = torch.tensor(x, requires_grad=True)
        outputs = compiled_layer(inputs)
        compiled = outputs, torch.autograd.grad(outputs.square().sum(), inputs)[0]
        for got, want in zip(compiled, eager):
            np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=1e-5, atol=1e-5)
