"""Preference data: implicit prompts, labels on the responses only, truncation that keeps the prompt's start,
and pairs left out (prompt too long, identical) counted in the stats."""

import json
import logging
from pathlib import Path

import pytest

from gemma_tune.config.schema import DataSection
from gemma_tune.data import prepare
from gemma_tune.data.pack import truncate_pair
from gemma_tune.data.render import Tokenise
from gemma_tune.errors import DataError

PAIR_KEYS = ("input_ids", "labels")


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def section(path, **kw):
    return DataSection(train={"path": str(path), "format": "preference"}, **kw)


def render(tok, row, loss_on="completion"):
    return Tokenise(str(tok.model_path), "preference", "chat", loss_on)(row)


def turn(role, content):
    return {"role": role, "content": content}


def conversation(*turns):
    """Messages from alternating user/assistant contents, starting with the user."""
    return [turn("user" if i % 2 == 0 else "assistant", c) for i, c in enumerate(turns)]


def trained_text(tok, out, prefix):
    ids = [i for i, label in zip(out[prefix + "input_ids"], out[prefix + "labels"]) if label]
    return tok.decode(ids)


def prompt_length(tok, row):
    """Tokens before the first response token: the prompt and its model-turn opener."""
    return render(tok, row)["chosen_labels"].index(1)


# -- the implicit prompt ------------------------------------------------------------------------------------

@pytest.mark.parametrize("implicit,explicit", [
    ({"chosen": conversation("Is 4 even?", "Yes."), "rejected": conversation("Is 4 even?", "No.")},
     {"prompt": "Is 4 even?", "chosen": "Yes.", "rejected": "No."}),
    # a null prompt column is an implicit prompt too
    ({"prompt": None, "chosen": conversation("Is 4 even?", "Yes."), "rejected": conversation("Is 4 even?", "No.")},
     {"prompt": "Is 4 even?", "chosen": "Yes.", "rejected": "No."}),
    # shared turns (system, an earlier exchange) are all prompt; the model turn after them is the response
    ({"chosen": [turn("system", "Be brief.")] + conversation("Hi", "Hello.", "Is 4 even?", "Yes."),
      "rejected": [turn("system", "Be brief.")] + conversation("Hi", "Hello.", "Is 4 even?", "No.")},
     {"prompt": [turn("system", "Be brief.")] + conversation("Hi", "Hello.", "Is 4 even?"),
      "chosen": [turn("assistant", "Yes.")], "rejected": [turn("model", "No.")]}),
    # the responses may go on for several turns
    ({"chosen": conversation("Is 4 even?", "Yes.", "Sure?", "Sure."),
      "rejected": conversation("Is 4 even?", "No.", "Sure?", "Yes.")},
     {"prompt": "Is 4 even?", "chosen": conversation("Is 4 even?", "Yes.", "Sure?", "Sure.")[1:],
      "rejected": conversation("Is 4 even?", "No.", "Sure?", "Yes.")[1:]}),
    # HuggingFaceH4/ultrafeedback_binarized: a prompt column and responses that repeat it
    ({"prompt": "Is 4 even?", "chosen": conversation(" Is 4 even? ", "Yes."),
      "rejected": conversation("Is 4 even?", "No.")},
     {"prompt": "Is 4 even?", "chosen": "Yes.", "rejected": "No."}),
])
def test_implicit_prompt_renders_as_the_explicit_one(tok, implicit, explicit):
    out = render(tok, implicit)
    assert out["error"] == ""
    assert out == render(tok, explicit)
    assert trained_text(tok, out, "chosen_").startswith("Yes.<end_of_turn>")


@pytest.mark.parametrize("row,message", [
    ({"chosen": conversation("Is 4 even?", "Yes."), "rejected": conversation("Is 5 even?", "No.")},
     "chosen and rejected share no opening turn"),
    ({"chosen": conversation("Hi", "Hello.", "Is 4 even?", "Yes."),
      "rejected": conversation("Hi", "Hello.", "Bye", "No.")},
     "the opening turns chosen and rejected share (2) end with 'assistant', not a user turn"),
    ({"chosen": [turn("system", "S")] + conversation("a", "b"),
      "rejected": [turn("system", "S")] + conversation("c", "d")},
     "the opening turns chosen and rejected share (1) end with 'system'"),
    ({"chosen": "\n\nHuman: Is 4 even?\n\nAssistant: Yes.", "rejected": "\n\nHuman: Is 4 even?\n\nAssistant: No."},
     "'chosen' is a string but the row has no prompt"),
    ({"prompt": None, "chosen": conversation("Is 4 even?", "Yes.")}, "missing column 'rejected'"),
])
def test_implicit_prompt_errors_say_what_was_expected(tok, row, message):
    assert message in render(tok, row)["error"]


def test_the_same_conversation_twice_splits_at_its_last_user_turn(tok):
    same = conversation("Hi", "Hello.", "Is 4 even?", "Yes.")
    out = render(tok, {"chosen": same, "rejected": same})
    assert out["error"] == "" and trained_text(tok, out, "rejected_") == "Yes.<end_of_turn>"


# -- labels -------------------------------------------------------------------------------------------------

def test_preference_labels_are_the_responses_whatever_loss_on(tok, cache, tmp_path):
    row = {"prompt": conversation("Hi", "Hello.", "Is 4 even?"), "chosen": "Yes.", "rejected": "No."}
    everything, completion = render(tok, row, loss_on="all"), render(tok, row)
    assert everything == completion
    assert trained_text(tok, everything, "chosen_") == "Yes.<end_of_turn>"
    assert trained_text(tok, everything, "rejected_") == "No.<end_of_turn>"
    path = write(tmp_path / "labels.jsonl", [row])
    stats = [prepare(section(path, loss_on=mode, max_length=64), tok, seed=0, cache_dir=cache).stats["train"]
             for mode in ("completion", "all")]
    assert stats[0]["trained_tokens"] == stats[1]["trained_tokens"] == len(tok.encode("Yes.<end_of_turn>")) + len(
        tok.encode("No.<end_of_turn>"))


# -- prepare --------------------------------------------------------------------------------------------------

def test_data_with_only_chosen_and_rejected_prepares_as_with_a_prompt(tok, cache, tmp_path):
    bundled = [json.loads(line) for line in Path("data/tiny/preference_implicit.jsonl").read_text().splitlines()]
    explicit = []
    for row in bundled:  # the same pairs, with the prompt in its own column
        n = len(row["chosen"]) - 1
        explicit.append({"prompt": row["chosen"][:n], "chosen": row["chosen"][n:], "rejected": row["rejected"][n:]})
    a = prepare(section("data/tiny/preference_implicit.jsonl", max_length=96), tok, seed=0, cache_dir=cache)
    b = prepare(section(write(tmp_path / "explicit.jsonl", explicit), max_length=96), tok, seed=0, cache_dir=cache)
    assert a.stats["train"] == b.stats["train"] and a.stats["train"]["sequences"] == len(bundled) == 40
    for key, array in a.train.arrays.items():
        assert (b.train.arrays[key] == array).all()


def test_a_bad_implicit_row_is_a_data_error_naming_file_and_row(tok, cache, tmp_path):
    rows = [{"chosen": conversation("Is 4 even?", "Yes."), "rejected": conversation("Is 4 even?", "No.")},
            {"chosen": conversation("Is 4 even?", "Yes."), "rejected": conversation("Is 5 even?", "No.")}]
    path = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match="share no opening turn") as e:
        prepare(section(path), tok, seed=0, cache_dir=cache)
    assert e.value.where == f"{path}: row 2"
    missing = write(tmp_path / "missing.jsonl", [{"prompt": "p", "chosen": "c"}])
    with pytest.raises(DataError, match=r"needs columns \['rejected'\]"):
        prepare(section(missing), tok, seed=0, cache_dir=cache)


@pytest.mark.parametrize("mode", ["right", "left", "drop"])
def test_preference_truncation_keeps_the_prompt_start_whatever_truncation_says(tok, cache, tmp_path, mode):
    long = " ".join(["blue sky"] * 40)
    rows = [{"prompt": "Say it.", "chosen": "Yes, " + long, "rejected": "No, " + long},
            {"prompt": "Is 4 even?", "chosen": "Yes.", "rejected": "No."}]
    out = prepare(section(write(tmp_path / "long.jsonl", rows), max_length=24, truncation=mode), tok, seed=0,
                  cache_dir=cache)
    s = out.stats["train"]
    assert (s["truncated"], s["dropped"], s["prompt_too_long"], s["identical"], s["sequences"]) == (2, 0, 0, 0, 2)
    ids = out.train.arrays["chosen_token_ids"]
    cut = next(row for row in ids.tolist() if 0 not in row)  # the long pair fills all 24 slots
    first = render(tok, rows[0])["chosen_input_ids"]
    assert cut == first[:24]  # the start, prompt included; the response is cut at the end


def test_pairs_whose_prompt_reaches_max_length_are_dropped_and_counted(tok, cache, tmp_path, caplog):
    long_prompt = {"prompt": " ".join(["red cat"] * 10), "chosen": "Yes.", "rejected": "No."}
    short = {"prompt": "Hi", "chosen": "Yo.", "rejected": "No."}
    path = write(tmp_path / "prompt.jsonl", [long_prompt, short])
    n = prompt_length(tok, long_prompt)
    with caplog.at_level(logging.INFO, logger="gemma_tune.data"):
        out = prepare(section(path, max_length=n), tok, seed=0, cache_dir=cache)
    s = out.stats["train"]
    assert (s["prompt_too_long"], s["identical"], s["dropped"], s["sequences"], s["rows"]) == (1, 0, 0, 1, 2)
    assert f"dropped 1 preference pairs whose prompt alone reaches max_length={n}" in caplog.text
    assert "1 prompt too long, 0 identical" in caplog.text
    kept = prepare(section(path, max_length=n + 1), tok, seed=0, cache_dir=cache)
    assert kept.stats["train"]["prompt_too_long"] == 0  # one response token left: one trained target
    rows = kept.train.arrays
    longest = int((rows["chosen_segment_ids"] > 0).sum(axis=1).argmax())
    assert [rows[p + "loss_mask"][longest].sum() for p in ("chosen_", "rejected_")] == [1, 1]


def test_truncate_pair_drops_only_when_no_response_token_remains():
    prompt = ([2, 5, 6], [0, 0, 0])
    chosen, rejected = (prompt[0] + [7, 8], prompt[1] + [1, 1]), (prompt[0] + [9], prompt[1] + [1])
    assert truncate_pair(chosen, rejected, 3) is None
    assert truncate_pair(chosen, rejected, 4) == (([2, 5, 6, 7], [0, 0, 0, 1]), ([2, 5, 6, 9], [0, 0, 0, 1]))
    assert truncate_pair(chosen, rejected, 9) == (chosen, rejected)


def test_identical_pairs_are_skipped_and_counted(tok, cache, tmp_path, caplog):
    same = conversation("Is 4 even?", "Yes.")
    long = " ".join(["blue sky"] * 40)
    rows = [{"prompt": "Is 4 even?", "chosen": "Yes.", "rejected": " Yes. "},  # the same tokens once rendered
            {"chosen": same, "rejected": same},
            {"prompt": "Say it.", "chosen": long + " a", "rejected": long + " b"},  # the same within max_length
            {"prompt": "Is 4 even?", "chosen": "Yes.", "rejected": "No."}]
    with caplog.at_level(logging.WARNING, logger="gemma_tune.data"):
        out = prepare(section(write(tmp_path / "same.jsonl", rows), max_length=32), tok, seed=0, cache_dir=cache)
    s = out.stats["train"]
    assert (s["identical"], s["prompt_too_long"], s["sequences"], len(out.train)) == (3, 0, 1, 1)
    assert "skipped 3 preference pairs whose chosen and rejected are the same tokens" in caplog.text


def test_a_split_without_any_pair_left_is_a_data_error(tok, cache, tmp_path):
    rows = [{"prompt": " ".join(["red cat"] * 10), "chosen": "Yes.", "rejected": "No."},
            {"prompt": "Hi", "chosen": "Yo.", "rejected": "Yo."}]
    path = write(tmp_path / "none.jsonl", rows)
    n = prompt_length(tok, rows[0])
    with pytest.raises(DataError, match=rf"no rows left of 2: 1 with a prompt that alone reaches max_length={n}; "
                                        "1 with the same chosen and rejected tokens") as e:
        prepare(section(path, max_length=n), tok, seed=0, cache_dir=cache)
    assert e.value.where == path
