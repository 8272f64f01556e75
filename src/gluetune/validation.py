"""Checking config values against type annotations, with one-line messages users can act on.

Why by hand: the config's sections are plain dataclasses (gluetune's own, `TrainingArguments`,
peft's `LoraConfig`), and a typo or a wrong type must be named with what is accepted, before any
model loads. No schema library reads those annotations (`Optional[...]`, enums next to `str`,
`Literal[...]`) and words its errors that way.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any

from .errors import UserError, did_you_mean


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in tp)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if _enum_choices(tp):  # `SomeEnum | str`: the str stands for the enum's values
            args = [a for a in args if a is not str]
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        items = {int: "integers", str: "strings", float: "numbers", bool: "true/false values"}
        (item, *_) = typing.get_args(tp) or (None,)
        return f"a list of {items[item]}" if item in items else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _matches(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, str) and value in {m.value for m in tp}
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return any(_is_literal(value, a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        # A str member next to an enum (e.g. `OptimizerNames | str`) stands for the enum's values.
        args = typing.get_args(tp)
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and str in args and isinstance(value, str):
            return any(_matches(value, e) for e in enums)
        return any(_matches(value, a) for a in args)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_matches(v, item_tp) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, (dict, tp))  # a sub-config given as a mapping; its class checks the keys
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _is_literal(value: Any, choice: Any) -> bool:
    """`value` is the literal `choice`; a choice such as peft's 'pissa_niter_[number of iters]'
    stands for every value with its prefix."""
    if isinstance(choice, str) and "[" in choice and isinstance(value, str):
        return value.startswith(choice.split("[", 1)[0])
    return value == choice and type(value) is type(choice)


def _enum_choices(tp: Any) -> list[str]:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return [str(m.value) for m in tp]
    if typing.get_origin(tp) is typing.Literal:
        return [str(a) for a in typing.get_args(tp)]
    return [c for a in typing.get_args(tp) for c in _enum_choices(a)]


def check_value(where: str, value: Any, tp: Any) -> Any:
    """Raise a one-line UserError unless `value` fits annotation `tp`; lists accept a scalar."""
    origin = typing.get_origin(tp)
    wants_list = origin in (list, tuple) or any(typing.get_origin(a) in (list, tuple) for a in typing.get_args(tp))
    if wants_list and isinstance(value, str) and not _matches(value, tp):
        as_list = [v.strip() for v in value.split(",") if v.strip()]
        if _matches(as_list, tp):
            return as_list
    if _matches(value, tp):
        return value
    choices = _enum_choices(tp)
    hint = did_you_mean(value, choices) if isinstance(value, str) and choices else ""
    raise UserError(f"{where}: {value!r} is not valid{hint}; expected {_type_name(tp)}")


def check_section(section: str, raw: Any, cls: type, source: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: '{section}' must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in raw.items():
        if key not in hints:
            raise UserError(
                f"{source}: unknown key '{section}.{key}'{did_you_mean(key, names)}; "
                f"valid keys: {', '.join(names)}"
            )
        raw[key] = check_value(f"{source}: {section}.{key}", value, hints[key])
    return cls(**raw)


