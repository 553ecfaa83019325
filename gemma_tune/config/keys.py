"""`describe_keys(section)`: every recipe key with its type, default and meaning, as `gemma-tune keys` prints it.

The keys come from the schema (`gemma_tune.config.schema.Recipe`), walked in declaration order: a field
whose type is a section (also `Section | None`, as `lora`) is listed, then its keys under its dotted
path (`data.train.path`). Each key is one line, `path  type, default`, followed by its description
indented and wrapped:

    train.batch_size  int > 0, default 8
        rows of max_length tokens per micro-batch (preference methods: pairs)

Types read as in YAML: `int > 0`, `float in [0, 1)`, `jax | tensorflow | torch | null`, `list of
q|k|v|...`; a key without a default says `required`. `base` (recipe composition, read before the schema
applies) is listed first.
"""

from __future__ import annotations

import difflib
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Union

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from gemma_tune.config.schema import Recipe
from gemma_tune.errors import ConfigError

WIDTH = 100
BASE = ("base", "path | list of path", "[]",
        "recipe files merged under this one, in order (each may have its own base); mappings merge key by key, "
        "a later value wins, lists are replaced; relative paths are looked up as data paths are")


@dataclass(frozen=True)
class Key:
    path: str
    type: str
    default: str | None  # None: required
    description: str

    def render(self) -> str:
        head = f"{self.path}  {self.type}, " + ("required" if self.default is None else f"default {self.default}")
        return "\n".join([head] + textwrap.wrap(self.description, WIDTH, initial_indent="    ",
                                                subsequent_indent="    "))


def _section(annotation: Any) -> type[BaseModel] | None:
    """The section model of a field's type (`X` or `X | None`), or None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return next(filter(None, map(_section, typing.get_args(annotation))), None)
    return None


def _number(value: float) -> str:
    return f"{value:g}"


def _bounds(metadata: list) -> str:
    """` > 0`, ` >= 0`, ` in [0, 1)` ... from annotated-types constraints."""
    lower = [(m.gt, "(", ">") for m in metadata if isinstance(m, at.Gt)] + \
            [(m.ge, "[", ">=") for m in metadata if isinstance(m, at.Ge)]
    upper = [(m.lt, ")", "<") for m in metadata if isinstance(m, at.Lt)] + \
            [(m.le, "]", "<=") for m in metadata if isinstance(m, at.Le)]
    if lower and upper:
        (lo, left, _), (hi, right, _) = lower[0], upper[0]
        return f" in {left}{_number(lo)}, {_number(hi)}{right}"
    if lower or upper:
        value, _, sign = (lower or upper)[0]
        return f" {sign} {_number(value)}"
    return ""


def type_name(annotation: Any, metadata: list = ()) -> str:
    """A readable name of a field type; `metadata` (constraints) applies to its number, string or list part."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        named = [type_name(a, metadata) for a in args if a is not type(None)]
        return " | ".join(named + (["null"] if type(None) in args else []))
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    non_empty = "non-empty " if any(isinstance(m, at.MinLen) and m.min_length == 1 for m in metadata) else ""
    if origin is list:
        return f"{non_empty}list of {type_name(args[0]).replace(' | ', '|')}"
    if origin is dict:
        return "mapping" if args[1] is Any else f"mapping of {type_name(args[0])} to {type_name(args[1])}"
    if _section(annotation) is not None:
        return "section"
    if annotation in (int, float):
        return annotation.__name__ + _bounds(metadata)
    if annotation is str:
        return f"{non_empty}str"
    return getattr(annotation, "__name__", str(annotation))


def _value(value: Any) -> str:
    """A default as YAML writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _default(field: FieldInfo) -> str | None:
    if field.is_required():
        return None
    value = field.get_default(call_default_factory=True)
    return "its keys' defaults" if isinstance(value, BaseModel) else _value(value)


def keys(model: type[BaseModel] = Recipe, prefix: str = "") -> Iterator[Key]:
    """Every key of `model` and of its sections, depth first in declaration order."""
    for name, field in model.model_fields.items():
        path = prefix + name
        yield Key(path, type_name(field.annotation, field.metadata), _default(field), field.description or "")
        section = _section(field.annotation)
        if section is not None:
            yield from keys(section, path + ".")


def describe_keys(section: str | None = None) -> str:
    """The keys (all, or those of `section`: a top-level section such as `train`, or a dotted prefix such as
    `data.train`, or one key) with their types, defaults and meanings, one entry per key.

    An unknown `section` is a ConfigError suggesting close names.
    """
    every = [Key(*BASE)] + list(keys())
    chosen = every if section is None else [k for k in every if k.path == section or k.path.startswith(section + ".")]
    if not chosen:
        close = difflib.get_close_matches(section, [k.path for k in every], n=3, cutoff=0.6)
        sections = ", ".join(k.path for k in every if "." not in k.path and k.type.startswith("section"))
        hint = f"did you mean {' or '.join(close)}?" if close else f"the sections are {sections}"
        raise ConfigError(f"no recipe section or key of this name; {hint} (`gemma-tune keys` lists every key)",
                          where=section)
    return "\n".join(k.render() for k in chosen)
