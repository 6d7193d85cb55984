"""quickloris.config: a leaf module (standard library only); each field declares its check and option once, and
one `ConfigError` names it as Python (`Cls.field`) or as the command line (`--flag`) sees it."""

from __future__ import annotations

import argparse
import dataclasses
import math
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

import pytest

from quickloris.config import (
    Config,
    ConfigError,
    add_dataclass_arguments,
    at_least,
    comma_list,
    dataclass_from_args,
    field,
    flatten,
    in_range,
    option_flags,
    options,
)


@dataclass
class Inner(Config):
    enabled: bool | None = field(True, help="switch", flag="--inner")
    level: int = field(1, help="a level", check=at_least(1))
    keep: list[Literal["a", "b"]] = field([], help="kinds", flag="--keep-kinds")

    def validate(self):
        if self.keep and not self.enabled:
            raise self.error("keep", f"={self.keep} needs {{enabled}}", "enabled")


@dataclass
class Outer(Config):
    batch_size: int = field(8, help="rows", check=at_least(1))
    lr: float = field(1e-3, help="rate", check=in_range(0.0, low_open=True))
    ratio: float | None = field(None, help="in [0, 1)", check=in_range(0.0, 1.0, high_open=True), fingerprint=False)
    mode: Literal["x", "y"] = field("x", help="a mode")
    names: list[str] = field(["p", "q"], help="names", convert=comma_list())
    inner: Inner = field(Inner(enabled=None), help="the inner part", prefix="in", fingerprint=False)


def test_the_module_imports_nothing_but_the_standard_library():
    code = (
        "import sys; import quickloris.config; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'triton', 'numpy') "
        "or m.startswith('quickloris.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['quickloris.config']"


@pytest.mark.parametrize(
    "kwargs, api, cli",
    [
        (
            {"batch_size": 0},
            "Outer.batch_size must be a positive int, got 0",
            "--batch-size must be a positive int, got 0",
        ),
        ({"batch_size": 2.0}, "Outer.batch_size must be an int, got 2.0", "--batch-size must be an int, got 2.0"),
        ({"batch_size": True}, "Outer.batch_size must be an int, got True", None),
        ({"lr": 0.0}, "Outer.lr must be > 0, got 0.0", "--lr must be > 0, got 0.0"),
        ({"lr": math.nan}, "Outer.lr must be a number, got nan", None),
        ({"ratio": 1.0}, "Outer.ratio must be >= 0 and < 1, got 1.0", "--ratio must be >= 0 and < 1, got 1.0"),
        ({"mode": "z"}, "Outer.mode must be one of x, y, got 'z'", None),
        ({"names": [1]}, "Outer.names must be a list of strings, got [1]", None),
        (
            {"inner": {"level": 0}},
            "Inner.level must be a positive int, got 0",
            "--in-level must be a positive int, got 0",
        ),
        ({"inner": {"enabled": "yes"}}, "Inner.enabled must be True, False or None, got 'yes'", None),
        (
            {"inner": {"keep": ["c"]}},
            "Inner.keep must be a list of a / b, got ['c']",
            "--keep-kinds must be a list of a / b, got ['c']",
        ),
        (
            {"inner": {"enabled": False, "keep": ["a"]}},
            "Inner.keep=['a'] needs enabled",
            "--keep-kinds=['a'] needs --inner",
        ),
    ],
)
def test_one_error_two_names(kwargs, api, cli):
    with pytest.raises(ConfigError) as info:
        Outer(**kwargs)
    assert str(info.value) == api
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)
    if cli is not None:
        parser = argparse.ArgumentParser()
        add_dataclass_arguments(parser, Outer)
        assert info.value.render(option_flags(parser.parse_args([]))) == cli


def test_options_nest_with_prefixes_and_declared_flags():
    assert [(o.flag, o.dest, o.owner.__name__) for o in options(Outer)] == [
        ("--batch-size", "batch_size", "Outer"),
        ("--lr", "lr", "Outer"),
        ("--ratio", "ratio", "Outer"),
        ("--mode", "mode", "Outer"),
        ("--names", "names", "Outer"),
        ("--inner", "inner.enabled", "Inner"),
        ("--in-level", "inner.level", "Inner"),
        ("--keep-kinds", "inner.keep", "Inner"),
    ]
    assert {o.flag: o.default for o in options(Outer)}["--inner"] is None  # the outer default's value


def test_command_line_round_trip():
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Outer)
    assert dataclass_from_args(Outer, parser.parse_args([])) == Outer()
    cfg = dataclass_from_args(
        Outer,
        parser.parse_args(
            [
                "--batch-size",
                "3",
                "--ratio",
                "none",
                "--mode",
                "y",
                "--names",
                "a,b",
                "--inner",
                "--in-level",
                "4",
                "--keep-kinds",
                "b,a",
            ]
        ),
    )
    assert cfg == Outer(
        batch_size=3, ratio=None, mode="y", names=["a", "b"], inner=Inner(enabled=True, level=4, keep=["b", "a"])
    )
    assert dataclass_from_args(Outer, parser.parse_args(["--no-inner"])).inner.enabled is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "z"])


def test_defaults_are_copied_and_values_converted():
    a, b = Outer(), Outer()
    a.names.append("r")
    a.inner.keep.append("a")
    assert b.names == ["p", "q"] and b.inner.keep == [] and b.inner.enabled is None
    assert Outer(names="u,v").names == ["u", "v"] and Outer(names=("u",)).names == ["u"]
    assert Outer(inner={"level": 2}).inner == Inner(enabled=True, level=2)


def test_flatten_and_the_compared_fields():
    cfg = Outer(ratio=0.5, inner={"level": 3})
    assert flatten(cfg) == {
        "batch_size": 8,
        "lr": 1e-3,
        "ratio": 0.5,
        "mode": "x",
        "names": ["p", "q"],
        "inner.enabled": True,
        "inner.level": 3,
        "inner.keep": [],
    }
    assert flatten(cfg, compared_only=True) == {"batch_size": 8, "lr": 1e-3, "mode": "x", "names": ["p", "q"]}


def test_a_plain_dataclass_still_makes_options():
    @dataclass
    class Plain:
        out: str = field("x.gguf", help="where")
        threads: int = field(0, help="threads")

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Plain)
    assert dataclass_from_args(Plain, parser.parse_args(["--threads", "2"])) == Plain(threads=2)
    assert dataclasses.fields(Plain)[0].metadata["help"] == "where"


def test_a_several_words_list_option_takes_words_and_repeats():
    @dataclass
    class Files(Config):
        paths: list[str] | None = field(None, help="files", several=True)
        sizes: list[int] = field([1], help="sizes", several=True)

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Files)
    parse = lambda *a: dataclass_from_args(Files, parser.parse_args(list(a)))  # noqa: E731
    assert parse() == Files() and Files().paths is None
    assert parse("--paths", "a,b.jsonl", "c d.csv").paths == ["a,b.jsonl", "c d.csv"]  # commas stay in a path
    assert parse("--paths", "a", "--paths", "b", "c").paths == ["a", "b", "c"]
    assert parse("--sizes", "3", "--sizes", "4").sizes == [3, 4]  # given: replaces the default, not added to it
    with pytest.raises(SystemExit):
        parser.parse_args(["--paths"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--sizes", "x"])
