"""Data mistakes the user must hear about, each naming where it is: a split that trains on nothing after
truncation, invalid JSON (file and line), empty data files, symbolic links leading out of a dataset directory."""

import json
import os

import pytest

from gemma_tune.config.schema import DataSection
from gemma_tune.data import prepare
from gemma_tune.errors import DataError


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def section(path, fmt="chat", **kw):
    return DataSection(train={"path": str(path), "format": fmt}, **kw)


def load_error(tok, cache, path, fmt="text") -> DataError:
    with pytest.raises(DataError) as e:
        prepare(section(path, fmt), tok, seed=0, cache_dir=cache)
    return e.value


LONG_PROMPT = " ".join(["red cat"] * 40)


def test_a_split_left_without_trained_tokens_is_an_error(tok, cache, tmp_path):
    cut = write(tmp_path / "cut.jsonl", [chat(LONG_PROMPT, "Yes."), chat(LONG_PROMPT + " again", "No.")])
    with pytest.raises(DataError, match=r"all 2 sequences lost every trained token after truncation "
                                        r"\(max_length=24, truncation=right\).*data.max_length.*truncation: left"
                                        r".*loss_on: all") as e:
        prepare(section(cut, max_length=24), tok, seed=0, cache_dir=cache)
    assert e.value.where == cut
    fine = write(tmp_path / "fine.jsonl", [chat("Hi", "Yo"), chat("a", "b")])
    data = DataSection(train={"path": fine, "format": "chat"}, eval={"path": cut, "format": "chat"}, max_length=24)
    with pytest.raises(DataError, match="eval: all 2 sequences lost every trained token") as e:
        prepare(data, tok, seed=0, cache_dir=cache)
    assert e.value.where == cut
    assert prepare(section(cut, max_length=24, truncation="left"), tok, seed=0, cache_dir=cache).stats["train"][
        "trained_tokens"] > 0


def test_invalid_json_lines_name_the_file_and_line(tok, cache, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"text": \n{"text": "later"}\n')
    e = load_error(tok, cache, broken)
    assert e.where == f"{broken}:4" and "not valid JSON (Expecting value at column 10)" in e.message
    folder = tmp_path / "parts"
    folder.mkdir()
    write(folder / "a.jsonl", [{"text": "ok"}])
    (folder / "b.jsonl").write_text('{"text": "ok"}\n{"text": "no closing quote}\n')
    assert load_error(tok, cache, folder).where == f"{folder / 'b.jsonl'}:2"


def test_invalid_json_document_names_the_position(tok, cache, tmp_path):
    doc = tmp_path / "doc.json"
    doc.write_text('[\n  {"text": "ok"},\n  {"text": "no comma"} {"text": "x"}\n]\n')
    e = load_error(tok, cache, doc)
    assert e.where == f"{doc}:3" and "not valid JSON" in e.message and "line 3, column 24" in e.message


@pytest.mark.parametrize("content", ["", " \n\n\t\n"])
def test_empty_data_file(tok, cache, tmp_path, content):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(content)
    e = load_error(tok, cache, empty)
    assert e.where == str(empty) and "the data file is empty" in e.message
    folder = tmp_path / "folder"
    folder.mkdir()
    write(folder / "a.jsonl", [{"text": "ok"}])
    (folder / "b.jsonl").write_text(content)
    e = load_error(tok, cache, folder)
    assert e.where == str(folder / "b.jsonl") and "the data file is empty" in e.message


def test_symlinks_may_not_lead_out_of_the_dataset_directory(tok, cache, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    write(outside / "secret.jsonl", [{"text": "not part of the dataset"}])
    folder = tmp_path / "ds"
    (folder / "sub").mkdir(parents=True)
    write(folder / "a.jsonl", [{"text": "a"}])
    write(folder / "sub" / "b.jsonl", [{"text": "b"}])
    os.symlink("sub/b.jsonl", folder / "b_again.jsonl")  # inside: fine, and read once
    os.symlink("sub", folder / "via_link")  # a symlinked sub-directory inside: fine
    os.symlink("..", folder / "sub" / "loop")  # a loop inside: each directory read once
    out = prepare(section(folder, "text"), tok, seed=0, cache_dir=cache)
    assert out.stats["train"]["rows"] == 2

    link = folder / "secret.jsonl"
    os.symlink(outside / "secret.jsonl", link)
    e = load_error(tok, cache, folder)
    assert e.where == str(link) and str((outside / "secret.jsonl").resolve()) in e.message and "outside" in e.message
    link.unlink()

    deep = folder / "sub" / "elsewhere"
    os.symlink(outside, deep)  # a directory link leading out, found through a symlinked sub-directory too
    e = load_error(tok, cache, folder)
    assert e.where == str(deep) and str(outside.resolve()) in e.message
