"""Text generation with a KV cache: greedy, temperature, top-k and top-p sampling, batched prompts, images.

Prompts of different lengths are left-padded to the longest, P tokens; the cache holds P +
max_new_tokens slots. Each row's positions count its real tokens only (0 … L_b − 1 for the prompt, then
L_b, L_b + 1, …), padding slots are masked out as keys, so a padded row decodes exactly as it would
alone. One prefill call fills the cache; each new token is one `call_with_cache` step.

Vision models (PaliGemma, Gemma 3 4B and larger) take images with the prompts, one list per prompt; the
prompt layouts (what transformers' processors build) and the pixels are in `gemma_tune.vision_prompt`. The
prefill passes the images [B, N, S, S, 3] (a row with fewer than N images padded with zeros, which no slot
reads) and the attention blocks of the cache slots (PaliGemma: the whole prompt is one bidirectional prefix;
Gemma 3: each image's slots; padding and generated slots 0, causal); decoding steps pass neither (the cache
holds the images' keys and values, and a generated token attends causally).

Sampling of the next token from logits z (float32, on the host):
    greedy (temperature == 0): argmax z
    else: z / temperature; keep the top_k largest; keep the smallest set of tokens whose probability
    sums to ≥ top_p (always the most likely one); sample from the renormalised softmax.
A row stops at its first stop id (<end_of_turn> and <eos> by default; <eos> alone for PaliGemma); stop ids
are not returned.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gemma_tune import vision_prompt
from gemma_tune.vision_prompt import CHAT_PROMPT  # noqa: F401 - the chat template, public here too


def next_token(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int | None,
               top_p: float | None) -> np.ndarray:
    """Next token per row of `logits` [B, vocab] (see the module docstring for the rule)."""
    logits = logits.astype(np.float64)
    if temperature == 0:
        return logits.argmax(axis=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        before = np.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of strictly more likely tokens
        keep_sorted = before < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])


def decoding_step(model):
    """`model.call_with_cache`, compiled where the backend gains from it.

    On JAX, eager decoding dispatches (and compiles) op by op; the step is jitted over the variables'
    current values instead (prefill and per-token shapes: two compilations per call of `generate_ids`).
    Other backends run it eagerly. The compiled step is kept on the model while its variables stay the
    same, so repeated calls with the same shapes compile nothing.
    """
    import keras

    if keras.backend.backend() != "jax":
        return model.call_with_cache
    import jax

    variables = list(model.variables)
    key = tuple(id(v) for v in variables)
    cached = getattr(model, "_compiled_decoding_step", None)
    if cached is not None and cached[0] == key:
        compiled = cached[1]
        return lambda *args: compiled([v.value for v in variables], *args)

    def step(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return model.call_with_cache(*args)

    compiled = jax.jit(step)
    model._compiled_decoding_step = (key, compiled)
    return lambda *args: compiled([v.value for v in variables], *args)


def generate_ids(model, prompt_ids: Sequence[Sequence[int]], *, images=None, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0, stop_ids: Sequence[int] = (), pad_id: int = 0) -> list[list[int]]:
    """New token ids for each prompt (token ids, bos included if wanted), stop ids excluded.

    `images` (vision models): None, or one entry per prompt — a list of its images (paths, PIL images or
    preprocessed arrays [S, S, 3] in [−1, 1]; `vision_prompt.image_array`), an array [N, S, S, 3], or one
    image. A prompt holds `tokens_per_image` slots of `image_token_id` per image, laid out as
    `vision_prompt.prompt_ids` does (else a VisionPromptError); images for a model without a vision encoder
    are a VisionPromptError, an image that cannot be read an ImageError naming it."""
    from keras import ops

    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    arch = model.architecture
    rows = vision_prompt.images_per_prompt(arch, images, len(prompt_ids))
    vision_prompt.check_image_slots(arch, prompt_ids, rows)
    batch = len(prompt_ids)
    lengths = np.array([len(p) for p in prompt_ids])
    prompt_len = int(lengths.max())
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

    rng = np.random.default_rng(seed)
    stop = {int(s) for s in stop_ids}
    cache = model.init_cache(batch, total)
    step_fn = decoding_step(model)
    logits, cache = step_fn(tokens, positions, key_segments, cache, np.int32(0), pixels, key_blocks)
    last = ops.convert_to_numpy(ops.cast(logits[:, -1, :], "float32"))
    outputs: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, bool)
    for step in range(max_new_tokens):
        chosen = next_token(last, rng, temperature, top_k, top_p)
        for b in np.flatnonzero(~done):
            if int(chosen[b]) in stop:
                done[b] = True
            else:
                outputs[b].append(int(chosen[b]))
        if done.all() or step == max_new_tokens - 1:
            break
        step_positions = (lengths + step)[:, None].astype(np.int32)
        logits, cache = step_fn(chosen[:, None].astype(np.int32), step_positions, key_segments, cache,
                                np.int32(prompt_len + step))
        last = ops.convert_to_numpy(ops.cast(logits[:, -1, :], "float32"))
    return outputs


def generate(model, tokenizer, prompts: Sequence[str], *, images=None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stop_ids: Sequence[int] | None = None, chat: bool | None = None,
             pan_and_scan: bool = False) -> list[str]:
    """Completions of `prompts`, each starting with <bos>.

    `chat=True` wraps each prompt as a user turn and opens the model turn (Gemma's chat template);
    `chat=False` continues the raw text; None (the default) = True, except for PaliGemma, which is not a
    chat model (its prompt is the raw prefix; `chat=True` there is a VisionPromptError).
    `images` (vision models): one entry per prompt, a list of its images (paths, PIL images or preprocessed
    arrays [S, S, 3] in [−1, 1]), laid out as `gemma_tune.vision_prompt` describes: PaliGemma's images
    before <bos>, Gemma 3's at the prompt's `<start_of_image>` markers (one per image) or before its text.
    `pan_and_scan` (Gemma 3): each image also as its pan-and-scan crops, as the processor's do_pan_and_scan
    and `data.pan_and_scan` lay them out (`vision_prompt.with_pan_and_scan`).
    `stop_ids` default: <end_of_turn> and <eos>; <eos> alone for PaliGemma. Generated ids outside the
    tokenizer's vocabulary (a model's unused rows) are left out of the text."""
    arch = model.architecture
    rows = vision_prompt.images_per_prompt(arch, images, len(prompts))
    if pan_and_scan and rows:
        scanned = [vision_prompt.with_pan_and_scan(arch, p, row) for p, row in zip(prompts, rows)]
        prompts, rows = [p for p, _ in scanned], [row for _, row in scanned]
    if chat is None:
        chat = not arch.prefix_lm
    if stop_ids is None:
        stop_ids = (tokenizer.eos_id,) if arch.prefix_lm else (tokenizer.end_of_turn_id, tokenizer.eos_id)
    prompt_ids = [vision_prompt.prompt_ids(tokenizer, arch, p, len(rows[b]) if rows else 0, chat)
                  for b, p in enumerate(prompts)]
    new_ids = generate_ids(model, prompt_ids, images=rows, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seed, stop_ids=stop_ids, pad_id=tokenizer.pad_id)
    return [tokenizer.decode([i for i in ids if i < tokenizer.vocab_size]) for ids in new_ids]
