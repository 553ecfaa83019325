"""KV-cache generation: batching, seeds, stop ids, the chat template, the CLI (the sampling rule itself:
tests/test_sampling.py)."""

from __future__ import annotations

import numpy as np
import pytest

from gemma_tune.cli import main
from gemma_tune.config.presets import preset_architecture
from gemma_tune.generate import generate, generate_ids
from gemma_tune.models import build_model
from gemma_tune.tokenizer import load_tokenizer

TOKENIZER = "data/tiny/tokenizer.model"


@pytest.fixture(scope="module")
def model():
    m = build_model(preset_architecture("gemma3_tiny", num_layers=3, sliding_window_pattern=3, sliding_window=8))
    rng = np.random.default_rng(1)
    for v in m.weights:
        v.assign(rng.normal(0.0, 0.3, v.shape).astype("float32"))
    return m


def greedy_by_full_forward(model, prompt, steps):
    """Greedy decoding without a cache: the whole sequence each step, right-padded to one width."""
    width = len(prompt) + steps
    seq = list(prompt)
    for _ in range(steps):
        ids = np.zeros((1, width), "int32")
        ids[0, :len(seq)] = seq
        mask = (np.arange(width) < len(seq))[None].astype("int32")
        logits = model.predict_on_batch({"token_ids": ids, "padding_mask": mask})
        seq.append(int(np.asarray(logits)[0, len(seq) - 1].argmax()))
    return seq[len(prompt):]


def test_batched_prompts_of_different_lengths_decode_as_alone(model):
    prompts = [[2] + list(range(20, 33)), [2, 7, 8]]  # 14 + 6 tokens > the sliding window of 8
    out = generate_ids(model, prompts, max_new_tokens=6)
    assert out == [greedy_by_full_forward(model, p, 6) for p in prompts]


def test_sampling_is_seeded_and_stops_at_stop_ids(model):
    prompts = [[2, 40, 41, 42]]
    a = generate_ids(model, prompts, max_new_tokens=8, temperature=1.0, seed=3)
    assert a == generate_ids(model, prompts, max_new_tokens=8, temperature=1.0, seed=3)
    greedy = generate_ids(model, prompts, max_new_tokens=8)[0]
    assert generate_ids(model, prompts, max_new_tokens=8, stop_ids=[greedy[2]])[0] == greedy[:greedy.index(greedy[2])]
    with pytest.raises(ValueError):
        generate_ids(model, [[]], max_new_tokens=2)


def test_generate_text_uses_the_chat_template(model):
    tokenizer = load_tokenizer(TOKENIZER)
    texts = generate(model, tokenizer, ["What is 2 plus 3?", "hi"], max_new_tokens=4)
    chat_ids = [tokenizer.bos_id] + tokenizer.encode(
        "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n")
    expected = generate_ids(model, [chat_ids], max_new_tokens=4,
                            stop_ids=(tokenizer.end_of_turn_id, tokenizer.eos_id))[0]
    assert texts[1] == tokenizer.decode(expected)


def test_cli_generate(model, tmp_path, capsys):
    from gemma_tune.export import export_model

    out = export_model(model, load_tokenizer(TOKENIZER), tmp_path / "hf", "safetensors")
    assert main(["generate", str(out), "--prompt", "hello", "--prompt", "What is 2 plus 3?",
                 "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    assert "### hello" in printed and "### What is 2 plus 3?" in printed
    assert main(["generate", str(out), "--prompt", "x", "--temperature", "-1"]) == 2
    assert "--temperature" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
