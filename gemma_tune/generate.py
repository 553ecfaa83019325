"""Text generation with a KV cache: greedy, temperature, top-k and top-p sampling, batched prompts, images.

The tokens come from `gemma_tune.sampling.sample`, one compiled loop on the device (prefill, then a while
loop over the new tokens). Prompts of different lengths are left-padded to the longest, P tokens; the cache
holds P + max_new_tokens slots. Each row's positions count its real tokens only (0 … L_b − 1 for the prompt,
then L_b, L_b + 1, …), padding slots are masked out as keys, so a padded row decodes exactly as it would
alone.

Vision models (PaliGemma, Gemma 3 4B and larger) take images with the prompts, one list per prompt; the
prompt layouts (what transformers' processors build) and the pixels are in `gemma_tune.vision_prompt`. The
prefill passes the images [B, N, S, S, 3] (a row with fewer than N images padded with zeros, which no slot
reads) and the attention blocks of the cache slots (PaliGemma: the whole prompt is one bidirectional prefix;
Gemma 3: each image's slots; padding and generated slots 0, causal); decoding steps pass neither (the cache
holds the images' keys and values, and a generated token attends causally).

Sampling of the next token from logits z (float32, on the device; `gemma_tune.sampling.next_tokens`):
    greedy (temperature == 0): argmax z
    else: z / temperature; keep the top_k largest; keep the smallest set of tokens whose probability
    sums to ≥ top_p (always the most likely one); sample from the renormalised softmax (by inverse CDF
    with uniforms drawn on the host from `seed`, so a seed gives the same tokens on every backend).
A row stops at its first stop id (<end_of_turn> and <eos> by default; <eos> alone for PaliGemma); stop ids
are not returned.
"""

from __future__ import annotations

from collections.abc import Sequence

from gemma_tune import vision_prompt
from gemma_tune.sampling import sample
from gemma_tune.vision_prompt import CHAT_PROMPT  # noqa: F401 - the chat template, public here too


def generate_ids(model, prompt_ids: Sequence[Sequence[int]], *, images=None, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed=0, stop_ids: Sequence[int] = (), pad_id: int = 0) -> list[list[int]]:
    """New token ids for each prompt (token ids, bos included if wanted), stop ids excluded: the tokens of
    `gemma_tune.sampling.sample` up to each row's stop id (arguments as there).

    `images` (vision models): None, or one entry per prompt — a list of its images (paths, PIL images or
    preprocessed arrays [S, S, 3] in [−1, 1]; `vision_prompt.image_array`), an array [N, S, S, 3], or one
    image. A prompt holds `tokens_per_image` slots of `image_token_id` per image, laid out as
    `vision_prompt.prompt_ids` does (else a VisionPromptError); images for a model without a vision encoder
    are a VisionPromptError, an image that cannot be read an ImageError naming it."""
    out = sample(model, prompt_ids, images=images, max_new_tokens=max_new_tokens, temperature=temperature,
                 top_k=top_k, top_p=top_p, seed=seed, stop_ids=stop_ids, pad_id=pad_id)
    return [row[:length - int(stopped)].tolist() for row, length, stopped in zip(out.tokens, out.lengths, out.stopped)]


def generate(model, tokenizer, prompts: Sequence[str], *, images=None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed=0,
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
