"""Prompt data for online RL (`format: prompt`): chat-templated prompts ending with the opened model turn (the
layout generation uses), the rows' other columns kept for the reward functions, prompts over max_length left
out and counted, and rounds of prompts that a resumed run continues exactly."""

import json

import numpy as np
import pytest

from gemma_tune.config.presets import preset_architecture
from gemma_tune.config.schema import DataSection
from gemma_tune.data import prepare
from gemma_tune.errors import DataError
from gemma_tune.vision_prompt import prompt_ids


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rows_of(n):
    return [{"prompt": f"What is {i} plus 1?", "answer": str(i + 1), "level": i % 3} for i in range(n)]


def test_prompts_render_as_generation_prompts_and_keep_their_columns(tmp_path, tok, cache):
    rows = rows_of(3) + [{"prompt": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Name a colour."}], "answer": "red", "level": 9}]
    data = prepare(DataSection(train={"path": write(tmp_path / "p.jsonl", rows), "format": "prompt"}, max_length=64),
                   tok, seed=0, cache_dir=cache)
    split = data.train
    assert len(split) == 4
    arch = preset_architecture("gemma3_tiny")
    for i in range(3):  # exactly what generate() feeds the model for the same prompt
        assert split.ids[i] == prompt_ids(tok, arch, rows[i]["prompt"], 0, chat=True)
    assert tok.decode(split.ids[3][1:]) == ("<start_of_turn>user\nBe brief.\n\nName a colour.<end_of_turn>\n"
                                            "<start_of_turn>model\n")
    assert split.prompts == [r["prompt"] for r in rows]
    assert split.columns == {"answer": ["1", "2", "3", "red"], "level": [0, 1, 2, 9]}
    assert data.stats["train"]["prompt_too_long"] == 0 and data.stats["train"]["sequences"] == 4


def test_system_message_for_every_prompt(tmp_path, tok, cache):
    section = DataSection(train={"path": write(tmp_path / "p.jsonl", rows_of(1)), "format": "prompt",
                                 "system": "Answer with a number."}, max_length=64)
    ids = prepare(section, tok, seed=0, cache_dir=cache).train.ids[0]
    assert tok.decode(ids[1:]) == ("<start_of_turn>user\nAnswer with a number.\n\nWhat is 0 plus 1?<end_of_turn>\n"
                                   "<start_of_turn>model\n")


def test_long_prompts_are_left_out_and_counted(tmp_path, tok, cache, caplog):
    rows = rows_of(2) + [{"prompt": "word " * 80, "answer": "x", "level": 0}]
    data = prepare(DataSection(train={"path": write(tmp_path / "p.jsonl", rows), "format": "prompt"}, max_length=20),
                   tok, seed=0, cache_dir=cache)
    assert len(data.train) == 2 and data.train.columns["answer"] == ["1", "2"]
    assert data.stats["train"]["prompt_too_long"] == 1
    with pytest.raises(DataError, match="all 1 prompts are longer than data.max_length=4"):
        prepare(DataSection(train={"path": write(tmp_path / "q.jsonl", rows_of(1)), "format": "prompt"},
                            max_length=4), tok, seed=0, cache_dir=cache)


@pytest.mark.parametrize("prompt, problem", [
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], "must end with a user turn"),
    (None, "missing column 'prompt'"),
])
def test_bad_prompts_are_row_errors(tmp_path, tok, cache, prompt, problem):
    path = write(tmp_path / "p.jsonl", [{"prompt": prompt, "answer": "1"}])
    with pytest.raises(DataError, match=problem) as info:
        prepare(DataSection(train={"path": path, "format": "prompt"}, max_length=64), tok, seed=0, cache_dir=cache)
    assert "row 1" in str(info.value)


def test_rounds_are_deterministic_cover_every_prompt_and_resume(tmp_path, tok, cache):
    split = prepare(DataSection(train={"path": write(tmp_path / "p.jsonl", rows_of(10)), "format": "prompt"},
                                max_length=64), tok, seed=0, cache_dir=cache).train
    rounds = [split.round_rows(4, seed=7, round_index=r) for r in range(5)]  # 20 prompts: two epochs
    flat = np.concatenate(rounds)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert all(np.array_equal(split.round_rows(4, 7, r), rounds[r]) for r in range(5))  # a resumed run's
    assert not np.array_equal(split.round_rows(4, 8, 0), rounds[0])  # another seed, another order
    batch = split.take(rounds[0])
    assert batch.columns["answer"] == [split.columns["answer"][r] for r in rounds[0]]
