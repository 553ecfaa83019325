"""On-device sampling with a KV cache: one compiled loop (prefill, then a while loop over the new tokens).

    sample(model, prompt_ids, max_new_tokens=N, temperature=τ, top_k, top_p, seed, stop_ids, pad_id, images)
        -> Samples(tokens [B, N], logps [B, N], lengths [B], stopped [B])

Layout. Prompts of different lengths L_b are left-padded to the longest, P tokens; the cache holds P + N
slots. Row b's positions count its real tokens only (0 … L_b − 1 for the prompt, then L_b, L_b + 1, …) and
its padding slots are masked out as keys (`key_segments` 0), so a padded row decodes exactly as it would
alone. The prefill is one `call_with_cache` over the P prompt slots — a vision model's with the images
[B, N_img, S, S, 3] (a row with fewer images padded with zeros, which no slot reads) and the attention blocks
of the cache slots (`vision_prompt.prompt_blocks`; padding and generated slots 0, causal); step i ≥ 1 feeds
token i − 1 at slot P + i − 1 (position L_b + i − 1) with neither (the cache holds the images' keys and
values, and a generated token attends causally).

Sampling of token i of row b from the logits z (float32, the model's soft-capped logits):
    greedy (τ == 0): argmax z
    else: z / τ; keep the top_k largest; keep the smallest set of tokens whose probability sums to ≥ top_p
    (always the most likely one); sample from the renormalised softmax, by inverse CDF with the uniform
    u[i, b] ∈ (0, 1]: the first candidate c whose cumulative weight W_c ≥ u · W_total — candidates in
    `ops.top_k` order (the k largest, or the whole vocabulary sorted when only top_p is set), else the
    vocabulary in index order. A zero-probability candidate is never chosen (W_c = W_{c−1} < u · W_total).
The uniforms are drawn on the host up front, u = 1 − np.random.default_rng(seed).random((N, B)), so the same
seed gives the same tokens on every backend when the logits agree.

    logps[b, i] = log softmax(z / τ)[token]   over the full vocabulary (τ = 1 when greedy), not truncated
                                              by top-k / top-p: the policy a training forward pass at the
                                              sampling temperature computes (TRL's convention)

A row ends at its first stop id, which is kept (tokens, lengths); its later slots hold `pad_id` with logp
0. The loop ends when every row has stopped, or after N tokens.

Compilation: JAX jits the whole function over the variables' current values (`keras.StatelessScope`;
the values are read at each call, so a changed weight changes the samples); TensorFlow runs it as a
`tf.function` compiled by XLA (`jit_compile=True`, as keras-hub's generate; the while loop becomes
`tf.while_loop`; 3.5× faster than without XLA for gemma3_tiny, 64 rows × 64 tokens on CPU); PyTorch runs the
loop in Python under `torch.no_grad()`, its step (`_decode_step`: one token through the model and the sampling
rule) as one traced graph of aten operations (`_torch_graph`; the KV cache written by `models.cache.write_slots`,
the slot a tensor: one graph serves every step of a call and every call of the same shapes), run as traced or,
with `compile_step`, compiled by torch.compile; the prefill (`_prefill`) likewise from the second call of the same
shapes on (the first runs it eagerly: a single call would pay its trace for nothing). Tracing costs about one
eager call (0.7 s for gemma3_tiny) and makes a step 2–3× faster than running the Keras layers eagerly, whose Python
costs more than their arithmetic at small sizes; compiling costs tens of seconds (CPU) and pays off over many
calls (online RL's rounds), so it is the caller's choice. The functions are kept on the model per (temperature, top_k,
top_p, compile_step) while
its variables stay the same: repeated calls with the same shapes compile nothing, and `prompt_slots` (left-padding
every prompt to at least that many slots, which changes no sample: padding slots are never attended) keeps the
shapes the same when the longest prompt varies. The stop ids reach the loop as a mask over the vocabulary, so other
stop ids compile nothing either (ids outside the vocabulary are never sampled and are ignored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gemma_tune import vision_prompt


@dataclass
class Samples:
    """What `sample` returns (N = max_new_tokens):

    tokens  int32 [B, N]   the sampled ids; after a row's stop id (which is included) or past its end: pad_id
    logps   float32 [B, N] log softmax(z / τ)[token] over the full vocabulary (τ = 1 when greedy); 0 after the end
    lengths int32 [B]      tokens produced, the stop id included
    stopped bool [B]       whether the row ended with a stop id (False: cut at max_new_tokens)
    """

    tokens: np.ndarray
    logps: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray


def next_tokens(logits, uniforms, temperature: float, top_k: int | None = None, top_p: float | None = None):
    """(tokens int32 [B], logps float32 [B]) for logits [B, V] and uniforms [B] in (0, 1], by the rule of
    the module docstring; keras.ops (runs eagerly or inside the compiled loop)."""
    from keras import ops

    z = ops.cast(logits, "float32")
    vocab = z.shape[-1]
    if temperature == 0:
        tokens = ops.cast(ops.argmax(z, axis=-1), "int32")
        scaled = z
    else:
        scaled = z / temperature
        top_k = top_k if top_k is not None and top_k < vocab else None
        top_p = top_p if top_p is not None and top_p < 1.0 else None
        candidates, ids = scaled, None
        if top_k is not None or top_p is not None:
            candidates, ids = ops.top_k(scaled, top_k or vocab)  # sorted, largest first
        weights = ops.exp(candidates - ops.amax(candidates, axis=-1, keepdims=True))
        if top_p is not None:  # keep a token while the mass of strictly more likely ones is below top_p
            before = ops.cumsum(weights, axis=-1) - weights
            weights = ops.where(before < top_p * ops.sum(weights, axis=-1, keepdims=True), weights, 0.0)
        cumulative = ops.cumsum(weights, axis=-1)
        threshold = ops.cast(uniforms, "float32")[:, None] * cumulative[:, -1:]
        chosen = ops.sum(ops.cast(cumulative < threshold, "int32"), axis=-1)
        chosen = ops.minimum(chosen, ops.shape(weights)[-1] - 1)  # u·W_last ≤ W_last keeps it so; a guard only
        tokens = chosen if ids is None else ops.take_along_axis(ops.cast(ids, "int32"), chosen[:, None], axis=-1)[:, 0]
    logps = ops.take_along_axis(ops.log_softmax(scaled, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logps


def _record(settings, i, z, out_tokens, out_logps, lengths, done, uniforms, is_stop, pad_id):
    """Token i of every row from logits z [B, V], written at column i of out_tokens / out_logps [B, N]; rows
    already done get pad_id and logp 0. Returns (token, out_tokens, out_logps, lengths, done)."""
    from keras import ops

    token, logp = next_tokens(z, ops.take(uniforms, i, axis=0), *settings)
    token = ops.where(done, pad_id, token)
    logp = ops.where(done, 0.0, logp)
    here = ops.equal(ops.arange(ops.shape(out_tokens)[1], dtype="int32")[None, :], i)
    out_tokens = ops.where(here, token[:, None], out_tokens)
    out_logps = ops.where(here, logp[:, None], out_logps)
    lengths = lengths + ops.cast(ops.logical_not(done), "int32")
    stop = ops.take(is_stop, token, axis=0)
    return token, out_tokens, out_logps, lengths, ops.logical_or(done, stop)


def _decode_step(model, settings, i, last, cache, out_tokens, out_logps, lengths, done, key_segments, prompt_lengths,
                 uniforms, is_stop, pad_id):
    """Step i ≥ 1 of the loop: token i − 1 (`last`) fed at cache slot P + i − 1, token i recorded. Returns the
    loop state (i + 1, last, cache, out_tokens, out_logps, lengths, done). P = S − N from the shapes."""
    from keras import ops

    prompt_len = ops.shape(key_segments)[1] - ops.shape(uniforms)[0]
    logits, cache = model.call_with_cache(last[:, None], (prompt_lengths + i - 1)[:, None], key_segments, cache,
                                          prompt_len + i - 1)
    last, out_tokens, out_logps, lengths, done = _record(settings, i, logits[:, -1, :], out_tokens, out_logps,
                                                         lengths, done, uniforms, is_stop, pad_id)
    return i + 1, last, cache, out_tokens, out_logps, lengths, done


def _prefill(model, settings, tokens, positions, key_segments, uniforms, is_stop, pad_id, pixels, key_blocks):
    """The prefill: the P prompt slots through the model into a new cache of P + N slots, and token 0 recorded.
    Returns the loop state after it (last, cache, out_tokens, out_logps, lengths, done)."""
    from keras import ops

    batch, prompt_len = tokens.shape
    steps = uniforms.shape[0]
    cache = model.init_cache(batch, prompt_len + steps)
    logits, cache = model.call_with_cache(tokens, positions, key_segments, cache, 0, pixels, key_blocks)
    out_tokens = ops.zeros((batch, steps), "int32") + pad_id
    out_logps = ops.zeros((batch, steps), "float32")
    lengths = ops.zeros((batch,), "int32")
    done = ops.zeros((batch,), "bool")
    last, out_tokens, out_logps, lengths, done = _record(settings, 0, logits[:, -1, :], out_tokens, out_logps,
                                                         lengths, done, uniforms, is_stop, pad_id)
    return last, cache, out_tokens, out_logps, lengths, done


def _decode(model, settings, prefill, step, tokens, positions, key_segments, prompt_lengths, uniforms, is_stop, pad_id,
            pixels, key_blocks):
    """The prefill and the decoding loop (module docstring), in keras.ops: (tokens, logps, lengths, stopped).
    `settings` (temperature, top_k, top_p); `prefill` and `step` are `_prefill` and `_decode_step` of this model
    and settings (each traced on its own on torch); `is_stop` bool [vocab]: which ids are stop ids (one shape for
    any stop ids: nothing recompiles)."""
    from keras import ops

    tokens, positions, key_segments, prompt_lengths, uniforms, is_stop, pad_id = (
        ops.convert_to_tensor(x) for x in (tokens, positions, key_segments, prompt_lengths, uniforms, is_stop, pad_id))
    pixels, key_blocks = (None if x is None else ops.convert_to_tensor(x) for x in (pixels, key_blocks))
    steps = uniforms.shape[0]
    state = prefill(tokens, positions, key_segments, uniforms, is_stop, pad_id, pixels, key_blocks)

    def cond(i, last, cache, out_tokens, out_logps, lengths, done):
        return ops.logical_and(ops.less(i, steps), ops.logical_not(ops.all(done)))

    def body(*state):
        return step(*state, key_segments, prompt_lengths, uniforms, is_stop, pad_id)

    state = (ops.convert_to_tensor(1, "int32"), *state)
    _, _, _, out_tokens, out_logps, lengths, done = ops.while_loop(cond, body, state)
    return out_tokens, out_logps, lengths, done


class _Compiled:
    """The compiled decoding functions of one model, by (temperature, top_k, top_p), valid while the model's
    variables are the same objects (a plain object, so that Keras does not track it)."""

    def __init__(self, key):
        self.key, self.functions = key, {}


def _compiled(model, temperature: float, top_k: int | None, top_p: float | None, compile_step: bool):
    """`_decode` for these settings as the backend runs it best (module docstring), cached on the model.
    `compile_step` (torch only): the loop's traced prefill and step (`_torch_graph`) compiled by torch.compile."""
    import functools

    import keras

    variables = list(model.variables)
    key = tuple(id(v) for v in variables)
    holder = model.__dict__.get("_gemma_tune_sampler")
    if holder is None or holder.key != key:
        holder = _Compiled(key)
        object.__setattr__(model, "_gemma_tune_sampler", holder)
    settings = (temperature, top_k, top_p)
    backend = keras.backend.backend()
    compile_step = compile_step and backend == "torch"
    if (settings, compile_step) in holder.functions:
        return holder.functions[settings, compile_step]
    prefill = functools.partial(_prefill, model, settings)
    step = functools.partial(_decode_step, model, settings)
    decode = functools.partial(_decode, model, settings, prefill, step)
    if backend == "jax":
        import jax

        def stateless(values, *args):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return decode(*args)

        jitted = jax.jit(stateless)

        def function(*args):
            return jitted([v.value for v in variables], *args)
    elif backend == "tensorflow":
        import tensorflow as tf

        function = tf.function(decode, jit_compile=True)
    else:
        import torch

        prefill_for_call = _torch_graph(prefill, variables, compile_step, eager_first=True)
        step_for_call = _torch_graph(step, variables, compile_step)

        def function(*args):
            with torch.no_grad():
                return _decode(model, settings, prefill_for_call(), step_for_call(), *args)
    holder.functions[settings, compile_step] = function
    return function


def _torch_graph(function, variables, compile_graph: bool, eager_first: bool = False):
    """`function` (the prefill or the decoding step) on torch as one graph per input shapes: traced by `make_fx`
    over fake tensors into an aten graph whose inputs are the variables' values and the function's tensors, run
    as traced, or compiled by `torch.compile` when `compile_graph`. Returns `for_call()`: the function of one
    `sample` call, with the variables' values read then (a changed weight is used by the next call; reading them
    costs 0.15 ms, a tenth of a compiled step, so not at every step) and its graph looked up by the shapes of its
    first call. With `eager_first` (the prefill, run once per `sample` call) a call of shapes not seen before runs
    eagerly and the next call of those shapes traces: tracing costs about one eager call, so a single call (one
    `generate`) would pay it for nothing, while the repeated calls of online RL's rounds or evaluation samples
    reuse the graph.

    The graph holds no Python object. Run as traced it skips the Keras layers' Python (their calls, scopes and
    tensor conversions: two thirds of an eager step of gemma3_tiny); compiled, a call costs what the graph
    computes: dynamo compiling `step` itself guards on thousands of the Keras layers' attributes, whose checks
    took 2.9 ms of a 4.5 ms step (gemma3_tiny, 8 rows, one CPU thread) where the traced graph's compiled step
    takes 1.3 ms. With fake tensors a Python branch on a tensor's value fails the trace instead of being baked
    into it."""
    import keras
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    def pure(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return function(*args)

    graphs, seen = {}, set()

    def for_call():
        values = [v.value for v in variables]
        chosen = []

        def run(*args):
            if not chosen:
                shapes = tuple(None if x is None else (tuple(x.shape), x.dtype)
                               for x in torch.utils._pytree.tree_leaves(args))
                if shapes not in graphs:
                    if eager_first and shapes not in seen:
                        seen.add(shapes)
                        return function(*args)
                    graph = make_fx(pure, tracing_mode="fake")(values, *args)
                    graphs[shapes] = torch.compile(graph, dynamic=False) if compile_graph else graph
                chosen.append(graphs[shapes])
            return chosen[0](values, *args)

        return run

    return for_call


def sample(model, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, seed=0, stop_ids: Sequence[int] = (),
           pad_id: int = 0, images=None, compile_step: bool = False, prompt_slots: int = 0) -> Samples:
    """`max_new_tokens` (N) new tokens after each prompt (token ids, bos included if wanted), sampled on the
    device in one compiled loop, with their log-probabilities (module docstring for the rule and `Samples`).

    `seed`: anything `np.random.default_rng` accepts (an int, or a list such as [run_seed, round]).
    `images` (vision models): None, or one entry per prompt — a list of its images (paths, PIL images or
    preprocessed arrays [S, S, 3] in [−1, 1]; `vision_prompt.image_array`), an array [N, S, S, 3], or one
    image. A prompt holds `tokens_per_image` slots of `image_token_id` per image, laid out as
    `vision_prompt.prompt_ids` does (else a VisionPromptError); images for a model without a vision encoder
    are a VisionPromptError, an image that cannot be read an ImageError naming it. `compile_step` (PyTorch;
    ignored elsewhere, where the whole loop is compiled): the loop's traced prefill and step compiled by
    torch.compile (module docstring), the same samples as the traced ones. `prompt_slots`: the prompts are
    left-padded to max(longest prompt, prompt_slots) slots (one shape for prompts of varying lengths). An empty prompt,
    max_new_tokens < 1, temperature < 0, top_k < 1 or top_p outside (0, 1] is a ValueError."""
    from keras import ops

    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    arch = model.architecture
    rows = vision_prompt.images_per_prompt(arch, images, len(prompt_ids))
    vision_prompt.check_image_slots(arch, prompt_ids, rows)
    batch = len(prompt_ids)
    lengths = np.array([len(p) for p in prompt_ids], np.int32)
    prompt_len = max(int(lengths.max()), prompt_slots)
    total = prompt_len + max_new_tokens
    tokens = np.full((batch, prompt_len), pad_id, np.int32)
    key_segments = np.ones((batch, total), np.int32)
    for b, ids in enumerate(prompt_ids):
        tokens[b, prompt_len - len(ids):] = ids
        key_segments[b, :prompt_len - len(ids)] = 0
    positions = np.maximum(np.cumsum(key_segments[:, :prompt_len], axis=1) - 1, 0).astype(np.int32)
    pixels = vision_prompt.pixel_batch(arch, rows)
    blocks = vision_prompt.prompt_blocks(arch, tokens, key_segments[:, :prompt_len])
    key_blocks = None
    if blocks is not None:  # the generated slots are causal (block 0)
        key_blocks = np.zeros((batch, total), np.int32)
        key_blocks[:, :prompt_len] = blocks
    uniforms = (1.0 - np.random.default_rng(seed).random((max_new_tokens, batch))).astype(np.float32)
    greedy = temperature == 0
    function = _compiled(model, 0.0 if greedy else float(temperature), None if greedy else top_k,
                         None if greedy else top_p, compile_step)
    is_stop = np.zeros(arch.vocab_size, bool)
    is_stop[[int(s) for s in stop_ids if 0 <= int(s) < arch.vocab_size]] = True  # others are never sampled
    out = function(tokens, positions, key_segments, lengths, uniforms, is_stop, np.int32(pad_id), pixels, key_blocks)
    out_tokens, out_logps, out_lengths, stopped = (ops.convert_to_numpy(x) for x in out)
    return Samples(tokens=out_tokens.astype(np.int32), logps=out_logps.astype(np.float32),
                   lengths=out_lengths.astype(np.int32), stopped=stopped.astype(bool))
