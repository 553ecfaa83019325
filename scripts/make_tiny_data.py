"""Write the bundled tiny datasets and tokenizer in data/tiny/ (deterministic, licence-free).

Every text is produced here from templates (arithmetic questions, facts about colours, animals and
numbers, short instructions), so the data is the project's own and a 64-wide model learns it in about a
hundred steps. Outputs (one JSON object per line):

  chat.jsonl / chat_eval.jsonl   {"messages": [{"role", "content"}, ...]}  (some with a system message,
                                 some multi-turn)
  text.jsonl                     {"text"}
  prompt_completion.jsonl        {"prompt", "completion"}
  preference.jsonl               {"prompt", "chosen", "rejected"}  (chosen is the correct answer)
  tokenizer.model                SentencePiece BPE, vocab 512, byte fallback, Gemma's special ids
                                 (pad=0, eos=1, bos=2, unk=3) and special tokens as user-defined pieces

Run: python scripts/make_tiny_data.py [--out data/tiny]
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

import sentencepiece as spm

SEED = 1234
VOCAB_SIZE = 512
GEMMA_SPECIAL_TOKENS = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<mask>",
                        "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|file_separator|>"]

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]
COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
           "a tomato": "red", "an orange": "orange", "a plum": "purple", "the sun": "yellow",
           "a leaf": "green", "milk": "white", "a cherry": "red"}
ANIMALS = {"cat": ("meows", 4), "dog": ("barks", 4), "cow": ("moos", 4), "duck": ("quacks", 2),
           "horse": ("neighs", 4), "sheep": ("bleats", 4), "owl": ("hoots", 2), "hen": ("clucks", 2),
           "frog": ("croaks", 4), "lion": ("roars", 4)}
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer in one short sentence.",
                  "You are a friendly tutor."]


def arithmetic(rng: random.Random) -> tuple[str, str, str]:
    """(question, correct answer, wrong answer) for a small sum, difference or product."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    op = rng.choice(["plus", "times", "minus"])
    if op == "minus" and b > a:
        a, b = b, a
    value = {"plus": a + b, "times": a * b, "minus": a - b}[op]
    question = rng.choice([f"What is {a} {op} {b}?", f"Compute {a} {op} {b}.", f"How much is {a} {op} {b}?"])
    wrong = value + rng.choice([-2, -1, 1, 2, 3])
    return question, f"{a} {op} {b} is {value}.", f"{a} {op} {b} is {abs(wrong)}."


def colour_fact(rng: random.Random) -> tuple[str, str, str]:
    thing, colour = rng.choice(sorted(COLOURS.items()))
    wrong = rng.choice(sorted({c for c in COLOURS.values() if c != colour}))
    question = rng.choice([f"What colour is {thing}?", f"Tell me the colour of {thing}."])
    return question, f"The colour of {thing} is {colour}.", f"The colour of {thing} is {wrong}."


def animal_fact(rng: random.Random) -> tuple[str, str, str]:
    animal, (sound, legs) = rng.choice(sorted(ANIMALS.items()))
    if rng.random() < 0.5:
        wrong = rng.choice(sorted({s for s, _ in ANIMALS.values() if s != sound}))
        return f"What sound does a {animal} make?", f"A {animal} {sound}.", f"A {animal} {wrong}."
    return (f"How many legs does a {animal} have?", f"A {animal} has {legs} legs.",
            f"A {animal} has {6 - legs} legs.")


def number_fact(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(0, 11)
    kind = rng.choice(["word", "next", "parity"])
    if kind == "word":
        return (f"Write {n} as a word.", f"{n} is written {NUMBER_WORDS[n]}.",
                f"{n} is written {NUMBER_WORDS[(n + 1) % 12]}.")
    if kind == "next":
        return f"What number comes after {n}?", f"After {n} comes {n + 1}.", f"After {n} comes {n + 2}."
    parity = "even" if n % 2 == 0 else "odd"
    other = "odd" if parity == "even" else "even"
    return f"Is {n} even or odd?", f"{n} is {parity}.", f"{n} is {other}."


def instruction(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(["red", "cat", "sun", "tree", "blue", "dog", "milk", "star"], 3)
    kind = rng.choice(["repeat", "reverse", "upper", "count"])
    listed = " ".join(words)
    if kind == "repeat":
        return f"Repeat after me: {listed}", listed, " ".join(reversed(words))
    if kind == "reverse":
        return f"Reverse the words: {listed}", " ".join(reversed(words)), listed
    if kind == "upper":
        return f"Write in capitals: {listed}", listed.upper(), listed
    return f"How many words are in: {listed}?", "There are 3 words.", "There are 4 words."


GENERATORS = [arithmetic, colour_fact, animal_fact, number_fact, instruction]


def qa(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(GENERATORS)(rng)


def chat_row(rng: random.Random) -> dict:
    messages = []
    system = rng.random() < 0.25
    if system:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(1 if rng.random() < 0.6 else rng.randint(2, 3)):
        question, answer, _ = qa(rng)
        messages.append({"role": "user", "content": question})
        messages.append({"role": rng.choice(["model", "assistant"]) if rng.random() < 0.2 else "assistant",
                         "content": answer})
    return {"messages": messages}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def train_tokenizer(texts: list[str], out: Path) -> None:
    """SentencePiece BPE with Gemma's special ids; deterministic (one thread, all sentences, in memory)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=VOCAB_SIZE,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, num_threads=1,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=GEMMA_SPECIAL_TOKENS,
        split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", shuffle_input_sentence=False, minloglevel=2)
    (out / "tokenizer.model").write_bytes(model.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "tiny"))
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)

    chat = [chat_row(rng) for _ in range(400)]
    chat_eval = [chat_row(rng) for _ in range(60)]
    text = []
    for _ in range(300):
        question, answer, _ = qa(rng)
        text.append({"text": f"Question: {question} Answer: {answer}"})
    prompt_completion = []
    for _ in range(300):
        question, answer, _ = qa(rng)
        prompt_completion.append({"prompt": question, "completion": answer})
    preference = []
    for _ in range(300):
        question, answer, wrong = qa(rng)
        preference.append({"prompt": question, "chosen": answer, "rejected": wrong})

    write_jsonl(out / "chat.jsonl", chat)
    write_jsonl(out / "chat_eval.jsonl", chat_eval)
    write_jsonl(out / "text.jsonl", text)
    write_jsonl(out / "prompt_completion.jsonl", prompt_completion)
    write_jsonl(out / "preference.jsonl", preference)

    corpus = [m["content"] for row in chat + chat_eval for m in row["messages"]]
    corpus += [f"<start_of_turn>user\n{r['prompt']}<end_of_turn>\n<start_of_turn>model\n{r['completion']}"
               for r in prompt_completion]  # the chat template's role words become pieces
    corpus += [r["text"] for r in text]
    corpus += [r[k] for r in prompt_completion for k in ("prompt", "completion")]
    corpus += [r[k] for r in preference for k in ("prompt", "chosen", "rejected")]
    train_tokenizer(corpus, out)


if __name__ == "__main__":
    main()
