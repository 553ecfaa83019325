"""Shared test set-up. The backend comes from KERAS_BACKEND (CI runs the suite once per backend)."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Parallel workers share the cores: OpenMP threads (torch's) that spin while they wait take them from the
# other workers (the torch suite took 15.5 min on 2 cores with spinning threads, 7.7 min without). Set
# before any backend is imported; subprocesses and notebook kernels inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


import pytest  # noqa: E402 - after the environment above

# The suite runs on parallel workers (pytest-xdist, whole files per worker, in the order collected: pyproject's
# addopts, whose --no-loadscope-reorder stops xdist from putting files with many tests first). These files take
# the longest on some backend (minutes each; `--durations`): they start first so that no worker is left with one
# at the end while the others idle.
LONGEST_FIRST = ("test_readme.py", "test_readme_quickstarts.py", "test_torch_compile.py", "test_distribution.py",
                 "test_notebooks.py", "test_attention_chunks.py", "test_model.py", "test_grpo.py", "test_methods.py")

# README's command chains (a third to a half of each suite's time) run on JAX, the backend a user who follows README
# gets (tests/readme_steps.py), so in the JAX suite only; bench/readme_chains.py runs them, and the same checks, on
# TensorFlow and torch.
README_CHAINS = ("test_readme.py", "test_readme_quickstarts.py")
collect_ignore = [] if os.environ["KERAS_BACKEND"] == "jax" else list(README_CHAINS)


def pytest_collection_modifyitems(items):
    """Order the collected tests: the files of LONGEST_FIRST, in that order, then the rest as collected."""
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


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


def _tiny_vision_arch(family: str, **overrides):
    """A tiny vision Architecture: PaliGemma 1 ("gemma"), PaliGemma 2 ("gemma2", with a sliding window shorter
    than the prefix and soft-caps) or Gemma 3; 28-pixel images, image token 512 (the tiny tokenizer's size)."""
    from gemma_tune.models.config import Architecture

    fields = dict(family=family, vocab_size=520, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8,
                  vision=dict(image_size=28, patch_size=7, num_layers=1, hidden_size=16, num_heads=2,
                              intermediate_size=24, tokens_per_image=16 if family != "gemma3" else 4,
                              image_token_id=512))
    if family == "gemma2":
        fields.update(use_post_attention_norm=True, use_post_ffw_norm=True, sliding_window=6,
                      sliding_window_pattern=2, attn_logit_softcap=50.0, final_logit_softcap=30.0)
    if family == "gemma3":
        fields.update(use_post_attention_norm=True, use_post_ffw_norm=True, use_qk_norm=True, sliding_window=3,
                      sliding_window_pattern=2)
    fields.update(overrides)
    return Architecture(**fields)


@pytest.fixture(scope="session")
def tiny_vision_arch():
    """`tiny_vision_arch(family, **overrides)`: a tiny vision model's Architecture (see `_tiny_vision_arch`)."""
    return _tiny_vision_arch


def _edited_copy(path, dst, edit):
    """A copy of the single-file safetensors checkpoint `path` at `dst`, its tensors changed by `edit(tensors)`."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(path, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="session")
def edited_copy():
    """`edited_copy(path, dst, edit)`: a checkpoint copy with edited tensors (see `_edited_copy`)."""
    return _edited_copy
