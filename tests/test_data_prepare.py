"""prepare(): loading, column remapping, eval splits, invalid rows, truncation, packing, caching."""

import json
import logging

import numpy as np
import pytest

from gemma_tune.config.schema import DataSection
from gemma_tune.data import prepare
from gemma_tune.errors import DataError


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def section(path, fmt="chat", **kw):
    source = {"path": path, "format": fmt, **kw.pop("source", {})}
    return DataSection(train=source, **kw)


def chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def test_bundled_chat_packs_with_stats(tok, cache):
    data = section("data/tiny/chat.jsonl", eval={"path": "data/tiny/chat_eval.jsonl", "format": "chat"},
                   max_length=128)
    out = prepare(data, tok, seed=0, cache_dir=cache)
    s = out.stats["train"]
    assert (s["rows"], s["invalid"], s["truncated"], s["sequences"]) == (400, 0, 0, 400)
    assert (s["prompt_too_long"], s["identical"]) == (0, 0)  # the preference counts are 0 for other formats
    assert 0.9 < s["packing_efficiency"] <= 1.0
    assert s["packing_efficiency"] == pytest.approx(s["tokens"] / (s["rows_out"] * 128))
    assert len(out.train) == s["rows_out"] < 400 and out.stats["eval"]["rows"] == 60
    batch = next(out.train.batches(8, seed=0))
    assert set(batch) == {"token_ids", "segment_ids", "positions", "target_ids", "loss_mask"}
    assert all(v.shape == (8, 128) for v in batch.values())
    assert int(out.train.arrays["loss_mask"].sum()) == s["trained_tokens"]
    # every trained target is in a model turn: decoding them gives answers each ending with <end_of_turn>
    first = out.train.arrays
    trained = first["target_ids"][0][first["loss_mask"][0] > 0]
    assert tok.decode(trained).endswith("<end_of_turn>")


@pytest.mark.parametrize("fmt,path", [("text", "text.jsonl"), ("prompt_completion", "prompt_completion.jsonl")])
def test_bundled_formats_unpacked(tok, cache, fmt, path):
    out = prepare(section(f"data/tiny/{path}", fmt, max_length=64, packing=False, eval_fraction=0.1), tok,
                  seed=1, cache_dir=cache)
    assert (out.stats["train"]["rows"], out.stats["eval"]["rows"]) == (270, 30)
    assert len(out.train) == 270 and out.stats["train"]["rows_out"] == 270
    seg = out.train.arrays["segment_ids"]
    assert set(np.unique(seg)) == {0, 1}  # one sequence per row


def test_eval_fraction_is_deterministic_by_seed(tok, cache):
    def eval_rows(seed):
        out = prepare(section("data/tiny/prompt_completion.jsonl", "prompt_completion", max_length=64,
                              packing=False, eval_fraction=0.1), tok, seed=seed, cache_dir=cache)
        return out.eval.arrays["token_ids"].tolist()
    assert eval_rows(0) == eval_rows(0) != eval_rows(1)


def test_preference_pairs_stay_together(tok, cache):
    out = prepare(section("data/tiny/preference.jsonl", "preference", max_length=64), tok, seed=0, cache_dir=cache)
    batch = next(out.train.batches(4, seed=0))
    assert set(batch) == {p + k for p in ("chosen_", "rejected_") for k in
                          ("token_ids", "segment_ids", "positions", "target_ids", "loss_mask")}
    for c, r in zip(out.train.arrays["chosen_token_ids"], out.train.arrays["rejected_token_ids"]):
        prompt_end = list(c).index(tok.token_to_id("model"))  # same prompt in both halves, different answers
        assert (c[:prompt_end] == r[:prompt_end]).all() and not (c == r).all()
    s = out.stats["train"]
    # row 173 of the bundled file has the same chosen and rejected answer: skipped as identical
    assert (s["rows"], s["identical"], s["prompt_too_long"], s["sequences"]) == (300, 1, 0, 299)


def test_column_remapping_and_parquet_directory(tok, cache, tmp_path):
    import datasets
    rows = [{"question": f"What is {i} plus 1?", "answer": f"{i} plus 1 is {i + 1}.", "extra": i} for i in range(5)]
    folder = tmp_path / "pq"
    folder.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "part-0.parquet"))
    data = section(str(folder), "prompt_completion", max_length=64,
                   source={"columns": {"prompt": "question", "completion": "answer"}})
    out = prepare(data, tok, seed=0, cache_dir=cache)
    assert out.stats["train"]["sequences"] == 5
    trained = out.train.arrays["target_ids"][out.train.arrays["loss_mask"] > 0]
    assert "0 plus 1 is 1.<end_of_turn>" in tok.decode(trained)
    with pytest.raises(DataError, match="needs columns") as e:
        prepare(section(str(folder), "prompt_completion"), tok, seed=0, cache_dir=cache)
    assert e.value.where == str(folder)
    with pytest.raises(DataError, match=r"\['nope'\]"):
        prepare(section(str(folder), "prompt_completion", source={"columns": {"prompt": "nope"}}), tok, 0, cache)


def test_invalid_rows_stop_with_row_number_or_are_skipped(tok, cache, tmp_path, caplog):
    rows = [chat("Hi", "Yo"), {"messages": [{"role": "user", "content": "Hi"}]}, chat("a", "b"),
            chat("c", "")]
    path = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match="end with a model turn.*1 more invalid") as e:
        prepare(section(path), tok, seed=0, cache_dir=cache)
    assert e.value.where == f"{path}: row 2"
    with caplog.at_level(logging.WARNING, logger="gemma_tune.data"):
        out = prepare(section(path, skip_invalid=True), tok, seed=0, cache_dir=cache)
    assert out.stats["train"]["invalid"] == 2 and out.stats["train"]["rows"] == 2
    assert "skipped 2 invalid rows (rows 2, 4)" in caplog.text


def test_empty_and_single_row(tok, cache, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError) as e:
        prepare(section(str(empty)), tok, seed=0, cache_dir=cache)
    assert str(empty) in str(e.value)
    one = write(tmp_path / "one.jsonl", [chat("What is 1 plus 1?", "1 plus 1 is 2.")])
    out = prepare(section(one, max_length=32), tok, seed=0, cache_dir=cache)
    assert len(out.train) == 1 and out.train.steps_per_epoch(4) == 1
    batch = next(out.train.batches(4, seed=0))
    assert batch["segment_ids"][1:].sum() == 0 and batch["loss_mask"][0].sum() > 0


@pytest.mark.parametrize("mode", ["right", "left", "drop"])
def test_sequence_longer_than_max_length(tok, cache, tmp_path, mode):
    long_answer = " ".join(["blue sky"] * 40)
    path = write(tmp_path / f"long_{mode}.jsonl", [chat("Say it.", long_answer), chat("Hi", "Yo")])
    out = prepare(section(path, max_length=24, truncation=mode, packing=False), tok, seed=0, cache_dir=cache)
    s = out.stats["train"]
    assert s["truncated"] == 1 and s["dropped"] == (1 if mode == "drop" else 0)
    ids = out.train.arrays["token_ids"]
    full_first = [tok.bos_id, tok.start_of_turn_id]
    if mode == "drop":
        assert len(out.train) == 1 and tok.decode(ids[0]).endswith("model\nYo<end_of_turn>\n")
    else:
        long_row = ids[[i for i in range(2) if (ids[i] > 0).sum() == 24][0]]
        if mode == "right":
            assert long_row[:2].tolist() == full_first
        else:
            assert long_row[-2:].tolist() == [tok.end_of_turn_id, tok.token_to_id("\n")]
    only_long = write(tmp_path / f"only_long_{mode}.jsonl", [chat("Say it.", long_answer)])
    if mode == "drop":
        with pytest.raises(DataError, match="no rows left"):
            prepare(section(only_long, max_length=24, truncation=mode), tok, seed=0, cache_dir=cache)


def test_tokenisation_is_cached_by_settings(tok, cache, tmp_path):
    path = write(tmp_path / "c.jsonl", [chat(f"q{i}", f"a{i}") for i in range(6)])
    a = prepare(section(path, loss_on="completion"), tok, seed=0, cache_dir=cache)
    b = prepare(section(path, loss_on="all"), tok, seed=0, cache_dir=cache)
    assert a.stats["train"]["trained_tokens"] < b.stats["train"]["trained_tokens"]
    from pathlib import Path
    files = {f: f.stat().st_mtime_ns for f in Path(cache).glob("**/cache-*.arrow")}
    assert files  # map results are written to the datasets cache …
    cached = prepare(section(path, loss_on="completion"), tok, seed=0, cache_dir=cache)
    assert cached.stats == a.stats
    # … and reused, not recomputed
    assert {f: f.stat().st_mtime_ns for f in Path(cache).glob("**/cache-*.arrow")} == files


def test_parallel_tokenisation_matches_serial(tok, cache):
    serial = prepare(section("data/tiny/chat_eval.jsonl", max_length=128), tok, seed=0)
    parallel = prepare(section("data/tiny/chat_eval.jsonl", max_length=128, num_proc=2), tok, seed=0,
                       cache_dir=cache)
    for key, array in serial.train.arrays.items():
        assert (parallel.train.arrays[key] == array).all()


def test_unreadable_sources(tok, cache, tmp_path):
    with pytest.raises(DataError, match="cannot load data") as e:
        prepare(section("hf://no-such-org/no-such-dataset"), tok, seed=0, cache_dir=cache)
    assert e.value.where == "hf://no-such-org/no-such-dataset"
    with pytest.raises(DataError, match="no such data file"):
        prepare(section(str(tmp_path / "absent.jsonl")), tok, seed=0, cache_dir=cache)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match="not valid JSON") as e:
        prepare(section(str(broken), "text"), tok, seed=0, cache_dir=cache)
    assert e.value.where == f"{broken}:2"


def test_truncation_that_cuts_off_the_answer_is_reported(tok, cache, tmp_path, caplog):
    long_prompt = " ".join(["red cat"] * 40)
    path = write(tmp_path / "cut.jsonl", [chat(long_prompt, "Yes."), chat("Hi", "Yo")])
    with caplog.at_level(logging.WARNING, logger="gemma_tune.data"):
        out = prepare(section(path, max_length=24, truncation="right"), tok, seed=0, cache_dir=cache)
    assert out.stats["train"]["without_loss"] == 1 and out.stats["train"]["truncated"] == 1
    assert "1 sequences have no trained token" in caplog.text
    left = prepare(section(path, max_length=24, truncation="left"), tok, seed=0, cache_dir=cache)
    assert left.stats["train"]["without_loss"] == 0  # left truncation keeps the answer
