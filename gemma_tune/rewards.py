"""Reward functions of online RL (`rl.rewards`, methods grpo and rloo): loading, checking and scoring.

A reward function follows TRL's GRPO convention (`GRPOTrainer(reward_funcs=…)`):

    reward_func(prompts, completions, **kwargs) -> list[float | None], one value per completion

`prompts[i]` is the prompt of completion i as the data holds it (a string or a list of messages), repeated
for each of its prompt's G completions; `completions[i]` its decoded text; `kwargs` every other column of
the prompt's data row (one value per completion, a prompt's values repeated), and `completion_ids` (the
completion's token ids, without its stop token). None (or NaN) means "not applicable" to that completion:
it adds nothing to the total and is left out of the function's mean metric.

Each item of `rl.rewards` is a string (a built-in name, or `package.module:function` importable from the
Python path) or `{name | model, weight, args}` (`gemma_tune.config.schema.RewardItem`); `args` are the
function's keyword options. The built-ins:

  * `answer_match` — 1.0 when the completion's final answer equals the reference of the row's `column`
    (default `answer`), else 0.0 (`answer_match` has the rules);
  * `format` — 1.0 when the whole stripped completion matches the regular expression `pattern`;
  * `length_penalty` — DAPO's soft overlong punishment (options `max_length`, `buffer`);

and `{model: SOURCE}` is a reward model (a `method: reward` run or its export, `gemma_tune.models.RewardModel`)
scoring each prompt and completion as a conversation, its `args` `batch_size` (default 8) rows per forward
pass.

`reward_problems(items)` checks the items without importing Keras, user code or models (recipe validation);
`load_rewards(items, …)` makes `RewardFunction`s of them; `score_completions(functions, …)` calls each one on a
round of completions and gives the weighted total (TRL's nansum over functions) and each function's values.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import json
import logging
import math
import numbers
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from gemma_tune.errors import CheckpointError, ConfigError, UserError

log = logging.getLogger("gemma_tune")

KEY = "rl.rewards"
REWARD_MODEL = "reward_model"  # the metric name of a reward model: rewards/reward_model
MODEL_OPTIONS = {"batch_size": 8}
IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
FORMAT_EXAMPLE = r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"
PROMPT_CHARS = 200  # of a prompt quoted in a RewardError


class RewardError(UserError):
    """A reward function that failed on, or returned something unusable for, a round of completions."""


@dataclass
class RewardFunction:
    """A loaded reward: its metric `name` (rewards/<name>), `weight` in the total, recipe key `where`
    (`rl.rewards[i]`) and `fn(prompts, completions, **columns) -> list of float | None`."""

    name: str
    weight: float
    where: str
    fn: Callable


# ---- the built-ins ------------------------------------------------------------------------------------
NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
LAST_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
LATEX_FRACTION = re.compile(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")


def _boxed(text: str) -> str | None:
    """The content of the last `\\boxed{…}` (or `\\fbox{…}`) whose braces balance."""
    for opening in reversed(list(re.finditer(r"\\(?:boxed|fbox)\s*\{", text))):
        depth, j = 1, opening.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            return text[opening.end():j - 1]
    return None


def _marked_answer(text: str) -> str | None:
    """The answer a marker states: the last `#### …` line (GSM8K), else the last balanced `\\boxed{…}`, else
    the last `<answer>…</answer>`; stripped. None without a (non-empty) marker."""
    hashes = [a.strip() for a in re.findall(r"####([^\n]*)", text) if a.strip()]
    if hashes:
        return hashes[-1]
    boxed = _boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    tagged = [a.strip() for a in re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL) if a.strip()]
    return tagged[-1] if tagged else None


def _final_answer(text: str) -> str:
    """A completion's final answer: the marked one (`_marked_answer`), else its last number, else the whole
    stripped text."""
    marked = _marked_answer(text)
    if marked is not None:
        return marked
    numbers_found = LAST_NUMBER.findall(text)
    return numbers_found[-1] if numbers_found else text.strip()


def _as_number(answer: str) -> float | None:
    """The value of an answer written as a number — commas, `$`, `%` (also LaTeX-escaped), surrounding
    spaces and a trailing "." ignored; `a/b` and `\\frac{a}{b}` as fractions — else None."""
    text = answer.replace("\u2212", "-")
    for noise in ("\\$", "$", "\\%", "%", ","):
        text = text.replace(noise, "")
    text = text.strip().rstrip(".").strip()
    fraction = LATEX_FRACTION.fullmatch(text)
    parts = fraction.groups() if fraction else text.split("/") if text.count("/") == 1 else (text,)
    if not all(NUMBER.fullmatch(p.strip()) for p in parts):
        return None
    values = [float(p) for p in parts]
    if len(values) == 2:
        return values[0] / values[1] if values[1] != 0 else None
    return values[0]


def _same_answer(given: str, reference: str) -> bool:
    a, b = _as_number(given), _as_number(reference)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return given.strip() == reference.strip()


def answer_match(prompts, completions, *, column: str = "answer", **columns) -> list[float | None]:
    """1.0 where a completion's final answer equals its row's reference answer, else 0.0; None where the
    reference is null (not applicable).

    The reference is the row's column `column` (default "answer"); when it holds a marker its marked answer
    is the reference (GSM8K's `answer` is a worked solution ending in "#### 72"), else the whole value.
    The completion's final answer is the last `#### <answer>` line (GSM8K's layout), else the last
    `\\boxed{<answer>}` (balanced braces), else the last `<answer>…</answer>` tag's content, else the last
    number in the text, else the whole stripped text. Two answers that both read as numbers are compared as
    numbers (commas, `$`, `%`, spaces and a trailing "." ignored; "72.0" == "72"; "3/4" == "\\frac{3}{4}" ==
    "0.75"), others as exact strings after stripping surrounding whitespace.

    A reward function in TRL's convention (module docstring); a missing column is a RewardError naming the
    row's columns."""
    if column not in columns:
        available = sorted(k for k in columns if k != "completion_ids")
        raise RewardError(f"answer_match reads the reference from column {column!r}, which the prompts' rows do "
                          f"not have (their columns: {', '.join(available) or 'none but the prompt'}); set "
                          "args.column to the column holding the answers")
    out: list[float | None] = []
    for completion, reference in zip(completions, columns[column]):
        if reference is None:
            out.append(None)
            continue
        reference = str(reference)
        expected = _marked_answer(reference) or reference.strip()
        out.append(1.0 if _same_answer(_final_answer(completion), expected) else 0.0)
    return out


def format(prompts, completions, *, pattern: str, **_) -> list[float]:  # noqa: A001 - the recipe's name
    """1.0 where the stripped completion matches the regular expression `pattern` entirely (`re.fullmatch`,
    `.` matching newlines too: re.DOTALL), else 0.0. `pattern` is required; a layout to reward, as recipes
    write it: `<reasoning>.*?</reasoning>\\s*<answer>.*?</answer>`. A reward function in TRL's convention
    (module docstring)."""
    return [1.0 if re.fullmatch(pattern, completion.strip(), re.DOTALL) else 0.0 for completion in completions]


def length_penalty(prompts, completions, *, completion_ids, max_length: int, buffer: int | None = None,
                   **_) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning
    System at Scale", arXiv:2503.14476, eq. 13) of each completion of L = len(completion_ids) tokens, with
    L_max = `max_length` (in a recipe: default rl.max_completion_length) and L_cache = `buffer` (default
    L_max // 4):

        0                                 L ≤ L_max − L_cache
        (L_max − L_cache − L) / L_cache   L_max − L_cache < L ≤ L_max
        −1                                L > L_max

    A reward function in TRL's convention (module docstring)."""
    cache = max_length // 4 if buffer is None else buffer
    out = []
    for ids in completion_ids:
        length = len(ids)
        if length <= max_length - cache:
            out.append(0.0)
        elif length <= max_length:
            out.append((max_length - cache - length) / cache)
        else:
            out.append(-1.0)
    return out


def _is_count(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _answer_match_problems(args: dict) -> list[tuple[str, str]]:
    column = args.get("column", "answer")
    if not isinstance(column, str) or not column:
        return [("column", f"expected the name of the column holding the reference answers, got {column!r}")]
    return []


def _format_problems(args: dict) -> list[tuple[str, str]]:
    if "pattern" not in args:
        return [("pattern", f"required: the regular expression a whole completion must match, e.g. "
                            f"'{FORMAT_EXAMPLE}'")]
    pattern = args["pattern"]
    if not isinstance(pattern, str):
        return [("pattern", f"expected a regular expression as a string, got {pattern!r}")]
    try:
        re.compile(pattern, re.DOTALL)
    except re.error as e:
        return [("pattern", f"not a valid regular expression ({e})")]
    return []


def _length_penalty_problems(args: dict) -> list[tuple[str, str]]:
    problems = []
    max_length, buffer = args.get("max_length"), args.get("buffer")
    if max_length is not None and not _is_count(max_length, 1):
        problems.append(("max_length", f"expected a positive number of tokens (L_max), or null, got {max_length!r}"))
    if buffer is not None and not _is_count(buffer, 0):
        problems.append(("buffer", f"expected a number of tokens >= 0 (L_cache), or null, got {buffer!r}"))
    elif buffer is not None and _is_count(max_length, 1) and buffer > max_length:
        problems.append(("buffer", f"expected at most max_length ({max_length}), got {buffer}"))
    return problems


@dataclass(frozen=True)
class _Builtin:
    fn: Callable
    options: tuple[str, ...]
    problems: Callable[[dict], list[tuple[str, str]]]  # (option, problem) of valid-named args


BUILTINS = {
    "answer_match": _Builtin(answer_match, ("column",), _answer_match_problems),
    "format": _Builtin(format, ("pattern",), _format_problems),
    "length_penalty": _Builtin(length_penalty, ("max_length", "buffer"), _length_penalty_problems),
}


# ---- checking -----------------------------------------------------------------------------------------
def _fields(item) -> tuple[str | None, str | None, float, dict, str]:
    """(name, model, weight, args, key of the name or model) of a string or RewardItem at `rl.rewards[i]`."""
    if isinstance(item, str):
        return item, None, 1.0, {}, ""
    return item.name, item.model, item.weight, dict(item.args), ".name" if item.name is not None else ".model"


def _unknown_name(name: str) -> str:
    close = difflib.get_close_matches(name, list(BUILTINS), n=1, cutoff=0.6)
    suggestion = f"; did you mean {close[0]!r}?" if close else ""
    return (f"unknown reward {name!r}: expected a built-in ({', '.join(BUILTINS)}) or a Python function as "
            f"package.module:function{suggestion}")


def reward_problems(items) -> list[tuple[str, str]]:
    """[(dotted recipe key, problem)] of `rl.rewards` (`items`: strings and RewardItems), found without
    importing Keras, user code or models: an empty list, unknown built-in names, malformed import paths
    (expected package.module:function), unknown or invalid args of a built-in or a reward model, a
    non-finite weight. Whether a function imports or a model loads is `load_rewards`'s to find."""
    if not items:
        return [(KEY, "expected at least one reward: a built-in (" + ", ".join(BUILTINS) + "), a Python "
                      "function as package.module:function, or {model: a reward model}")]
    problems = []
    for i, item in enumerate(items):
        where = f"{KEY}[{i}]"
        name, model, weight, args, field = _fields(item)
        if not math.isfinite(weight):
            problems.append((f"{where}.weight", f"expected a finite number, got {weight!r}"))
        if model is not None:
            options = MODEL_OPTIONS
            problems += [(f"{where}.args.{k}", f"expected a positive number of rows per forward pass, got {v!r}")
                         for k, v in args.items() if k in options and not _is_count(v, 1)]
            problems += [(f"{where}.args.{k}", f"not an option of a reward model (its options: "
                                               f"{', '.join(options)})") for k in args if k not in options]
        elif name in BUILTINS:
            builtin = BUILTINS[name]
            unknown = [k for k in args if k not in builtin.options]
            problems += [(f"{where}.args.{k}", f"not an option of {name} (its options: {', '.join(builtin.options)})")
                         for k in unknown]
            problems += [(f"{where}.args.{k}", problem) for k, problem in builtin.problems(args)]
        elif ":" not in name and "." not in name:
            problems.append((where + field, _unknown_name(name)))
        elif not IMPORT_PATH.fullmatch(name):
            problems.append((where + field, f"expected a Python function as package.module:function (a dotted "
                                            f"module path, a colon, the function's name), got {name!r}"))
    return problems


# ---- loading ------------------------------------------------------------------------------------------
def _import_module(name: str):
    """`importlib.import_module(name)`, the working directory searched first as `python -m` does (the
    `gemma-tune` script's own directory is on the path instead)."""
    import os
    import sys

    here = os.getcwd()
    if here in sys.path:
        return importlib.import_module(name)
    sys.path.insert(0, here)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(here)


def _imported(path: str, where: str) -> Callable:
    """The reward function at `path` (package.module:function, importable from the working directory or the
    Python path), checked to take keywords (TRL's `**kwargs`)."""
    module_name, attribute = path.split(":")
    try:
        target = _import_module(module_name)
    except Exception as e:  # noqa: BLE001 - the user's module: any error in it means it does not import
        raise ConfigError(f"could not import module {module_name!r} ({type(e).__name__}: {e}); expected "
                          "package.module:function importable from the working directory or the Python path "
                          "(is its directory on PYTHONPATH?)", where=where) from e
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"module {module_name!r} has no {attribute!r}; expected package.module:function",
                              where=where)
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{path} is a {type(target).__name__}, not a function; expected a reward function "
                          "f(prompts, completions, **kwargs)", where=where)
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a callable without an inspectable signature: its calls will tell
        return target
    if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        raise ConfigError(f"{path}{signature} takes no **kwargs; expected TRL's reward-function signature "
                          "f(prompts, completions, **kwargs): the rows' other columns and completion_ids are "
                          "passed as keywords", where=where)
    return target


def _load_reward_model(source: str, dtype: str, tokenizer, where: str):
    """(RewardModel, GemmaTokenizer) of `source`: the tokenizer beside its weights, else `tokenizer`."""
    from gemma_tune.loading import load_model, load_model_and_tokenizer
    from gemma_tune.models import RewardModel
    from gemma_tune.scoring import NOT_A_REWARD_MODEL
    from gemma_tune.tokenizer import GemmaTokenizer, load_tokenizer

    try:
        try:
            model, own = load_model_and_tokenizer(source, dtype=dtype)
        except CheckpointError:  # no tokenizer of its own (or no model: then loading fails again, below)
            if tokenizer is None:
                raise
            model = load_model(source, dtype=dtype)
            own = tokenizer if isinstance(tokenizer, GemmaTokenizer) else load_tokenizer(tokenizer)
            log.warning("reward model %s: no tokenizer beside its weights; scoring with %s", source, own)
    except UserError as e:
        raise ConfigError(f"could not load the reward model ({e}); expected a method: reward run or its export",
                          where=where) from e
    if not isinstance(model, RewardModel):
        raise ConfigError(f"{source} is {NOT_A_REWARD_MODEL}", where=where)
    return model, own


def _reward_model_fn(model, tokenizer, batch_size: int) -> Callable:
    """A reward function scoring each (prompt, completion) with `model`, rendered as training renders a
    conversation (gemma_tune.data.render): the prompt's turns and the opened model turn (exactly as the policy
    was prompted), then the stripped completion with `<end_of_turn>` and "\\n" — the sequence
    `gemma_tune.scoring.score` scores for the row {prompt, completion} (or the prompt's messages and a model
    turn). An empty completion is the empty model turn `<end_of_turn>\\n`, which training rows never hold."""
    from gemma_tune.data.render import Tokenise
    from gemma_tune.scoring import score_sequences

    render_prompt = Tokenise(str(tokenizer.model_path), "prompt", "chat", "completion")
    turn_end = tokenizer.encode("\n")

    def reward_model(prompts, completions, **_) -> list[float]:
        ids = []
        for prompt, completion in zip(prompts, completions):
            rendered = render_prompt({"prompt": prompt})
            if rendered["error"]:
                raise ValueError(f"the prompt does not render: {rendered['error']}")
            ids.append(rendered["input_ids"] + tokenizer.encode(completion.strip() + "<end_of_turn>") + turn_end)
        return score_sequences(model, ids, batch_size=batch_size, pad_id=tokenizer.pad_id).tolist()

    return reward_model


def _unique(name: str, used: set[str]) -> str:
    candidate, k = name, 1
    while candidate in used:
        k += 1
        candidate = f"{name}_{k}"
    used.add(candidate)
    return candidate


def load_rewards(items, *, max_completion_length: int, dtype: str = "float32",
                 tokenizer=None) -> list[RewardFunction]:
    """The `RewardFunction`s of `rl.rewards` (`items`: strings and RewardItems), in order.

    Names: a built-in's own, an imported function's `__name__`, "reward_model" for a reward model; a name
    already taken gets "_2", "_3", …. `max_completion_length` (rl.max_completion_length) is length_penalty's
    default max_length. A reward model is loaded with `gemma_tune.loading.load_model_and_tokenizer` in
    `dtype`, with the tokenizer beside its weights, else `tokenizer` (a GemmaTokenizer or a path: the
    policy's). ConfigError, at the item's key (`rl.rewards[i]`, `….name`, `….model`, `….args.<option>`),
    for `reward_problems`' problems, a function that does not import or is not a reward function, a model
    that does not load or is not a reward model."""
    problems = reward_problems(items)
    if problems:
        key, problem = problems[0]
        raise ConfigError(problem, where=key)
    functions, used = [], set()
    for i, item in enumerate(items):
        where = f"{KEY}[{i}]"
        name, model, weight, args, field = _fields(item)
        if model is not None:
            reward_model, own = _load_reward_model(model, dtype, tokenizer, where + field)
            fn = _reward_model_fn(reward_model, own, args.get("batch_size", MODEL_OPTIONS["batch_size"]))
            base = REWARD_MODEL
        elif name in BUILTINS:
            if name == "length_penalty":
                args = {"max_length": args.get("max_length") or max_completion_length, "buffer": args.get("buffer")}
                if args["buffer"] is not None and args["buffer"] > args["max_length"]:
                    raise ConfigError(f"expected at most max_length ({args['max_length']}: "
                                      f"rl.max_completion_length), got {args['buffer']}", where=f"{where}.args.buffer")
            fn, base = functools.partial(BUILTINS[name].fn, **args), name
        else:
            target = _imported(name, where + field)
            fn = functools.partial(target, **args) if args else target
            base = getattr(target, "__name__", name.split(":")[1].split(".")[-1])
        functions.append(RewardFunction(_unique(base, used), float(weight), where, fn))
    return functions


# ---- scoring ------------------------------------------------------------------------------------------
def _quoted(prompt) -> str:
    """A prompt (a string or messages) in at most PROMPT_CHARS characters, for a message."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False, default=str)
    return repr(text if len(text) <= PROMPT_CHARS else text[:PROMPT_CHARS - 1] + "…")


def _first_failure(f: RewardFunction, prompts, completions, columns, completion_ids):
    """(index, exception) of the first completion `f` raises on when called on it alone; None if none."""
    for i in range(len(completions)):
        try:
            f.fn(prompts[i:i + 1], completions[i:i + 1], **{k: v[i:i + 1] for k, v in columns.items()},
                 completion_ids=completion_ids[i:i + 1])
        except Exception as e:  # noqa: BLE001 - the user's function: whatever it raises is reported
            return i, e
    return None


def _values(f: RewardFunction, prompts, completions, columns, completion_ids) -> np.ndarray:
    """float32 [n]: `f`'s values, NaN where it returned None (module docstring); RewardError otherwise."""
    n = len(completions)
    label = f"reward {f.name!r}"
    try:
        values = f.fn(prompts, completions, **columns, completion_ids=completion_ids)
    except Exception as e:  # noqa: BLE001 - the user's function: whatever it raises is reported
        found = _first_failure(f, prompts, completions, columns, completion_ids)
        if found is None:
            raise RewardError(f"{label} raised on the round of {n} completions, though on none of them alone: "
                              f"{type(e).__name__}: {e}", where=f.where) from e
        i, cause = found
        raise RewardError(f"{label} raised on completion {i} (prompt {_quoted(prompts[i])}): "
                          f"{type(cause).__name__}: {cause}", where=f.where) from cause
    expected = f"expected a list of {n} numbers (or None: not applicable), one per completion"
    if (isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__")
            or (isinstance(values, np.ndarray) and values.ndim != 1)):
        raise RewardError(f"{label} returned {type(values).__name__} {_short(values)}; {expected}", where=f.where)
    values = list(values)
    if len(values) != n:
        raise RewardError(f"{label} returned {len(values)} values for {n} completions; {expected}", where=f.where)
    out = np.full(n, np.nan, np.float32)
    for i, value in enumerate(values):
        if value is None:
            continue
        if not isinstance(value, numbers.Real):
            raise RewardError(f"{label} returned {_short(value)} ({type(value).__name__}) for completion {i} (prompt "
                              f"{_quoted(prompts[i])}); {expected}", where=f.where)
        if math.isinf(value):
            raise RewardError(f"{label} returned {value} for completion {i} (prompt {_quoted(prompts[i])}); expected "
                              "a finite number (None or NaN: not applicable)", where=f.where)
        out[i] = value
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= PROMPT_CHARS else text[:PROMPT_CHARS - 1] + "…"


def score_completions(functions: list[RewardFunction], prompts: list, completions: list[str],
                      columns: dict[str, list], completion_ids: list[list[int]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(total, {name: values}) of n completions under the loaded reward `functions`.

    `prompts[i]`, `completions[i]`, `columns[k][i]` and `completion_ids[i]` describe completion i (module
    docstring); each function is called once on all n as fn(prompts, completions, **columns,
    completion_ids=completion_ids). values: float32 [n], NaN where the function returned None (or NaN):
    not applicable. total: float32 [n], Σ_f weight_f · values_f with not-applicable values counted as 0
    (TRL's nansum over functions).

    RewardError (at the function's `rl.rewards[i]`, naming it) when a function raises — the first
    completion it raises on alone, with its prompt (at most 200 characters) and the exception's type and
    message, chained (`__cause__`) — or returns anything but n numbers or None, or an infinite number."""
    n = len(completions)
    if len(prompts) != n or len(completion_ids) != n or any(len(v) != n for v in columns.values()):
        raise ValueError(f"expected one prompt, completion_ids and value of each column per completion ({n}), got "
                         f"{len(prompts)} prompts, {len(completion_ids)} completion_ids and columns of lengths "
                         f"{ {k: len(v) for k, v in columns.items()} }")
    total = np.zeros(n, np.float64)
    per_function = {}
    for f in functions:
        values = _values(f, prompts, completions, columns, completion_ids)
        per_function[f.name] = values
        total += f.weight * np.nan_to_num(values.astype(np.float64), nan=0.0)
    return total.astype(np.float32), per_function
