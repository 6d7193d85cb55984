"""Embedded tasks: generated deterministically from a seed, scored by exact match.

The default, ``addition``, asks for the sum of two 3-digit numbers. SmolLM2-135M-Instruct gets 0 % of
them exactly zero-shot (it explains how to add, and the right sum appears in only ~3 % of its replies) and
72-86 % after 100 LoRA steps of 8 examples, 81-84 % after 120-150 (docs/demo-design.md). ``reverse``
(reverse a 5-7 digit string) is learnt faster (99.5 % after 60 steps) and is the easier alternative.
``tools`` (`quickloris.data.tool_task`) asks questions that need a call to one of three tools, then an answer from
the tool's result.

Train and held-out splits are disjoint by construction, for every seed and size: each problem has a
canonical key (for addition the unordered pair, so ``a + b`` and ``b + a`` land on the same side) and
goes to the held-out side iff ``crc32(key) % 8 == 0``. A split samples only problems of its own side,
without repeats.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from quickloris.data.jsonl import Record
from quickloris.data.splits import Split, draw_split, split_of  # noqa: F401  (Split: re-exported)
from quickloris.data.tool_task import TOOLS_TASK, ToolExample, ToolTask


@dataclass(frozen=True)
class TaskExample:
    """One problem: the instruction (system message), the question (user message) and the exact answer."""

    instruction: str
    question: str
    answer: str

    def prompt_messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.instruction}, {"role": "user", "content": self.question}]

    def messages(self) -> list[dict[str, str]]:
        return self.prompt_messages() + [{"role": "assistant", "content": self.answer}]

    def row(self) -> dict[str, list[dict[str, str]]]:
        return {"messages": self.messages()}


def extract_answer(text: str) -> str:
    """The model's answer: the first non-empty line of its reply, stripped."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def exact_match(prediction: str, answer: str) -> bool:
    """True iff the extracted answer equals `answer` exactly (no normalisation beyond stripping)."""
    return extract_answer(prediction) == answer


@dataclass(frozen=True)
class Task:
    """A generated task: `sample(rng) -> (question, answer, key)`; `key` decides the split."""

    name: str
    instruction: str
    sample: Callable[[random.Random], tuple[str, str, str]]
    description: str

    def split_of(self, key: str) -> Split:
        return split_of(self.name, key)

    def generate(self, split: Split, n: int, seed: int = 0) -> list[TaskExample]:
        """`n` distinct problems of `split`, the same list for the same (split, n, seed) on any machine."""
        draws = draw_split(self.name, split, n, seed, self.sample, distinct=lambda d: d[0], key=lambda d: d[2])
        return [TaskExample(self.instruction, question, answer) for question, answer, _ in draws]

    def records(self, split: Split, n: int, seed: int = 0) -> list[Record]:
        """Training records (system + user + assistant messages) for `quickloris.data.chat`."""
        return [
            Record(messages=tuple(ex.messages()), source=f"{self.name}:{split}[{i}]")
            for i, ex in enumerate(self.generate(split, n, seed))
        ]


def _addition(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return f"{a} + {b}", str(a + b), f"{min(a, b)}+{max(a, b)}"


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(5, 7)))
    return digits, digits[::-1], digits


TASKS: dict[str, Task | ToolTask] = {
    "addition": Task(
        "addition", "Add the two numbers.", _addition, "sum of two 3-digit numbers, e.g. '479 + 386' -> '865'"
    ),
    "reverse": Task("reverse", "Reverse the digits.", _reverse, "reverse a 5-7 digit string, e.g. '40172' -> '27104'"),
    "tools": TOOLS_TASK,  # tool calling (quickloris.data.tool_task), with the same interface
}
DEFAULT_TASK = "addition"


def get_task(name: str) -> Task | ToolTask:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}") from None


def write_jsonl(examples: Sequence[TaskExample | ToolExample], path: str | os.PathLike) -> None:
    """Write `examples` as JSONL lines (the format `quickloris.data.jsonl` reads: ``{"messages": [...]}``, with
    ``tools`` for the tool task), atomically."""
    from quickloris.utils.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(ex.row()) + "\n" for ex in examples))
