"""Rendering with Gemma's chat template and loss labels, token by token, for every format."""

import pytest

from gemma_tune.data.render import Tokenise
from gemma_tune.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("data/tiny/tokenizer.model")


def render(tok, row, fmt="chat", template="chat", loss_on="completion"):
    return Tokenise(str(tok.model_path), fmt, template, loss_on)(row)


def expected(tok, parts):
    """(ids, labels) of hand-written (text or id, trained) parts, each tokenised on its own."""
    ids, labels = [], []
    for part, trained in parts:
        piece = [part] if isinstance(part, int) else tok.encode(part)
        ids += piece
        labels += [trained] * len(piece)
    return ids, labels


def check(tok, out, parts, text, prefix=""):
    ids, labels = expected(tok, parts)
    assert out["error"] == ""
    assert out[prefix + "input_ids"] == ids
    assert out[prefix + "labels"] == labels
    assert tok.decode(out[prefix + "input_ids"]) == text  # decode drops <bos>/<eos> (control pieces)


def test_single_turn_chat_trains_content_and_end_of_turn_only(tok):
    row = {"messages": [{"role": "user", "content": "What is 2 plus 3?"},
                        {"role": "assistant", "content": "2 plus 3 is 5."}]}
    out = render(tok, row)
    check(tok, out, [(tok.bos_id, 0), ("<start_of_turn>", 0), ("user\nWhat is 2 plus 3?", 0),
                     ("<end_of_turn>", 0), ("\n", 0), ("<start_of_turn>", 0), ("model\n", 0),
                     ("2 plus 3 is 5.", 1), ("<end_of_turn>", 1), ("\n", 0)],
          "<start_of_turn>user\nWhat is 2 plus 3?<end_of_turn>\n<start_of_turn>model\n2 plus 3 is 5.<end_of_turn>\n")
    # the newline after <end_of_turn> is not trained, <end_of_turn> is
    assert out["labels"][-2:] == [1, 0] and out["input_ids"][-2] == tok.end_of_turn_id


def test_multi_turn_with_system_message(tok):
    row = {"messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": " Hi\n"}, {"role": "model", "content": " Hello. "},
                        {"role": "user", "content": "Colour of sky?"}, {"role": "assistant", "content": "Blue."}]}
    out = render(tok, row)
    text = ("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
            "<start_of_turn>user\nColour of sky?<end_of_turn>\n<start_of_turn>model\nBlue.<end_of_turn>\n")
    check(tok, out, [(tok.bos_id, 0), ("<start_of_turn>", 0), ("user\nBe brief.\n\nHi", 0), ("<end_of_turn>", 0),
                     ("\n", 0), ("<start_of_turn>", 0), ("model\n", 0), ("Hello.", 1), ("<end_of_turn>", 1),
                     ("\n", 0), ("<start_of_turn>", 0), ("user\nColour of sky?", 0), ("<end_of_turn>", 0),
                     ("\n", 0), ("<start_of_turn>", 0), ("model\n", 0), ("Blue.", 1), ("<end_of_turn>", 1),
                     ("\n", 0)], text)


def test_loss_on_all_trains_every_token(tok):
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "model", "content": "Yo"}]}
    out = render(tok, row, loss_on="all")
    assert set(out["labels"]) == {1} and len(out["labels"]) == len(out["input_ids"])


def test_text_format_is_bos_text_eos_all_trained(tok):
    out = render(tok, {"text": "A cat meows."}, fmt="text")
    check(tok, out, [(tok.bos_id, 1), ("A cat meows.", 1), (tok.eos_id, 1)], "A cat meows.")


def test_prompt_completion_chat_and_raw(tok):
    row = {"prompt": "Write 3 as a word.", "completion": "3 is written three."}
    check(tok, render(tok, row, fmt="prompt_completion"),
          [(tok.bos_id, 0), ("<start_of_turn>", 0), ("user\nWrite 3 as a word.", 0), ("<end_of_turn>", 0),
           ("\n", 0), ("<start_of_turn>", 0), ("model\n", 0), ("3 is written three.", 1), ("<end_of_turn>", 1),
           ("\n", 0)],
          "<start_of_turn>user\nWrite 3 as a word.<end_of_turn>\n<start_of_turn>model\n3 is written three."
          "<end_of_turn>\n")
    check(tok, render(tok, row, fmt="prompt_completion", template="none"),
          [(tok.bos_id, 0), ("Write 3 as a word.", 0), ("3 is written three.", 1), (tok.eos_id, 1)],
          "Write 3 as a word.3 is written three.")


def test_preference_strings_and_messages(tok):
    row = {"prompt": "Is 4 even or odd?", "chosen": "4 is even.", "rejected": "4 is odd."}
    out = render(tok, row, fmt="preference")
    for name, answer in (("chosen_", "4 is even."), ("rejected_", "4 is odd.")):
        check(tok, out, [(tok.bos_id, 0), ("<start_of_turn>", 0), ("user\nIs 4 even or odd?", 0),
                         ("<end_of_turn>", 0), ("\n", 0), ("<start_of_turn>", 0), ("model\n", 0), (answer, 1),
                         ("<end_of_turn>", 1), ("\n", 0)],
              f"<start_of_turn>user\nIs 4 even or odd?<end_of_turn>\n<start_of_turn>model\n{answer}<end_of_turn>\n",
              prefix=name)
    # a multi-turn prompt: its model turn is context, only the response is trained
    row = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": "Is 4 even?"}],
           "chosen": [{"role": "assistant", "content": "Yes."}], "rejected": [{"role": "assistant", "content": "No."}]}
    out = render(tok, row, fmt="preference")
    trained = [i for i, l in zip(out["chosen_input_ids"], out["chosen_labels"]) if l]
    assert tok.decode(trained) == "Yes.<end_of_turn>"


@pytest.mark.parametrize("fmt,row,message", [
    ("chat", {"messages": [{"role": "user", "content": "Hi"}, {"role": "model", "content": "  "}]}, "empty model turn"),
    ("chat", {"messages": [{"role": "model", "content": "Hi"}]}, "expected a user turn"),
    ("chat", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "expected a model turn"),
    ("chat", {"messages": [{"role": "user", "content": "Hi"}]}, "end with a model turn"),
    ("chat", {"messages": [{"role": "robot", "content": "Hi"}]}, "unknown role"),
    ("chat", {"messages": None}, "missing column 'messages'"),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, "must be a string"),
    ("text", {"text": None}, "missing column 'text'"),
    ("prompt_completion", {"prompt": "p", "completion": 3}, "'completion' must be a string"),
    ("preference", {"prompt": "p", "chosen": "", "rejected": "r"}, "empty model turn"),
])
def test_invalid_rows_are_reported(tok, fmt, row, message):
    out = render(tok, row, fmt=fmt)
    assert message in out["error"]
