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
sequence (layouts in `preference_turns`); prompt (online RL) = the prompt turns and the opened model turn
`<start_of_turn>model\n` the policy completes (nothing trained; `template: none`: bos + the prompt text).

Preference sequences are labelled as `loss_on: completion` whatever `loss_on` says: a preference
log-probability (DPO, IPO, SimPO, ORPO, reward models) is over the response tokens only, never the prompt's.

Images (vision models; layouts in layout.py). A message's `content` may be a list of parts
`{type: text, text}` / `{type: image, image}` (HF's convention): text parts are trimmed (a system
message's are not) and concatenated with nothing between, and each image part is the image's place (the
template writes `<start_of_image>` there). An image part without an `image` value takes the next image of
the row's `images` column (TRL's convention: parts and images matched in order). Images belong in user
(or system) turns. `image_text` rows (`image`: one value or a list, `prefix`, `suffix`) render as
PaliGemma's processor does on a PaliGemma model: the images, <bos>, prefix + "\n" (not trained), suffix +
<eos> (trained); on Gemma 3 as one user turn (the images, then the prefix) and one model turn (the suffix)
with `template: chat`, or <bos> + images + prefix + suffix (trained) + <eos> (trained) with `template: none`.
Image slots are never trained on, whatever `loss_on` says. Preference rows are text only.
"""

from __future__ import annotations

from dataclasses import dataclass

from gemma_tune.data.images import ImageError
from gemma_tune.data.layout import ImageRef, VisionLayout, place_images

ROLES = {"user": "user", "model": "model", "assistant": "model"}
NO_VISION = ("this model has no vision encoder; rows with images need a vision model (PaliGemma, or Gemma 3 4B "
             "and larger)")


class RowError(ValueError):
    """A row that does not fit its format (the message says what was expected)."""


Piece = tuple  # (text: str | ImageRef | None, token_id: int | None (when text is None), trained: bool)


def _string(value, name: str) -> str:
    if value is None:
        raise RowError(f"missing column {name!r}")
    if not isinstance(value, str):
        raise RowError(f"{name!r} must be a string, got {type(value).__name__}")
    return value


def _content(value, name: str, role, images: bool):
    """A message's content: a string as is, or the parts of a list (see the module docstring) as a string
    when it holds no image, else a list of strings and `ImageRef`s (a part without `image`: ImageRef(None))."""
    if not isinstance(value, list):
        return _string(value, name)
    segments: list = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = _string(part.get("text"), f"{name}[{j}].text")
            segments.append(text if role == "system" else text.strip())
        elif kind == "image" and images:
            segments.append(ImageRef(part.get("image")))
        elif kind == "image":
            raise RowError(f"{name}[{j}] is an image: preference rows are text only")
        else:
            raise RowError(f"{name}[{j}] must be a {{type: text, text}} or {{type: image, image}} part")
    joined = _joined(segments)
    return joined[0] if len(joined) == 1 and isinstance(joined[0], str) else joined


def _joined(segments: list) -> list:
    """Strings and ImageRefs with adjacent strings concatenated (at least one element)."""
    out: list = []
    for segment in segments:
        if isinstance(segment, str) and out and isinstance(out[-1], str):
            out[-1] += segment
        else:
            out.append(segment)
    return out or [""]


def _messages(value, name: str, images: bool = True) -> list[tuple]:
    """[(role, content)] of a messages list, roles as written (validated by `chat_pieces`); content as
    `_content` gives it (`images=False`: an image part is a RowError)."""
    if value is None:
        raise RowError(f"missing column {name!r}")
    if not isinstance(value, list) or not value:
        raise RowError(f"{name!r} must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"{name}[{i}] must be a {{role, content}} message")
        role = _string(m["role"], f"{name}[{i}].role")
        out.append((role, _content(m["content"], f"{name}[{i}].content", role, images)))
    return out


def _with_row_images(messages: list[tuple], images) -> list[tuple]:
    """`messages` with each image part that has no `image` value given the next of the row's `images`."""
    refs = [seg for _, content in messages if isinstance(content, list) for seg in content
            if isinstance(seg, ImageRef) and seg.value is None]
    given = [] if images is None else images if isinstance(images, list) else [images]
    if not refs and not given:
        return messages
    if len(refs) != len(given):
        raise RowError(f"the messages have {len(refs)} image parts without an `image` value but the row's `images` "
                       f"column holds {len(given)} images: they are matched in order and must be as many")
    fill = iter(given)
    return [(role, [ImageRef(next(fill)) if isinstance(seg, ImageRef) and seg.value is None else seg
                    for seg in content] if isinstance(content, list) else content) for role, content in messages]


def _segments(content) -> list:
    return content if isinstance(content, list) else [content]


def _text_pieces(segments: list, trained: bool) -> list[Piece]:
    """Pieces of strings and ImageRefs (adjacent strings merged; empty strings left out)."""
    return [(seg, None, trained) if isinstance(seg, str) else (seg, None, False)
            for seg in _joined(segments) if seg != ""]


def chat_pieces(messages: list[tuple], bos_id: int, first_trained_turn: int = 0) -> list[Piece]:
    """Pieces of a conversation; model turns with index >= `first_trained_turn` (after the system
    message is folded in) are trained. Contents are strings or `_content` lists (images in user or
    system turns)."""
    system = None
    if messages and messages[0][0] == "system":
        system = _segments(messages[0][1])
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
        if expected == "user":
            prefix = [*system, "\n\n"] if (i == 0 and system and system != [""]) else []
            text = [content.strip()] if isinstance(content, str) else content
            pieces += _text_pieces(["<start_of_turn>user\n", *prefix, *text, "<end_of_turn>\n"], False)
        else:
            if not isinstance(content, str):
                raise RowError(f"turn {i}: an image in a model turn; images go in user (or system) turns")
            text = content.strip()
            if not text:
                raise RowError(f"turn {i}: empty model turn")
            trained = i >= first_trained_turn
            pieces += [("<start_of_turn>model\n", None, False), (text + "<end_of_turn>", None, trained),
                       ("\n", None, False)]
    if ROLES[messages[-1][0]] != "model":
        raise RowError("the conversation must end with a model turn")
    return pieces


def generation_prompt_pieces(value, bos_id: int, template: str, system: str | None = None) -> list[Piece]:
    """Pieces of an online-RL prompt (`prompt`: a string, one user turn, or messages ending with a user
    turn; `system`: a system message put first unless the messages open with their own): the chat-templated
    turns followed by the opened model turn `<start_of_turn>model\n`, as transformers'
    `add_generation_prompt`; with `template: none` (a string only) bos + the raw text."""
    if template == "none":
        if not isinstance(value, str):
            raise RowError("template: none takes a string prompt; messages are rendered with the chat template")
        return [(None, bos_id, False), (value, None, False)]
    messages = [("user", _string(value, "prompt"))] if isinstance(value, str) or value is None \
        else _messages(value, "prompt", images=False)
    if system is not None and messages[0][0] != "system":
        messages = [("system", system)] + messages
    if ROLES.get(messages[-1][0]) != "user":
        raise RowError("the prompt's messages must end with a user turn: the model completes the next turn")
    pieces = chat_pieces(messages + [("model", "-")], bos_id)
    return pieces[:-2]  # the placeholder turn's content and newline: what is left opens the model turn


def _key(turn: tuple) -> tuple[str, str]:
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
    return _messages(value, name, images=False)


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
    prompt = [("user", raw)] if isinstance(raw, str) else _messages(raw, "prompt", images=False)
    responses = {}
    for name in ("chosen", "rejected"):
        value = row.get(name)
        turns = [("model", value)] if isinstance(value, str) else _messages(value, name, images=False)
        responses[name] = turns[len(prompt):] if _starts_with(turns, prompt) else turns
    return prompt, responses


def _image_values(value) -> list:
    """The image values of an `image_text` row's `image`: one value or a non-empty list of them."""
    if value is None:
        raise RowError("missing column 'image'")
    values = value if isinstance(value, list) else [value]
    if not values:
        raise RowError("'image' is an empty list; expected an image or a list of images")
    if any(v is None for v in values):
        raise RowError("'image' holds a null; expected an image or a list of images")
    return values


def image_text_pieces(row: dict, template: str, bos_id: int, eos_id: int, family: str | None,
                      prefix: str | None = None) -> list[Piece]:
    """Pieces of an `image_text` row for a vision model of `family` (module docstring); `prefix`: every row's
    (None: the row's own)."""
    if family is None:
        raise RowError(NO_VISION)
    images = [ImageRef(value) for value in _image_values(row.get("image"))]
    prefix = _string(row.get("prefix"), "prefix") if prefix is None else prefix
    suffix = _string(row.get("suffix"), "suffix")
    if not suffix:
        raise RowError("empty suffix")
    if family == "paligemma":
        return [*((ref, None, False) for ref in images), (None, bos_id, False), (prefix + "\n", None, False),
                (suffix, None, True), (None, eos_id, True)]
    if template == "none":
        return [(None, bos_id, False), *_text_pieces([*images, prefix], False), (suffix, None, True),
                (None, eos_id, True)]
    return chat_pieces([("user", _joined([*images, prefix.strip()])), ("model", suffix)], bos_id)


def _chat_messages(row: dict) -> list[tuple]:
    return _with_row_images(_messages(row.get("messages"), "messages"), row.get("images"))


def row_images(row: dict, fmt: str) -> list:
    """The image values of a valid row, in the order its pieces hold them ([] for text formats)."""
    if fmt == "image_text":
        return _image_values(row.get("image"))
    if fmt == "chat":
        return [seg.value for _, content in _chat_messages(row) if isinstance(content, list) for seg in content
                if isinstance(seg, ImageRef)]
    return []


def row_pieces(row: dict, fmt: str, template: str, bos_id: int, eos_id: int, family: str | None = None,
               prefix: str | None = None, system: str | None = None) -> dict[str, list[Piece]]:
    """{sequence name: pieces}: {"": …} for sft formats, {"chosen": …, "rejected": …} for preference.

    `family`: the vision layout of the model ("paligemma" | "gemma3"), None for a model without a vision
    encoder (then a row with images is a RowError); `prefix`: image_text rows' fixed prefix (None: their own);
    `system`: prompt rows' system message (None: none)."""
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
        pieces = chat_pieces(_chat_messages(row), bos_id)
        if family != "gemma3" and any(isinstance(p[0], ImageRef) for p in pieces):
            raise RowError(NO_VISION if family is None else "a PaliGemma model takes images in image_text rows "
                           "(image, prefix, suffix), not in chat messages")
        return {"": pieces}
    if fmt == "image_text":
        return {"": image_text_pieces(row, template, bos_id, eos_id, family, prefix)}
    if fmt == "prompt":
        return {"": generation_prompt_pieces(row.get("prompt"), bos_id, template, system)}
    if fmt == "preference":
        prompt, responses = preference_turns(row)
        n_prompt = len(prompt) - (1 if prompt and prompt[0][0] == "system" else 0)
        return {name: chat_pieces(prompt + turns, bos_id, first_trained_turn=n_prompt)
                for name, turns in responses.items()}
    raise RowError(f"unknown format {fmt!r}")


@dataclass
class Tokenise:
    """The `datasets.map` function: row (and its index) -> ids and labels per sequence, or the row's error.

    Holds the tokenizer's path (picklable for `num_proc` workers) and loads it once per process.
    Output columns: `{prefix}input_ids`, `{prefix}labels` for prefix "" or "chosen_"/"rejected_", and
    `error` ("" for a valid row). `loss_on: all` labels every token of sft formats; preference labels are
    always the response tokens (module docstring).

    With a `vision` layout (a vision model; sft formats, `holds_images`) also: `image_crops` (per image of
    the row, in order, its pan-and-scan crops: the row stands for Σ(1 + crops) images), `source_row` (the
    row's index in the data, for reading its images per batch) and, for PaliGemma, `prefix_mask` (1 over
    an image_text row's images, <bos>, prefix and "\n": the tokens before the first trained one; 0 for
    other formats). A missing or unreadable image is the row's error (layout.inspect_image).
    """

    tokenizer_path: str
    fmt: str
    template: str
    loss_on: str
    vision: VisionLayout | None = None
    prefix: str | None = None  # image_text: every row's prefix (DataSource.prefix); None = the row's own
    system: str | None = None  # prompt: every prompt's system message (DataSource.system); None = none

    def _tokenizer(self):
        if getattr(self, "_tok", None) is None:
            from gemma_tune.tokenizer import GemmaTokenizer
            self._tok = GemmaTokenizer(self.tokenizer_path)
        return self._tok

    def names(self) -> list[str]:
        return ["chosen_", "rejected_"] if self.fmt == "preference" else [""]

    @property
    def holds_images(self) -> bool:
        return self.vision is not None and self.fmt != "preference"

    @property
    def keeps_source_row(self) -> bool:
        """Whether each output row names its input row (`source_row`): rows with images (read per batch) and
        online-RL prompts (whose other columns go to the reward functions)."""
        return self.holds_images or self.fmt == "prompt"

    @property
    def prefix_lm(self) -> bool:
        return self.holds_images and self.vision.family == "paligemma"

    def features(self):
        """The output columns' types when the rows hold images (None: as `datasets` infers them)."""
        if not self.holds_images:
            return None
        import datasets

        ints = datasets.List(datasets.Value("int32"))
        columns = {"input_ids": ints, "labels": ints, "error": datasets.Value("string"), "image_crops": ints,
                   "source_row": datasets.Value("int64")}
        return datasets.Features({**columns, **({"prefix_mask": ints} if self.prefix_lm else {})})

    def __call__(self, row: dict, index: int | None = None) -> dict:
        tok = self._tokenizer()
        out: dict = {f"{p}{k}": [] for p in self.names() for k in ("input_ids", "labels")}
        if self.keeps_source_row:
            out["source_row"] = -1 if index is None else index
        if self.holds_images:
            out.update(image_crops=[], **({"prefix_mask": []} if self.prefix_lm else {}))
        try:
            sequences = row_pieces(row, self.fmt, self.template, tok.bos_id, tok.eos_id,
                                   self.vision.family if self.vision else None, self.prefix, self.system)
            if self.holds_images and any(isinstance(p[0], ImageRef) for p in sequences[""]):
                sequences[""], out["image_crops"] = place_images(sequences[""], self.vision)
        except (RowError, ImageError) as e:
            return {**out, "error": str(e)}
        every_token = self.loss_on == "all" and self.fmt != "preference"
        slot = self.vision.image_token_id if self.vision else None
        in_prefix = self.prefix_lm and self.fmt == "image_text"
        for name, pieces in sequences.items():
            prefix = f"{name}_" if name else ""
            for text, token_id, trained in pieces:
                ids = [token_id] if text is None else tok.encode(text)
                out[f"{prefix}input_ids"] += ids
                label = 0 if text is None and token_id == slot else int(trained or every_token)
                out[f"{prefix}labels"] += [label] * len(ids)
                in_prefix = in_prefix and not trained
                if self.prefix_lm:
                    out["prefix_mask"] += [int(in_prefix)] * len(ids)
        return {**out, "error": ""}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_tok"}
