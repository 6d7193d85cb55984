"""Config dataclasses whose fields carry their help, their check and their command-line option; one error type.

A config is a dataclass deriving from `Config`, its fields made with `field`::

    @dataclass
    class TrainConfig(Config):
        batch_size: int = field(8, help="rows per micro-batch", check=at_least(1))
        compile: CompileConfig = field(CompileConfig(enabled=None), help="regional torch.compile")

* Validation runs when the object is made (`Config.__post_init__`): the annotation first (``bool``, ``int``,
  ``float``, ``str``, ``Literal[...]``, ``list[X]``, ``X | None``, a nested config), then the field's ``check``,
  then the class's `Config.validate` for rules that span fields. A failure raises `ConfigError`, which knows the
  class and the field: Python sees ``TrainConfig.batch_size must be a positive int, got 0``, the CLI
  ``--batch-size must be a positive int, got 0``, both from the one declaration.
* `options(cls)` lists the command-line options: field ``batch_size`` is ``--batch-size``; a nested config's
  fields get the nested field's ``prefix`` (default: its name), unless a field declares its ``flag``.
  `add_dataclass_arguments` adds them to an argparse parser (``bool``: ``--x / --no-x``; ``Literal``: choices;
  ``list``: comma-separated, or with ``several=True`` separate words, the option repeatable (for paths, which may
  hold commas); ``X | None``: also the word ``none``), `dataclass_from_args` builds the config back.
* `flatten(cfg, compared_only=True)`: the values of the fields marked as changing what a run computes
  (``fingerprint=True``, the default), by dotted name: what a resumed run must match.

Standard library only: importing this module imports neither torch nor anything else of quickloris.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

T = TypeVar("T")
Check = Callable[[Any], "str | None"]


class ConfigError(ValueError, TypeError):
    """A bad option value. `owner` is the config class, `name` its field; `problem` reads after the field's name
    ("must be ..."), and may name other fields of the same class as ``{field}`` (listed in `refs`)."""

    def __init__(self, owner: type | str, name: str, problem: str, refs: tuple[str, ...] = ()):
        super().__init__(owner, name, problem, refs)
        self.owner, self.name, self.problem, self.refs = owner, name, problem, tuple(refs)

    @property
    def owner_name(self) -> str:
        return self.owner if isinstance(self.owner, str) else self.owner.__name__

    def render(self, flags: Mapping[tuple[Any, str], str] | None = None) -> str:
        """The message, naming fields by their option in `flags` ((owner, field) -> ``--option``) where known."""

        def show(field_name: str, subject: bool) -> str:
            if flags and (self.owner, field_name) in flags:
                return flags[(self.owner, field_name)]
            return f"{self.owner_name}.{field_name}" if subject else field_name

        text = self.problem
        for ref in self.refs:
            text = text.replace("{" + ref + "}", show(ref, False))
        return show(self.name, True) + ("" if text.startswith(("=", ":")) else " ") + text

    def __str__(self) -> str:
        return self.render()


def field(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    check: Check | None = None,  # noqa: A002
    convert: Callable[[Any], Any] | None = None,
    flag: str | None = None,
    prefix: str | None = None,
    fingerprint: bool = True,
    cli: bool = True,
    several: bool = False,
) -> Any:
    """A dataclass field with its documentation and rules.

    `help`: shown by ``--help``; `check(value)`: the problem (``"must be ..."``) or None, run after the type
    check; `convert(value)`: applied first (e.g. a comma-separated string to a list); `flag`: the option name
    when it is not ``--<prefix><name>``; `prefix`: for a nested config, what its fields' options start with
    (default: this field's name); `fingerprint`: whether the value changes what a training run computes;
    `cli`: False keeps it off the command line; `several` (a list field): the option takes one or more words and
    may be repeated (``--data a.jsonl b.csv``, ``--data a.jsonl --data b.csv``) instead of one comma-separated word.
    A list or a config default is copied for each object.
    """
    meta = {
        "help": help,
        "check": check,
        "convert": convert,
        "flag": flag,
        "prefix": prefix,
        "fingerprint": fingerprint,
        "cli": cli,
        "several": several,
    }
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        value = default
        return dataclasses.field(default_factory=lambda: copy.deepcopy(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------------- checks


def at_least(low: int) -> Check:
    """An int >= `low`."""

    def check(value: int) -> str | None:
        if value >= low:
            return None
        return f"must be a positive int, got {value!r}" if low == 1 else f"must be an int >= {low}, got {value!r}"

    return check


def in_range(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Check:
    """A number in the interval; `*_open`: the bound itself excluded."""

    def check(value: float) -> str | None:
        bad_low = low is not None and (value < low or (low_open and value == low))
        bad_high = high is not None and (value > high or (high_open and value == high))
        if not (bad_low or bad_high):
            return None
        parts = [f"{'>' if low_open else '>='} {low:g}"] if low is not None else []
        parts += [f"{'<' if high_open else '<='} {high:g}"] if high is not None else []
        return f"must be {' and '.join(parts)}, got {value!r}"

    return check


def comma_list(item: Callable[[str], Any] = str) -> Callable[[Any], Any]:
    """`convert` for a list field that also takes ``"a,b"``."""

    def convert(value: Any) -> Any:
        return [item(x) for x in value.split(",") if x] if isinstance(value, str) else value

    return convert


# ---------------------------------------------------------------------------------------------------- types

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        inner = (typing.get_args(tp) or (str,))[0]
        if typing.get_origin(inner) is typing.Literal:
            return "a list of " + " / ".join(str(a) for a in typing.get_args(inner))
        return f"a list of {_describe(inner).split(' ', 1)[-1]}s"
    return {bool: "True or False", int: "an int", float: "a number", str: "a string"}.get(
        tp, f"a {getattr(tp, '__name__', tp)}"
    )


def _matches(tp: Any, value: Any) -> bool:
    if typing.get_origin(tp) is typing.Literal:
        return value in typing.get_args(tp)
    if typing.get_origin(tp) is list:
        inner = (typing.get_args(tp) or (Any,))[0]
        return isinstance(value, list) and all(_matches(inner, v) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if tp is str:
        return isinstance(value, (str, os.PathLike))
    return tp is Any or isinstance(value, tp)


class Config:
    """Base of config dataclasses: checks every field when the object is made (see the module docstring)."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("convert") is not None:
                value = f.metadata["convert"](value)
            if isinstance(value, tuple):
                value = list(value)
            tp, optional = _unwrap_optional(hints[f.name])
            if _is_config(tp) and isinstance(value, dict):
                value = tp(**value)
            setattr(self, f.name, value)
            if value is None and optional:
                continue
            if not _matches(tp, value):
                what = "True, False" if tp is bool and optional else _describe(tp)
                raise ConfigError(type(self), f.name, f"must be {what}{' or None' if optional else ''}, got {value!r}")
            problem = f.metadata["check"](value) if f.metadata.get("check") is not None else None
            if problem:
                raise ConfigError(type(self), f.name, problem)
        self.validate()

    def validate(self) -> None:
        """Rules across fields (override; raise `ConfigError`)."""

    def error(self, name: str, problem: str, *refs: str) -> ConfigError:
        """A `ConfigError` about field `name` of this config (`refs`: other fields named as ``{field}``)."""
        return ConfigError(type(self), name, problem, refs)


def flatten(cfg: Any, *, compared_only: bool = False, prefix: str = "") -> dict[str, Any]:
    """The field values of `cfg` by dotted name, nested configs included; `compared_only`: only the fields
    declared with ``fingerprint=True`` (and only inside nested configs that are)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if compared_only and not f.metadata.get("fingerprint", True):
            continue
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(flatten(value, compared_only=compared_only, prefix=f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = copy.deepcopy(value)
    return out


# ---------------------------------------------------------------------------------------------------- argparse


@dataclasses.dataclass(frozen=True)
class Option:
    """One command-line option: ``flag`` sets field ``field.name`` of config class ``owner`` (stored as
    ``dest`` in the parsed namespace); ``group`` titles its part of ``--help``."""

    flag: str
    dest: str
    owner: type
    field: dataclasses.Field
    type: Any
    optional: bool
    default: Any
    group: str


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def options(
    cls: type, group: str | None = None, *, _prefix: str = "", _dest: str = "", _defaults: Any = None
) -> list[Option]:
    """The options of config class `cls`, nested configs' included (see the module docstring)."""
    group = group or cls.__name__
    out: list[Option] = []
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        tp, optional = _unwrap_optional(_hints(cls)[f.name])
        default = getattr(_defaults, f.name) if _defaults is not None else _default(f)
        if _is_config(tp):
            prefix = f.metadata.get("prefix") or f.name
            out += options(
                tp,
                f"{group}: {f.metadata.get('help', prefix)}",
                _prefix=f"{_prefix}{prefix}-",
                _dest=f"{_dest}{f.name}.",
                _defaults=default,
            )
            continue
        flag = f.metadata.get("flag") or "--" + _prefix + f.name.replace("_", "-")
        out.append(Option(flag, _dest + f.name, cls, f, tp, optional, default, group))
    return out


def _parser_for(tp: Any, optional: bool) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        if tp in (int, float):
            return tp(text)
        if typing.get_origin(tp) is list:
            inner = (typing.get_args(tp) or (str,))[0]
            item = inner if inner in (int, float) else str
            return [item(x) for x in text.split(",") if x]
        return text

    parse.__name__ = "number" if tp is float else getattr(tp, "__name__", "value")  # argparse: "invalid int value"
    return parse


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, group: str | None = None) -> list[Option]:
    """Add the options of `cls` to `parser`, one argument group per config (nested ones included)."""
    opts = options(cls, group)
    groups: dict[str, Any] = {}
    for o in opts:
        target = groups.get(o.group) or groups.setdefault(o.group, parser.add_argument_group(o.group))
        help_text = o.field.metadata.get("help", "")
        if o.type is bool:
            target.add_argument(
                o.flag, dest=o.dest, default=o.default, action=argparse.BooleanOptionalAction, help=help_text
            )
            continue
        shown = ",".join(map(str, o.default)) if isinstance(o.default, list) else o.default
        kwargs: dict[str, Any] = {"dest": o.dest, "default": o.default, "help": f"{help_text} (default: {shown})"}
        if typing.get_origin(o.type) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(o.type))
            kwargs["type"] = type(kwargs["choices"][0])
        elif o.field.metadata.get("several"):
            # "extend" adds to the default list: the default stays out of the namespace until an option is given.
            inner = (typing.get_args(o.type) or (str,))[0]
            kwargs.update(nargs="+", action="extend", type=_parser_for(inner, False), default=argparse.SUPPRESS)
        else:
            kwargs["type"] = _parser_for(o.type, o.optional)
        if o.default is dataclasses.MISSING:
            kwargs.update(required=True, default=None)
        target.add_argument(o.flag, **kwargs)
    known = dict(parser.get_default("_config_flags") or {})
    known.update({(o.owner, o.field.name): o.flag for o in opts})
    parser.set_defaults(_config_flags=known)
    return opts


def dataclass_from_args(cls: type[T], args: argparse.Namespace, *, _dest: str = "") -> T:
    """Build `cls` (and its nested configs) from a namespace parsed with its `add_dataclass_arguments` options; fields
    absent from the namespace keep their defaults."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _unwrap_optional(_hints(cls)[f.name])
        if _is_config(tp) and f.metadata.get("cli") is not False:
            values[f.name] = dataclass_from_args(tp, args, _dest=f"{_dest}{f.name}.")
        elif hasattr(args, _dest + f.name):
            values[f.name] = getattr(args, _dest + f.name)
    return cls(**values)


def option_flags(args: argparse.Namespace) -> dict[tuple[Any, str], str]:
    """(config class, field) -> ``--option`` of the command that parsed `args` (for `ConfigError.render`)."""
    return dict(getattr(args, "_config_flags", None) or {})


def iter_flags(cls: type) -> Iterator[str]:
    """Every option name of `cls` (documentation checks)."""
    return (o.flag for o in options(cls))
