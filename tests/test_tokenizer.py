"""GemmaTokenizer: Gemma ids, special strings as single ids (user-defined and control pieces), loading."""

import io
import shutil

import pytest
import sentencepiece as spm

from gemma_tune.errors import CheckpointError
from gemma_tune.tokenizer import GemmaTokenizer, load_tokenizer

BUNDLED = "data/tiny/tokenizer.model"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(BUNDLED)


@pytest.fixture(scope="module")
def control_tokenizer(tmp_path_factory):
    """Like real Gemma files: <start_of_turn>/<end_of_turn> are control pieces SentencePiece never matches."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["user asks a question", "model gives an answer"] * 50), model_writer=model,
        vocab_size=300, model_type="bpe", byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        control_symbols=["<start_of_turn>", "<end_of_turn>"], add_dummy_prefix=False, num_threads=1,
        minloglevel=2)
    path = tmp_path_factory.mktemp("control") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return GemmaTokenizer(path)


def test_gemma_ids(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.vocab_size == 512
    assert tok.start_of_turn_id == tok.token_to_id("<start_of_turn>") == 4
    assert tok.end_of_turn_id == 5


def test_encode_has_no_bos_eos_and_round_trips(tok):
    text = "What is 2 plus 3?"
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == text


def test_special_strings_are_single_ids(tok):
    ids = tok.encode("<start_of_turn>user\nhi<end_of_turn>\n")
    assert ids[0] == tok.start_of_turn_id
    assert ids.count(tok.end_of_turn_id) == 1
    assert ids[1:ids.index(tok.end_of_turn_id)] == tok.encode("user\nhi")
    assert tok.encode("<|fim_prefix|>") == [tok.token_to_id("<|fim_prefix|>")]


def test_control_pieces_in_text_map_to_their_ids(control_tokenizer):
    t = control_tokenizer
    ids = t.encode("<start_of_turn>user asks<end_of_turn>")
    assert ids[0] == t.start_of_turn_id and ids[-1] == t.end_of_turn_id
    assert ids[1:-1] == t.encode("user asks")
    assert t.encode("<bos>") == [t.bos_id]


def test_load_from_hf_and_keras_hub_dirs(tmp_path, tok):
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(BUNDLED, hf / "tokenizer.model")
    kh = tmp_path / "kh" / "assets" / "tokenizer"
    kh.mkdir(parents=True)
    shutil.copy(BUNDLED, kh / "vocabulary.spm")
    for source in (hf, tmp_path / "kh"):
        assert load_tokenizer(source).encode("blue sky") == tok.encode("blue sky")


def test_missing_and_invalid_sources(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer in this directory") as e:
        load_tokenizer(tmp_path)
    assert e.value.where == str(tmp_path)
    with pytest.raises(CheckpointError, match="no such"):
        load_tokenizer(tmp_path / "absent.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError, match="SentencePiece") as e:
        load_tokenizer(bad)
    assert e.value.where == str(bad)


def test_hub_source_that_cannot_be_fetched_is_a_checkpoint_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not download tokenizer.model") as e:
        load_tokenizer("hf://no-such-org/no-such-model")
    assert e.value.where == "hf://no-such-org/no-such-model"
