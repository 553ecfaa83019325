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
completion + eos (trained); preference = the prompt followed by `chosen` / `rejected`, each its own
sequence (layouts in `preference_turns`).

Preference sequences are labelled as `loss_on: completion` whatever `loss_on` says: a preference
log-probability (DPO, IPO, SimPO, ORPO, reward models) is over the response tokens only, never the prompt's.
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


def _key(turn: tuple[str, str]) -> tuple[str, str]:
    """What a turn renders as: its role (assistant = model) and content (stripped, but a system message's)."""
    role, content = turn
    return ROLES.get(role, role), content if role == "system" else content.strip()


def _starts_with(turns: list[tuple[str, str]], prefix: list[tuple[str, str]]) -> bool:
    return len(turns) >= len(prefix) and all(_key(a) == _key(b) for a, b in zip(turns, prefix))


def _conversation(value, name: str) -> list[tuple[str, str]]:
    """The turns of `chosen` / `rejected` in a row without a prompt: a full conversation (messages)."""
    if isinstance(value, str):
        raise RowError(f"{name!r} is a string but the row has no prompt: without a prompt, chosen and rejected "
                       "must be full conversations (messages lists) that share their opening turns (a raw "
                       "transcript such as hh-rlhf's '\\n\\nHuman: … \\n\\nAssistant: …' is not parsed: "
                       "convert it to messages, or give the prompt in its own column)")
    return _messages(value, name)


def implicit_prompt(chosen: list[tuple[str, str]], rejected: list[tuple[str, str]]) -> int:
    """The number of opening turns that are the prompt of two full conversations.

    The prompt is their longest shared prefix of whole turns (turns that render the same), which must end
    with a user turn; what follows in each is its response. A pair that shares no opening turn, or whose
    shared turns do not end with a user turn, is a RowError. The same conversation twice splits at its last user
    turn (the pair is then identical, and skipped as such when prepared).
    """
    n = 0
    while n < min(len(chosen), len(rejected)) and _key(chosen[n]) == _key(rejected[n]):
        n += 1
    if n == len(chosen) == len(rejected):
        n = max((i + 1 for i, turn in enumerate(chosen) if _key(turn)[0] == "user"), default=n)
    if n == 0:
        raise RowError("chosen and rejected share no opening turn: without a prompt, they must be full "
                       "conversations that begin with the same prompt turns")
    if _key(chosen[n - 1])[0] != "user":
        raise RowError(f"the opening turns chosen and rejected share ({n}) end with {chosen[n - 1][0]!r}, not a "
                       "user turn: without a prompt, the turns they share are the prompt and must end with a "
                       "user turn")
    return n


def preference_turns(row: dict) -> tuple[list[tuple[str, str]], dict[str, list[tuple[str, str]]]]:
    """(prompt turns, {"chosen": response turns, "rejected": response turns}) of a preference row.

    - Explicit prompt: `prompt` is a string (one user turn) or messages; `chosen` / `rejected` are each a
      string (one model turn) or messages. A response whose messages begin with the prompt's turns (the
      layout of HuggingFaceH4/ultrafeedback_binarized, which has both) has that copy removed.
    - Implicit prompt: no `prompt` (no column, or null): `chosen` and `rejected` are full conversations
      and the prompt is their shared opening turns (`implicit_prompt`).
    """
    raw = row.get("prompt")
    if raw is None:
        chosen, rejected = _conversation(row.get("chosen"), "chosen"), _conversation(row.get("rejected"), "rejected")
        n = implicit_prompt(chosen, rejected)
        return chosen[:n], {"chosen": chosen[n:], "rejected": rejected[n:]}
    prompt = [("user", raw)] if isinstance(raw, str) else _messages(raw, "prompt")
    responses = {}
    for name in ("chosen", "rejected"):
        value = row.get(name)
        turns = [("model", value)] if isinstance(value, str) else _messages(value, name)
        responses[name] = turns[len(prompt):] if _starts_with(turns, prompt) else turns
    return prompt, responses


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
        prompt, responses = preference_turns(row)
        n_prompt = len(prompt) - (1 if prompt and prompt[0][0] == "system" else 0)
        return {name: chat_pieces(prompt + turns, bos_id, first_trained_turn=n_prompt)
                for name, turns in responses.items()}
    raise RowError(f"unknown format {fmt!r}")


@dataclass
class Tokenise:
    """The `datasets.map` function: row -> ids and labels per sequence, or the row's error.

    Holds the tokenizer's path (picklable for `num_proc` workers) and loads it once per process.
    Output columns: `{prefix}input_ids`, `{prefix}labels` for prefix "" or "chosen_"/"rejected_", and
    `error` ("" for a valid row). `loss_on: all` labels every token of sft formats; preference labels are
    always the response tokens (module docstring).
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
        every_token = self.loss_on == "all" and self.fmt != "preference"
        for name, pieces in sequences.items():
            prefix = f"{name}_" if name else ""
            for text, token_id, trained in pieces:
                ids = [token_id] if text is None else tok.encode(text)
                out[f"{prefix}input_ids"] += ids
                out[f"{prefix}labels"] += [int(trained or every_token)] * len(ids)
        return {**out, "error": ""}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_tok"}
