"""Rendering rows of each format into token ids and per-token training labels.

Gemma's chat template (as in Google's docs and the Gemma 3 HF `chat_template`):

    <bos><start_of_turn>user\n{SYSTEM}\n\n{USER}<end_of_turn>\n<start_of_turn>model\n{MODEL}<end_of_turn>\n…

Role "assistant" is written "model"; there is no system role: a system message's content followed by
"\n\n" is prepended to the first user turn as is; user and model contents are stripped of surrounding
whitespace (the template's `| trim`); turns alternate user/model starting with user. No eos is added after a chat:
the model stops at `<end_of_turn>`.

Each piece is tokenised on its own so labels are exact. `label = 1` marks a token trained on:
- `loss_on: completion` — in every model turn (every response turn for preference rows), its content
  tokens and its `<end_of_turn>`; not `<start_of_turn>model\n` and not the "\n" after `<end_of_turn>`
  (as the `{% generation %}` spans of HF/TRL `assistant_only_loss`: the model must learn to end its
  turn; the newline after it is template glue, never sampled).
- `loss_on: all` — every token.
Formats: text = bos + text + eos (all trained: there is no prompt); prompt_completion with
`template: chat` = one user/model turn pair, with `template: none` = bos + prompt (not trained) +
completion + eos (trained); preference = the prompt (a string: one user turn; or messages) followed by
`chosen` / `rejected` (a string: one model turn; or messages of model turns), each its own sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = {"user": "user", "model": "model", "assistant": "model"}


class RowError(ValueError):
    """A row that does not fit its format (the message says what was expected)."""


Piece = tuple  # (text: str | None, token_id: int | None, trained: bool)


def _string(value, name: str) -> str:
    if value is None:
        raise RowError(f"missing column {name!r}")
    if not isinstance(value, str):
        raise RowError(f"{name!r} must be a string, got {type(value).__name__}")
    return value


def _messages(value, name: str) -> list[tuple[str, str]]:
    """[(role, content)] of a messages list, roles as written (validated by `chat_pieces`)."""
    if value is None:
        raise RowError(f"missing column {name!r}")
    if not isinstance(value, list) or not value:
        raise RowError(f"{name!r} must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"{name}[{i}] must be a {{role, content}} message")
        out.append((_string(m["role"], f"{name}[{i}].role"), _string(m["content"], f"{name}[{i}].content")))
    return out


def chat_pieces(messages: list[tuple[str, str]], bos_id: int, first_trained_turn: int = 0) -> list[Piece]:
    """Pieces of a conversation; model turns with index >= `first_trained_turn` (after the system
    message is folded in) are trained."""
    system = None
    if messages and messages[0][0] == "system":
        system = messages[0][1]
        messages = messages[1:]
    if not messages:
        raise RowError("the conversation has no user turn")
    pieces: list[Piece] = [(None, bos_id, False)]
    for i, (role, content) in enumerate(messages):
        if role not in ROLES:
            raise RowError(f"turn {i}: unknown role {role!r}; expected user, model/assistant "
                           "(or system first)")
        expected = "user" if i % 2 == 0 else "model"
        if ROLES[role] != expected:
            raise RowError(f"turn {i}: expected a {expected} turn, got {role!r} "
                           "(turns alternate user/model, starting with user)")
        text = content.strip()
        if expected == "user":
            prefix = f"{system}\n\n" if (i == 0 and system) else ""
            pieces.append((f"<start_of_turn>user\n{prefix}{text}<end_of_turn>\n", None, False))
        else:
            if not text:
                raise RowError(f"turn {i}: empty model turn")
            trained = i >= first_trained_turn
            pieces += [("<start_of_turn>model\n", None, False), (text + "<end_of_turn>", None, trained),
                       ("\n", None, False)]
    if ROLES[messages[-1][0]] != "model":
        raise RowError("the conversation must end with a model turn")
    return pieces


def row_pieces(row: dict, fmt: str, template: str, bos_id: int, eos_id: int) -> dict[str, list[Piece]]:
    """{sequence name: pieces}: {"": …} for sft formats, {"chosen": …, "rejected": …} for preference."""
    if fmt == "text":
        return {"": [(None, bos_id, True), (_string(row.get("text"), "text"), None, True),
                     (None, eos_id, True)]}
    if fmt == "prompt_completion":
        prompt, completion = _string(row.get("prompt"), "prompt"), _string(row.get("completion"), "completion")
        if template == "none":
            if not completion:
                raise RowError("empty completion")
            return {"": [(None, bos_id, False), (prompt, None, False), (completion, None, True),
                         (None, eos_id, True)]}
        return {"": chat_pieces([("user", prompt), ("model", completion)], bos_id)}
    if fmt == "chat":
        return {"": chat_pieces(_messages(row.get("messages"), "messages"), bos_id)}
    if fmt == "preference":
        raw = row.get("prompt")
        prompt = [("user", raw)] if isinstance(raw, str) else _messages(raw, "prompt")
        n_prompt = len(prompt) - (1 if prompt and prompt[0][0] == "system" else 0)
        out = {}
        for name in ("chosen", "rejected"):
            value = row.get(name)
            response = [("model", value)] if isinstance(value, str) else _messages(value, name)
            out[name] = chat_pieces(prompt + response, bos_id, first_trained_turn=n_prompt)
        return out
    raise RowError(f"unknown format {fmt!r}")


@dataclass
class Tokenise:
    """The `datasets.map` function: row -> ids and labels per sequence, or the row's error.

    Holds the tokenizer's path (picklable for `num_proc` workers) and loads it once per process.
    Output columns: `{prefix}input_ids`, `{prefix}labels` for prefix "" or "chosen_"/"rejected_", and
    `error` ("" for a valid row).
    """

    tokenizer_path: str
    fmt: str
    template: str
    loss_on: str

    def _tokenizer(self):
        if getattr(self, "_tok", None) is None:
            from gemma_tune.tokenizer import GemmaTokenizer
            self._tok = GemmaTokenizer(self.tokenizer_path)
        return self._tok

    def names(self) -> list[str]:
        return ["chosen_", "rejected_"] if self.fmt == "preference" else [""]

    def __call__(self, row: dict) -> dict:
        tok = self._tokenizer()
        out: dict = {f"{p}{k}": [] for p in self.names() for k in ("input_ids", "labels")}
        try:
            sequences = row_pieces(row, self.fmt, self.template, tok.bos_id, tok.eos_id)
        except RowError as e:
            return {**out, "error": str(e)}
        for name, pieces in sequences.items():
            prefix = f"{name}_" if name else ""
            for text, token_id, trained in pieces:
                ids = [token_id] if text is None else tok.encode(text)
                out[f"{prefix}input_ids"] += ids
                out[f"{prefix}labels"] += [int(trained or self.loss_on == "all")] * len(ids)
        return {**out, "error": ""}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_tok"}
