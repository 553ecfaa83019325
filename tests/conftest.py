"""Shared test set-up. The backend comes from KERAS_BACKEND (CI runs the suite once per backend)."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


import pytest  # noqa: E402 - after the environment above


@pytest.fixture(scope="module")
def tok():
    """The bundled tiny SentencePiece tokenizer."""
    from gemma_tune.tokenizer import load_tokenizer

    return load_tokenizer("data/tiny/tokenizer.model")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A `datasets` cache directory of the module's own."""
    return str(tmp_path_factory.mktemp("hf_cache"))


@pytest.fixture
def exact_float32_matmuls():
    """For comparisons of float32 arithmetic: GPUs multiply float32 in TF32 unless told not to."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        with jax.default_matmul_precision("highest"):
            yield
    elif backend == "torch":
        import torch

        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32 = before
    else:
        import tensorflow as tf

        before = tf.config.experimental.tensor_float_32_execution_enabled()
        tf.config.experimental.enable_tensor_float_32_execution(False)
        yield
        tf.config.experimental.enable_tensor_float_32_execution(before)


@pytest.fixture
def value_and_grads():
    """`value_and_grads(fn, *args)`: fn(*args) and its gradients with respect to the first two arguments, on
    the active backend."""
    import keras
    from keras import ops

    def compute(fn, *args):
        backend = keras.backend.backend()
        if backend == "jax":
            import jax

            return jax.value_and_grad(fn, argnums=(0, 1))(*args)
        if backend == "tensorflow":
            import tensorflow as tf

            x, w = tf.constant(args[0]), tf.constant(args[1])
            with tf.GradientTape() as tape:
                tape.watch([x, w])
                value = fn(x, w, *args[2:])
            return value, tape.gradient(value, [x, w])
        x = ops.convert_to_tensor(args[0]).requires_grad_()  # on Keras' device (a GPU if there is one)
        w = ops.convert_to_tensor(args[1]).requires_grad_()
        value = fn(x, w, *[ops.convert_to_tensor(a) for a in args[2:]])
        value.backward()
        return value, (x.grad, w.grad)

    return compute
