"""torch's FlexAttention path (`gemma_tune.models.flex`) against the plain reference: every attention structure
(packing, padding, sliding windows, soft-caps, attention blocks, grouped heads, a cache frame) eagerly and compiled,
whole Gemma 1/2/3 models, where "auto" takes it, and the errors where it cannot run.

On a CPU torch 2.13 has FlexAttention's forward (eager: a reference over the scores; compiled: inductor's C++ kernel)
but no backward, so gradients through it are checked on a GPU (scripts/check_gpu_attention.py). The torch tests are
defined in the torch suite alone; the other suites check the error there."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from gemma_tune.models import attention, build_model, flex
from gemma_tune.models.attention import attend, plain_attention
from gemma_tune.train.compiling import end_layer_calls

from test_attention_chunks import CASES, LENGTH, qkv, structure_for
from test_model import numpy, packed_batch, randomised, tiny

if keras.backend.backend() == "torch":

    @pytest.fixture
    def no_grad():
        """Inference: FlexAttention has no CPU backward, and Keras' torch variables require gradients."""
        import torch

        with torch.no_grad():
            yield

    @pytest.mark.parametrize("softcap", [None, 5.0])
    @pytest.mark.parametrize("window,blocks,self_attention", CASES)
    def test_flex_equals_plain(window, blocks, self_attention, softcap, no_grad):
        structure = structure_for(window, blocks, self_attention, dense=False)
        q, k, v = qkv(LENGTH if self_attention else LENGTH + 3)
        got = attend(q, k, v, structure, scale=0.3, softcap=softcap, implementation="flex")
        expected = plain_attention(q, k, v, structure.dense(), scale=0.3, softcap=softcap)
        np.testing.assert_allclose(numpy(got), numpy(expected), atol=1e-6)

    def test_compiled_flex_equals_plain(no_grad):
        """Under torch.compile (the path "auto" takes on a GPU): the block mask built inside the graph, inductor's
        kernel, a sliding window, attention blocks, grouped heads and the soft-cap."""
        import torch

        structure = structure_for(3, True, True, dense=False)
        q, k, v = (ops.convert_to_tensor(a) for a in qkv(LENGTH))
        index, segments, blocks = (ops.convert_to_tensor(a) for a in (
            structure.query_index, structure.query_segment, structure.query_block))

        def run(q, k, v):
            built = attention.attention_structure(index, index, segments, segments, 3, blocks, blocks,
                                                  self_attention=True, dense=False, flex=True)
            return attend(q, k, v, built, scale=0.3, softcap=5.0, implementation="flex")

        got = torch.compile(run, fullgraph=True)(q, k, v)
        expected = plain_attention(q, k, v, structure.dense(), scale=0.3, softcap=5.0)
        np.testing.assert_allclose(numpy(got), numpy(expected), atol=1e-5)

    @pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
    def test_flex_model_equals_plain(family, no_grad):
        plain = randomised(build_model(tiny(family), attention_implementation="plain"))
        model = build_model(tiny(family), attention_implementation="flex")
        model.set_weights(plain.get_weights())
        batch = packed_batch()
        real = batch["segment_ids"] > 0
        structures = model._structures(*(ops.arange(16, dtype="int32"),) * 2, *(batch["segment_ids"],) * 2,
                                       self_attention=True)
        assert all(s.block_mask is not None and s.mask is None for s in structures.values())
        np.testing.assert_allclose(numpy(model(batch))[real], numpy(plain(batch))[real], atol=1e-5)

    @pytest.mark.parametrize("family", ["gemma2", "gemma3"])
    def test_flex_vision_model_equals_plain(family, tiny_vision_arch, no_grad):
        """Images as attention blocks, sliding windows shorter than them: PaliGemma 2's prefix (the window bounds
        causal pairs only) and Gemma 3's images (the window bounds every pair)."""
        arch = tiny_vision_arch(family)
        plain = randomised(build_model(arch, attention_implementation="plain"))
        model = build_model(arch, attention_implementation="flex")
        model.set_weights(plain.get_weights())
        tokens = arch.vision.tokens_per_image
        image = arch.vision.image_token_id
        ids = np.array([[2, *([image] * tokens), 9, 10, 11, 12, 13], [2, 7, *([image] * tokens), 8, 9, 0, 0]], "int32")
        inputs = {"token_ids": ids, "padding_mask": (ids > 0).astype("int32"),
                  "images": np.random.default_rng(2).uniform(-1, 1, (2, 1, 28, 28, 3)).astype("float32")}
        if arch.prefix_lm:
            inputs["prefix_mask"] = np.array([[1] * (tokens + 3) + [0] * 3, [1] * (tokens + 3) + [0] * 3], "int32")
        real = inputs["padding_mask"] > 0
        np.testing.assert_allclose(numpy(model(inputs))[real], numpy(plain(inputs))[real], atol=1e-5)

    def test_auto_takes_flex_where_it_applies(monkeypatch, no_grad):
        """Where `flex_attention_applies` (torch.compile tracing for a Hopper or Blackwell GPU) "auto" builds block
        masks and no dense mask, and gives the plain path's logits; a CPU outside torch.compile is not such a place."""
        plain = randomised(build_model(tiny("gemma3"), attention_implementation="plain"))
        batch = packed_batch()
        assert not flex.flex_attention_applies(ops.convert_to_tensor(batch["segment_ids"]))
        monkeypatch.setattr(attention, "flex_attention_applies", lambda tensor: True)
        assert not attention.runs_flex("auto", None, self_attention=False)  # decoding over a cache: not taken
        model = build_model(tiny("gemma3"))
        model.set_weights(plain.get_weights())
        index = ops.arange(16, dtype="int32")
        structures = model._structures(index, index, batch["segment_ids"], batch["segment_ids"], self_attention=True)
        assert all(s.block_mask is not None and s.mask is None for s in structures.values())
        real = batch["segment_ids"] > 0
        np.testing.assert_allclose(numpy(model(batch))[real], numpy(plain(batch))[real], atol=1e-5)

    @pytest.mark.parametrize("remat", [False, True])
    def test_the_training_forward_with_flex_traces_as_one_graph(remat, no_grad):
        """The trainer's forward (the loss of a packed batch, LoRA) with its block masks built inside the graph, and
        with block remat (each block traced whole): one graph for torch.compile, no break (outside a no-grad
        region this is the GPU's compiled step; a CPU has no backward to take)."""
        import torch

        from test_torch_compile import _batch, _trainer

        trainer, architecture = _trainer("gemma3_tiny", "flex", remat, sliding_window=8)
        batch = _batch(architecture)

        def forward(batch):
            return trainer(batch, training=True)["loss"]

        forward(batch)  # the trainer's first step runs eagerly (eager_first_call); dynamo traces the next
        try:
            explained = torch._dynamo.explain(forward)(batch)
        finally:  # traced outside the trainer's compiled step, which ends its layer calls itself
            end_layer_calls()
        assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
        assert explained.graph_count == 1

    def test_a_compiled_evaluation_through_flex_compiles_once_and_ends_its_layer_calls():
        """The trainer's compiled test step (what a GPU run evaluates with) through FlexAttention: the plain path's
        metrics, one compilation over repeated calls (dynamo's `error_on_recompile`), and no Keras layer call
        context left behind (torch 2.13's dynamo drops it: `compiling.end_layer_calls`), so an eager call after it
        is an inference call."""
        import keras
        import torch
        from keras.src.backend.common import global_state

        from test_torch_compile import _batch, _trainer

        results = {}
        for path in ("plain", "flex"):
            trainer, architecture = _trainer("gemma3_tiny", path, sliding_window=8)
            trainer.compile(optimizer=keras.optimizers.AdamW(1e-3), jit_compile=path == "flex")
            batch = _batch(architecture)
            torch._dynamo.reset()
            with torch._dynamo.config.patch(error_on_recompile=True):
                results[path] = [trainer.test_on_batch(batch, return_dict=True) for _ in range(4)]
            assert global_state.get_global_attribute("current_call_ctx") is None
        for got in results["flex"]:
            assert got.keys() == results["plain"][0].keys()
            for key, value in got.items():
                np.testing.assert_allclose(value, results["plain"][0][key], rtol=1e-5, err_msg=key)

    def test_flex_gradients_on_a_cpu_are_a_clear_error():
        structure = structure_for(None, False, True, dense=False)
        q, k, v = (ops.convert_to_tensor(a) for a in qkv(LENGTH))
        with pytest.raises(ValueError, match="no FlexAttention backward on a CPU"):
            attend(q.requires_grad_(), k, v, structure, scale=1.0, softcap=None, implementation="flex")
else:

    def test_flex_elsewhere_is_a_clear_error():
        structure = structure_for(None, False, True, dense=False)
        q, k, v = qkv(LENGTH)
        with pytest.raises(ValueError, match="torch's FlexAttention"):
            attend(q, k, v, structure, scale=1.0, softcap=None, implementation="flex")
