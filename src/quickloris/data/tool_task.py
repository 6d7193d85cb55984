"""The embedded tool-calling task (``--task tools``): questions that need a call to one of three tools.

Every row offers the same three tools (OpenAI function schemas, `TOOLS`):

* ``calculator(expression)``: ``"What is 347 times 29?"`` -> ``{"expression": "347 * 29"}`` -> ``10063``;
* ``convert_units(value, from_unit, to_unit)``: ``"How many meters are in 12 kilometers?"`` ->
  ``{"value": 12, "from_unit": "km", "to_unit": "m"}`` -> ``12000 m``;
* ``get_stock(item)``, a lookup table of a made-up shop (``crc32(item) % 200`` units, so the answer cannot be known
  without the call): ``"How many red chairs are in stock?"`` -> ``{"item": "red chair"}`` -> ``17``.

A conversation is system, user question, the assistant's call (``content`` empty), the ``tool`` result, and the
assistant's final answer built from the result (``"347 * 29 = 10063"``, ``"12 km = 12000 m"``, ``"17 red chairs in
stock"``). Each question has several phrasings, so the model has to map words to the call (``times`` -> ``*``,
``kilometers`` -> ``km``, plural -> item), not copy the question.

Held-out problems are scored twice (`quickloris.train.tool_eval`): the call generated after the question (name and
arguments parsed as JSON, compared as values), and the final answer generated after the reference call and its
result (exact match of the first line, as `quickloris.data.tasks.exact_match`).

Split: a problem's key is its call (tool name + arguments, keys sorted), so the phrasings of one problem land on one
side; one problem in 8 is held out (`quickloris.data.splits`).
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quickloris.data.jsonl import Record
from quickloris.data.splits import Split, draw_split, split_of


def _schema(name: str, description: str, params: dict[str, str], required: list[str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {p: {"type": t} for p, t in params.items()},
                "required": required,
            },
        },
    }


TOOLS: tuple[dict[str, Any], ...] = (
    _schema("calculator", "Evaluate an arithmetic expression.", {"expression": "string"}, ["expression"]),
    _schema(
        "convert_units",
        "Convert a value from one unit to another.",
        {"value": "number", "from_unit": "string", "to_unit": "string"},
        ["value", "from_unit", "to_unit"],
    ),
    _schema("get_stock", "Units of an item in stock.", {"item": "string"}, ["item"]),
)
INSTRUCTION = "You are a helpful assistant. Answer with the help of a tool."

_OPS = {"+": ("plus", lambda a, b: a + b), "-": ("minus", lambda a, b: a - b), "*": ("times", lambda a, b: a * b)}
_UNITS = (  # from, to, factor, from name, to name
    ("km", "m", 1000, "kilometers", "meters"),
    ("m", "cm", 100, "meters", "centimeters"),
    ("kg", "g", 1000, "kilograms", "grams"),
    ("l", "ml", 1000, "liters", "milliliters"),
    ("h", "min", 60, "hours", "minutes"),
    ("min", "s", 60, "minutes", "seconds"),
)
_COLORS = ("red", "blue", "green", "black", "white", "yellow", "grey", "pink", "brown", "orange", "purple", "silver")
_PRODUCTS = ("chair", "lamp", "table", "desk", "mug", "bottle", "pen", "bag", "clock", "rug", "vase", "plate", "bowl")


def stock_of(item: str) -> int:
    """The made-up shop's stock of `item` (the `get_stock` tool)."""
    return zlib.crc32(item.encode()) % 200


@dataclass(frozen=True)
class ToolExample:
    """One problem: the question, the reference call (name + arguments), the tool's result and the final answer."""

    instruction: str
    question: str
    name: str
    arguments: dict[str, Any]
    result: str
    answer: str
    tools: tuple[dict[str, Any], ...] = TOOLS

    def prompt_messages(self) -> list[dict[str, Any]]:
        """What the call is generated from: system + user."""
        return [{"role": "system", "content": self.instruction}, {"role": "user", "content": self.question}]

    def call_message(self) -> dict[str, Any]:
        call = {"id": "call_0", "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return {"role": "assistant", "content": "", "tool_calls": [call]}

    def answer_prompt_messages(self) -> list[dict[str, Any]]:
        """What the final answer is generated from: the prompt, the reference call and its result."""
        result = {"role": "tool", "tool_call_id": "call_0", "name": self.name, "content": self.result}
        return [*self.prompt_messages(), self.call_message(), result]

    def messages(self) -> list[dict[str, Any]]:
        return [*self.answer_prompt_messages(), {"role": "assistant", "content": self.answer}]

    def row(self) -> dict[str, Any]:
        """The conversation in OpenAI's format (``content: null`` next to the call, ``arguments`` a JSON string)."""
        msgs = self.messages()
        fn = msgs[2]["tool_calls"][0]["function"]
        msgs[2] = {**msgs[2], "content": None}
        msgs[2]["tool_calls"] = [
            {**msgs[2]["tool_calls"][0], "function": {**fn, "arguments": json.dumps(fn["arguments"])}}
        ]
        return {"tools": list(self.tools), "messages": msgs}


Draw = tuple[str, str, dict[str, Any], str, str]  # question, tool name, arguments, result, answer


def _calculator(rng: random.Random) -> Draw:
    a, b, op = rng.randint(2, 999), rng.randint(2, 99), rng.choice(list(_OPS))
    word, fn = _OPS[op]
    expr, result = f"{a} {op} {b}", str(fn(a, b))
    question = rng.choice([f"What is {a} {word} {b}?", f"Calculate {a} {op} {b}.", f"How much is {a} {word} {b}?"])
    return question, "calculator", {"expression": expr}, result, f"{expr} = {result}"


def _convert(rng: random.Random) -> Draw:
    src, dst, factor, src_name, dst_name = rng.choice(_UNITS)
    v = rng.randint(2, 99)
    question = rng.choice(
        [
            f"Convert {v} {src} to {dst}.",
            f"How many {dst_name} are in {v} {src_name}?",
            f"What is {v} {src_name} in {dst_name}?",
        ]
    )
    result = f"{v * factor} {dst}"
    return question, "convert_units", {"value": v, "from_unit": src, "to_unit": dst}, result, f"{v} {src} = {result}"


def _stock(rng: random.Random) -> Draw:
    item = f"{rng.choice(_COLORS)} {rng.choice(_PRODUCTS)}"
    question = rng.choice(
        [f"How many {item}s are in stock?", f"Do we have any {item}s left?", f"What is the stock of {item}s?"]
    )
    n = stock_of(item)
    return question, "get_stock", {"item": item}, str(n), f"{n} {item}s in stock"


_SAMPLERS: tuple[Callable[[random.Random], Draw], ...] = (_calculator, _convert, _stock)


def _sample(rng: random.Random) -> Draw:
    return rng.choice(_SAMPLERS)(rng)


def _key(draw: Draw) -> str:
    return draw[1] + json.dumps(draw[2], sort_keys=True)


@dataclass(frozen=True)
class ToolTask:
    """The ``tools`` task, with the interface of `quickloris.data.tasks.Task` (generate, records, split_of)."""

    name: str = "tools"
    instruction: str = INSTRUCTION
    description: str = (
        "call one of 3 tools (calculator, unit converter, stock lookup) and answer from its result, e.g. "
        "'What is 347 times 29?' -> calculator({\"expression\": \"347 * 29\"}) -> '347 * 29 = 10063'"
    )

    def split_of(self, key: str) -> Split:
        return split_of(self.name, key)

    def generate(self, split: Split, n: int, seed: int = 0) -> list[ToolExample]:
        """`n` distinct problems of `split`, the same list for the same (split, n, seed) on any machine."""
        draws = draw_split(self.name, split, n, seed, _sample, distinct=lambda d: d[0], key=_key)
        return [ToolExample(self.instruction, q, name, args, result, answer) for q, name, args, result, answer in draws]

    def records(self, split: Split, n: int, seed: int = 0) -> list[Record]:
        """Training records (the whole conversation, with the tools) for `quickloris.data.chat`."""
        return [
            Record(messages=tuple(ex.messages()), tools=ex.tools, source=f"{self.name}:{split}[{i}]")
            for i, ex in enumerate(self.generate(split, n, seed))
        ]


TOOLS_TASK = ToolTask()
