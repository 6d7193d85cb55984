"""Derive argparse options from config dataclasses, so the CLI and the Python API never drift.

Every field of a config dataclass becomes `--field-name`; its help text is the field's
`metadata["help"]`, its type and default come from the annotation and the default value.
`bool` fields become `--flag / --no-flag`; `Literal[...]` fields become choices;
`Optional[X]` fields accept the literal `none`.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def field(default: Any = dataclasses.MISSING, *, help: str, **kw: Any) -> Any:  # noqa: A002
    """A dataclass field with a help text (shown by `--help` and used as its documentation)."""
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _parser_for(tp: Any, optional: bool):
    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if typing.get_origin(tp) in (list, tuple):
            inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
            return [inner(x) for x in text.split(",") if x]
        return text

    parse.__name__ = getattr(tp, "__name__", "value")
    return parse


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, group: str | None = None) -> None:
    """Add one option per field of dataclass `cls` to `parser`."""
    hints = typing.get_type_hints(cls)
    target = parser.add_argument_group(group or cls.__name__) if group is not False else parser
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        if tp is bool:
            target.add_argument(flag, dest=f.name, default=default, action=argparse.BooleanOptionalAction,
                                help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": f"{help_text} (default: {default})"}
        if typing.get_origin(tp) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
            kwargs["type"] = type(kwargs["choices"][0])
        else:
            kwargs["type"] = _parser_for(tp, optional)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs["required"] = True
        target.add_argument(flag, **kwargs)


def dataclass_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build `cls` from the parsed namespace (fields absent from the namespace keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if f.init and hasattr(args, f.name)}
    return cls(**values)
