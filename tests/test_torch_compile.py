"""A compiled torch step (`train.jit_compile`, gemma_tune.train.compiling): where "auto" compiles, that every
forward the trainer runs traces as one graph (no graph break inside the model or the loss, for each attention
path, with block remat and on a QLoRA base), and that a compiled run, with and without remat, trains and
evaluates with the eager run's losses while compiling each step once (dynamo's `error_on_recompile` on); and
that the decoding step `sample` traces samples what the eager step does (each model family, vision too), and the
compiled one (`sample(compile_step=True)`) what the traced one does, compiling once, on a QLoRA base too.
The torch-only tests are defined in the torch suite alone."""

from __future__ import annotations

import os

import numpy as np
import pytest

import gemma_tune
from gemma_tune.train.compiling import eager_first_call, jit_compile_for

from test_train import recipe

BACKEND = os.environ.get("KERAS_BACKEND", "jax")


@pytest.mark.parametrize("setting,backend,device,expected", [
    ("auto", "torch", "gpu", True), ("auto", "torch", "cpu", False), ("auto", "jax", "gpu", "auto"),
    ("auto", "tensorflow", "cpu", "auto"), (True, "torch", "cpu", True), (False, "torch", "gpu", False),
    (True, "jax", "cpu", True)])
def test_auto_compiles_torch_on_a_gpu_and_leaves_xla_to_keras(setting, backend, device, expected):
    assert jit_compile_for(setting, backend, device) == expected


def test_pad_tail_appends_zeros_as_numpy_pads():
    from keras import ops

    from gemma_tune.methods.padding import pad_tail

    x = np.arange(12, dtype="float32").reshape(2, 3, 2)
    for axis in range(3):
        widths = [(0, 0)] * 3
        widths[axis] = (0, 2)
        np.testing.assert_array_equal(ops.convert_to_numpy(pad_tail(ops.convert_to_tensor(x), 2, axis)),
                                      np.pad(x, widths))
    assert pad_tail(x, 0, axis=1) is x


def test_an_uncompiled_function_is_left_as_it_is():
    def step(x):
        return x + 1

    assert eager_first_call(step) is step


if BACKEND == "torch":
    import torch

    from gemma_tune.backend import set_random_seed
    from gemma_tune.config.presets import preset_architecture
    from gemma_tune.methods.sft import SFT
    from gemma_tune.models import build_model, enable_lora
    from gemma_tune.models.adapters import quantize_base
    from gemma_tune.train.task import MethodTrainer

    def test_the_first_call_is_eager_and_the_rest_compiled():
        graphs = []

        def counting(graph, example_inputs):
            graphs.append(graph)
            return graph.forward

        once = eager_first_call(torch.compile(lambda x: x * 2, backend=counting))
        assert float(once(torch.ones(()))) == 2.0 and graphs == []  # eager: nothing traced
        assert [float(once(torch.ones(()))) for _ in range(2)] == [2.0, 2.0]
        assert len(graphs) == 1  # traced once, for both compiled calls

    def _trainer(preset: str, attention: str, remat: bool = False, quantize: str | None = None, **arch):
        set_random_seed(0)
        architecture = preset_architecture(preset, num_layers=2, **arch)
        lm = build_model(architecture, attention_implementation=attention)
        if quantize:
            quantize_base(lm, quantize)
        enable_lora(lm, 4, 8, targets=["q", "v"])
        lm.remat = remat
        return MethodTrainer(lm, SFT(recipe=None, options={}), chunk_size=16), architecture

    def _batch(architecture, rows: int = 2, length: int = 48) -> dict:
        """Packed rows of random tokens: three segments in row 0, padding at the end of row 1."""
        rng = np.random.default_rng(0)
        segments = np.array([[1] * 16 + [2] * 20 + [3] * 12, [1] * 40 + [0] * 8], "int32")[:rows, :length]
        positions = np.concatenate([np.arange(16), np.arange(20), np.arange(12)])[None].repeat(rows, 0)
        batch = {"token_ids": rng.integers(1, architecture.vocab_size, (rows, length)).astype("int32"),
                 "segment_ids": segments, "positions": positions.astype("int32"),
                 "target_ids": rng.integers(1, architecture.vocab_size, (rows, length)).astype("int32"),
                 "loss_mask": (segments > 0).astype("float32")}
        batch["step_targets"] = np.full((rows,), batch["loss_mask"].sum(), "float32")
        return {k: torch.as_tensor(v) for k, v in batch.items()}

    @pytest.mark.parametrize("preset,attention,remat,quantize,arch", [
        ("gemma3_tiny", "auto", False, None, {"sliding_window": 8}),     # fused (scaled_dot_product_attention)
        ("gemma3_tiny", "chunked", False, None, {"sliding_window": 8}),  # tiles of queries, each rematerialised
        ("gemma3_tiny", "auto", True, None, {"sliding_window": 8}),      # block remat: the compiler's (models/remat.py)
        ("gemma3_tiny", "auto", False, None, {"attn_logit_softcap": 50.0, "final_logit_softcap": 30.0, "sliding_window_pattern": 2}),  # plain path
        ("gemma3_tiny", "auto", False, "int8", {"sliding_window": 8}),   # QLoRA: models/quantized.py
    ])
    def test_the_training_forward_traces_as_one_graph(preset, attention, remat, quantize, arch, monkeypatch):
        from gemma_tune.models import tiling

        monkeypatch.setattr(tiling, "tile_queries", lambda rows, heads, keys: 16)  # chunked: three tiles
        trainer, architecture = _trainer(preset, attention, remat, quantize, **arch)
        batch = _batch(architecture)

        def forward(batch):
            return trainer(batch, training=True)["loss"]

        forward(batch)  # the trainer's first step runs eagerly (eager_first_call); dynamo traces the next
        explained = torch._dynamo.explain(forward)(batch)
        assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
        assert explained.graph_count == 1

    @pytest.mark.parametrize("remat", [False, True])
    def test_a_compiled_run_compiles_each_step_once_and_trains_as_the_eager_one(remat, tmp_path):
        common = dict(lora={"rank": 4, "alpha": 8}, eval_data=True, max_steps=4, eval_every=2, batch_size=2,
                      remat=remat, loss_chunk_size=96)  # 2 x 128 tokens: the loss pads its last chunk
        eager = gemma_tune.run(recipe(tmp_path / "eager", jit_compile=False, **common))
        torch._dynamo.reset()  # the code of Keras' step is shared by every trainer of the process: forget others'
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = gemma_tune.run(recipe(tmp_path / "compiled", jit_compile=True, **common))
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it did compile
        assert compiled.history["step"] == [1, 2, 3, 4] and compiled.history["eval_step"] == [2, 4]
        np.testing.assert_allclose(compiled.history["loss"], eager.history["loss"], rtol=1e-5)
        np.testing.assert_allclose(compiled.history["eval_loss"], eager.history["eval_loss"], rtol=1e-5)

    def _sampling_model():
        set_random_seed(0)
        return build_model(preset_architecture("gemma3_tiny", num_layers=2, sliding_window=8))

    def _eager_samples(model, prompts, monkeypatch, **settings):
        """What `sample` gives with its decoding step run as the Keras layers eagerly, not traced: the reference
        the traced graph must reproduce."""
        from gemma_tune import sampling

        model.__dict__.pop("_gemma_tune_sampler", None)  # forget the traced functions, then the eager ones
        with monkeypatch.context() as patched:
            patched.setattr(sampling, "_torch_graph", lambda function, variables, compile_graph, eager_first=False:
                            lambda: function)
            samples = sampling.sample(model, prompts, **settings)
        model.__dict__.pop("_gemma_tune_sampler", None)
        return samples

    @pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3", "paligemma2", "gemma3-vision"])
    def test_the_traced_decoding_step_samples_what_the_eager_step_samples(family, monkeypatch, tiny_vision_arch, tok):
        """`sample` on torch runs its step, and from the second call of the same shapes its prefill, as traced aten
        graphs (`sampling._torch_graph`): the eager Keras layers' tokens, log-probabilities, lengths and stops,
        sampling with top-k, top-p and stop ids, over left-padded rows longer than the window; a vision model's
        prefill reads images (other images at the second call: the traced prefill takes them as inputs), its steps
        the cache."""
        from gemma_tune.sampling import sample

        set_random_seed(0)
        vision = family in ("paligemma2", "gemma3-vision")
        if vision:
            architecture = tiny_vision_arch("gemma2" if family == "paligemma2" else "gemma3")
        else:  # Gemma 1 (here MQA, no window), Gemma 2 (soft-caps, window 8), Gemma 3 (QK-norm, window 8)
            from test_export_hf import ARCHS

            mqa = {"num_kv_heads": 1} if family == "gemma" else {}
            architecture = preset_architecture("gemma3_tiny", **{**ARCHS[family], "num_layers": 2, **mqa})
        model = build_model(architecture)
        enable_lora(model, 4, 8, targets=["q", "v"])
        prompts = [[2] + list(range(20, 33)), [2, 7, 8], [2, 100, 101, 102, 103]]
        images = {3: None, 4: None}
        if vision:
            from gemma_tune.vision_prompt import prompt_ids

            from test_generate_vision import pictures

            images = {seed: [pictures(1, seed), pictures(2, seed + 10), []] for seed in (3, 4)}
            texts = ["hi", "What is in the picture?", "Say something."]
            prompts = [prompt_ids(tok, architecture, t, len(r), chat=not architecture.prefix_lm)
                       for t, r in zip(texts, images[3])]
        settings = dict(max_new_tokens=10, temperature=0.9, top_k=40, top_p=0.95, stop_ids=[5, 9], pad_id=0)
        # the first call runs its prefill eagerly, the second (the same shapes) traces it
        samples = {seed: sample(model, prompts, seed=seed, images=images[seed], **settings) for seed in (3, 4)}
        for seed, traced in samples.items():
            eager = _eager_samples(model, prompts, monkeypatch, seed=seed, images=images[seed], **settings)
            np.testing.assert_array_equal(traced.tokens, eager.tokens)
            np.testing.assert_allclose(traced.logps, eager.logps, atol=1e-5)
            assert traced.lengths.tolist() == eager.lengths.tolist()
            assert traced.stopped.tolist() == eager.stopped.tolist()
            assert (traced.lengths > 1).any()  # steps ran, not the prefill alone

    def test_compiled_decoding_samples_what_traced_decoding_samples_and_compiles_once():
        from gemma_tune.sampling import sample

        model = _sampling_model()
        prompts = [[2] + list(range(20, 33)), [2, 7, 8], [2, 100, 101, 102, 103]]  # left-padded rows
        settings = dict(max_new_tokens=10, temperature=0.7, top_k=40, top_p=0.9, stop_ids=[5, 9], pad_id=0,
                        prompt_slots=16)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        compiled = sample(model, prompts, seed=3, compile_step=True, **settings)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1  # one graph: the step
        with torch._dynamo.config.patch(error_on_recompile=True):
            for seed in (3, 4):
                traced = sample(model, prompts, seed=seed, **settings)
                again = sample(model, prompts, seed=seed, compile_step=True, **settings)
                np.testing.assert_array_equal(again.tokens, traced.tokens)
                np.testing.assert_allclose(again.logps, traced.logps, atol=1e-5)
                assert again.lengths.tolist() == traced.lengths.tolist()
                assert again.stopped.tolist() == traced.stopped.tolist()
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 2  # and the prefill's
            np.testing.assert_array_equal(compiled.tokens, sample(model, prompts, seed=3, **settings).tokens)
            shorter = [p[:9] for p in prompts]  # a shorter longest prompt, the same slots: the same graph
            np.testing.assert_array_equal(sample(model, shorter, seed=3, compile_step=True, **settings).tokens,
                                          sample(model, shorter, seed=3, **settings).tokens)
            scale = model.final_norm.scale  # new weights, the same variables: read at each call, nothing recompiles
            scale.assign(np.random.default_rng(0).normal(0.0, 1.0, scale.shape).astype("float32"))
            traced = sample(model, prompts, seed=3, **settings)
            again = sample(model, prompts, seed=3, compile_step=True, **settings)
        assert np.abs(traced.logps - compiled.logps).max() > 1e-2
        np.testing.assert_array_equal(again.tokens, traced.tokens)
        np.testing.assert_allclose(again.logps, traced.logps, atol=1e-5)

    def test_traced_and_compiled_decoding_on_a_qlora_base_sample_what_eager_decoding_samples(monkeypatch):
        """The traced and the compiled step run the quantised base's autograd function (models/quantized.py;
        int8, with the activation quantiser) as the eager one."""
        from gemma_tune.sampling import sample

        model = _sampling_model()
        quantize_base(model, "int8")
        enable_lora(model, 4, 8, targets=["q", "v"])
        prompts = [[2] + list(range(20, 33)), [2, 7, 8]]
        settings = dict(max_new_tokens=8, temperature=0.7, top_k=40, stop_ids=[5], pad_id=0, prompt_slots=16)
        compiled = sample(model, prompts, seed=3, compile_step=True, **settings)
        traced = sample(model, prompts, seed=3, **settings)
        eager = _eager_samples(model, prompts, monkeypatch, seed=3, **settings)
        for samples in (compiled, traced):
            np.testing.assert_array_equal(samples.tokens, eager.tokens)
            np.testing.assert_allclose(samples.logps, eager.logps, atol=1e-5)
