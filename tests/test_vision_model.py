"""The vision models' own mechanics: attention structure, the image merge, the cuDNN guard, the hook.

Parity with transformers and keras-hub is in test_parity_vision_*.py; these tests pin each piece against
NumPy on hand-made inputs."""

import numpy as np
import pytest
from keras import ops

from gemma_tune.checkpoints.hf_names import name_map
from gemma_tune.models import build_model, get_variable
from gemma_tune.models.attention import attend, attention_mask, attention_structure
from gemma_tune.models.vision import attention_blocks, merge_images

IMAGE = 512  # the tiny vision models' image token (conftest.tiny_vision_arch)



def reference_mask(segments, blocks, window, window_bounds_blocks):
    """The allowed pairs, one at a time."""
    batch, length = segments.shape
    out = np.zeros((batch, length, length), bool)
    for b in range(batch):
        for i in range(length):
            for j in range(length):
                causal = j <= i
                block = blocks[b, i] != 0 and blocks[b, i] == blocks[b, j]
                inside = window is None or i - j < window
                order = ((causal or block) and inside) if window_bounds_blocks else ((causal and inside) or block)
                allowed = segments[b, i] == segments[b, j] != 0 and order
                out[b, i, j] = allowed or (segments[b, i] == 0 and i == j)
    return out


@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("bounded", [True, False])
def test_attention_mask_with_blocks_matches_the_rule(window, bounded):
    segments = np.array([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 2, 2, 2, 2]], np.int32)
    blocks = np.array([[1, 1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 2, 2, 0]], np.int32)
    index = np.arange(7, dtype=np.int32)
    got = ops.convert_to_numpy(attention_mask(index, index, segments, segments, window, blocks, blocks,
                                              window_bounds_blocks=bounded))
    np.testing.assert_array_equal(got, reference_mask(segments, blocks, window, bounded))


def test_attention_blocks_prefix_and_images():
    ids = np.array([[IMAGE, IMAGE, 2, 7, 8, 9], [3, IMAGE, IMAGE, 4, IMAGE, IMAGE]], np.int32)
    np.testing.assert_array_equal(ops.convert_to_numpy(attention_blocks(ids, IMAGE)),
                                  [[1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 2, 2]])
    prefix = np.array([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], np.int32)
    np.testing.assert_array_equal(ops.convert_to_numpy(attention_blocks(ids, IMAGE, prefix)), prefix)


def test_merge_puts_soft_tokens_in_order_and_leaves_text():
    ids = np.array([[5, IMAGE, IMAGE, 6, IMAGE, IMAGE], [IMAGE, IMAGE, 7, 8, 9, 0]], np.int32)
    text = np.random.default_rng(0).normal(size=(2, 6, 3)).astype("float32")
    soft = np.arange(2 * 4 * 3, dtype="float32").reshape(2, 4, 3) + 100
    got = ops.convert_to_numpy(merge_images(text, ids, soft, IMAGE))
    expected = text.copy()
    expected[0, [1, 2, 4, 5]] = soft[0]
    expected[1, [0, 1]] = soft[1, :2]  # a row with one image: the second image's tokens are unused
    np.testing.assert_array_equal(got, expected)


def test_cudnn_path_never_drops_a_non_causal_mask():
    q = np.ones((1, 4, 2, 8), "float32")
    index, ones = np.arange(4, dtype="int32"), np.ones((1, 4), "int32")
    structure = attention_structure(index, index, ones, ones, None, ones, ones, self_attention=True)  # one block
    assert ops.convert_to_numpy(structure.dense()).all()
    with pytest.raises(ValueError, match="causal only"):
        attend(q, q, q, structure, scale=1.0, softcap=None, implementation="cudnn")
    # "auto" with a non-causal mask takes an exact path: full attention over the uniform values
    values = q * np.arange(4, dtype="float32")[None, :, None, None]
    for implementation in ("auto", "chunked"):
        out = ops.convert_to_numpy(attend(q, q, values, structure, scale=1.0, softcap=None,
                                          implementation=implementation))
        np.testing.assert_allclose(out, np.full((1, 4, 2, 8), 1.5), atol=1e-6)


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_images_reach_the_text_only_through_image_slots(family, tiny_vision_arch):
    """Text before an image sees it only inside PaliGemma's prefix (Gemma 3 text is causal); a text-only input on a
    vision model is the text model."""
    arch = tiny_vision_arch(family)
    model = build_model(arch)
    rng = np.random.default_rng(1)
    tokens = arch.vision.tokens_per_image
    ids = np.array([[2, 9, *([IMAGE] * tokens), 10, 11, 12]], np.int32)
    images = rng.uniform(-1, 1, (1, 1, 28, 28, 3)).astype("float32")
    other = rng.uniform(-1, 1, (1, 1, 28, 28, 3)).astype("float32")
    inputs = {"token_ids": ids, "images": images}
    if arch.prefix_lm:
        inputs["prefix_mask"] = np.array([[1] * (2 + tokens) + [1, 0, 0]], np.int32)
    logits = ops.convert_to_numpy(model(inputs))
    changed = ops.convert_to_numpy(model({**inputs, "images": other}))
    before = np.abs(logits[0, :2] - changed[0, :2]).max()
    if arch.prefix_lm:  # the prefix attends to all of itself: the text before the image sees it too
        assert before > 1e-4
    else:  # causal text never sees an image that comes after it
        assert before < 1e-6
    assert np.abs(logits[0, 2:] - changed[0, 2:]).max() > 1e-4
    text_model = build_model(arch.model_copy(update={"vision": None}))
    for tensor in name_map(arch):
        get_variable(text_model, tensor.ours).assign(get_variable(model, tensor.ours))
    text = np.array([[2, 9, 10, 11]], np.int32)
    np.testing.assert_allclose(ops.convert_to_numpy(model({"token_ids": text})),
                               ops.convert_to_numpy(text_model({"token_ids": text})), atol=1e-6)


def test_vision_weights_are_paths_of_the_model(tiny_vision_arch):
    model = build_model(tiny_vision_arch("gemma3"))
    assert tuple(get_variable(model, "vision.encoder.layers.0.attention.q_proj.kernel").shape) == (16, 16)
    assert tuple(get_variable(model, "vision.projector.kernel").shape) == (16, 32)
    assert tuple(get_variable(model, "vision.soft_embedding_norm.scale").shape) == (16,)
