"""Scoring the tool-calling task (`quickloris.data.tool_task`): the call, then the final answer, by greedy generation.

Each held-out problem is generated twice, with the problem's tools rendered by the chat template:

1. after system + question: the reply's call (`quickloris.data.tools.parse_tool_call`: the JSON object at its first
   ``{``) is right iff its name is the reference tool's and its arguments equal the reference arguments as JSON values
   (``{"value": 12}`` equals ``{"value": 12.0}``; key order does not matter);
2. after the reference call and the tool's result: the reply's first line is right iff it equals the reference
   answer exactly (`quickloris.data.tasks.exact_match`). Feeding the reference call scores the answer on its own,
   whatever the call of step 1 was.

``accuracy`` / ``correct`` are the call's (the headline number); ``call_*`` and ``answer_*`` hold both. Each step
generates up to the longest reference reply (the tokens the training labels, end-of-turn marker included, counted
through the template) plus a few tokens, so a reply that goes on after the reference counts as wrong.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from quickloris.data.chat import tokenize_chat
from quickloris.data.tasks import exact_match
from quickloris.data.tool_task import ToolExample
from quickloris.data.tools import parse_tool_call
from quickloris.train.exact_match import _SLACK_TOKENS, EvalResult

# (prompts, per-prompt tools, max_new_tokens) -> greedy replies
Generate = Callable[[list[list[dict[str, Any]]], list[Any], int], list[str]]


def is_tool_task(examples: Sequence[Any]) -> bool:
    return bool(examples) and isinstance(examples[0], ToolExample)


def call_correct(reply: str, ex: ToolExample) -> bool:
    """Whether `reply` calls `ex`'s tool with `ex`'s arguments (compared as JSON values)."""
    return parse_tool_call(reply) == (ex.name, ex.arguments)


def _reply_tokens(tokenizer: Any, messages: list[dict[str, Any]], tools: Any, chat_template: str | None) -> int:
    """Trained tokens of the last turn of `messages`: what the model writes there, end-of-turn marker included."""
    msgs = [{**m, "train": i == len(messages) - 1} for i, m in enumerate(messages)]
    return tokenize_chat(tokenizer, msgs, tools=tools, chat_template=chat_template).num_trainable


def evaluate_tool_calls(
    generate: Generate,
    tokenizer: Any,
    examples: Sequence[ToolExample],
    *,
    chat_template: str | None = None,
    max_new_tokens: int | None = None,
    num_samples: int = 5,
) -> EvalResult:
    """Call and final-answer accuracy on `examples` (see the module docstring); `generate` produces the replies
    (`quickloris.train.exact_match.generate_replies` or its llama.cpp twin)."""
    if not examples:
        raise ValueError("no examples to evaluate")
    call_prompts = [ex.prompt_messages() for ex in examples]
    answer_prompts = [ex.answer_prompt_messages() for ex in examples]
    tools = [list(ex.tools) for ex in examples]
    if max_new_tokens is None:
        call_tokens = max(
            _reply_tokens(tokenizer, [*p, ex.call_message()], t, chat_template)
            for p, ex, t in zip(call_prompts, examples, tools)
        )
        answer_tokens = max(_reply_tokens(tokenizer, ex.messages(), t, chat_template) for ex, t in zip(examples, tools))
        call_tokens, answer_tokens = call_tokens + _SLACK_TOKENS, answer_tokens + _SLACK_TOKENS
    else:
        call_tokens = answer_tokens = max_new_tokens
    t0 = time.perf_counter()
    call_replies = generate(call_prompts, tools, call_tokens)
    answer_replies = generate(answer_prompts, tools, answer_tokens)
    seconds = time.perf_counter() - t0
    calls = [call_correct(r, ex) for r, ex in zip(call_replies, examples)]
    answers = [bool(exact_match(r, ex.answer)) for r, ex in zip(answer_replies, examples)]
    n = len(examples)
    samples = [
        {
            "question": ex.question,
            "answer": json.dumps({"name": ex.name, "arguments": ex.arguments}),
            "reply": cr,
            "correct": c,
            "final_answer": ex.answer,
            "final_reply": ar,
            "final_correct": a,
        }
        for ex, cr, c, ar, a in list(zip(examples, call_replies, calls, answer_replies, answers))[:num_samples]
    ]
    details = {
        "call_accuracy": sum(calls) / n,
        "call_correct": sum(calls),
        "answer_accuracy": sum(answers) / n,
        "answer_correct": sum(answers),
        "max_new_tokens_answer": answer_tokens,
    }
    return EvalResult(sum(calls) / n, sum(calls), n, seconds, call_tokens, samples, details)


def describe(result: dict[str, Any]) -> str:
    """``tool call 12.0% (24/200), final answer 80.0% (160/200)`` for a tool result, else ``exact match ...``."""
    if "call_accuracy" in result:
        return (
            f"tool call {100 * result['call_accuracy']:.1f}% ({result['call_correct']}/{result['total']}), "
            f"final answer {100 * result['answer_accuracy']:.1f}% ({result['answer_correct']}/{result['total']})"
        )
    return f"exact match {100 * result['accuracy']:.1f}% ({result['correct']}/{result['total']})"


def echo_eval(echo: Callable[[str], None], label: str, result: dict[str, Any]) -> None:
    """One line of scores, then a few replies (the tool task: the call, whole, then the final answer's first line)."""

    def first_line(text: str) -> str:
        return text.strip().splitlines()[0] if text.strip() else ""

    def verdict(right: bool, expected: str) -> str:
        return "right" if right else f"expected {expected!r}: wrong"

    echo(f"eval{' ' + label if label else ''}: {describe(result)} in {result['seconds']:.1f} s")
    for s in result["samples"]:
        if "final_reply" in s:
            echo(f"    {s['question']!r} -> {s['reply'].strip()[:100]!r}  ({verdict(s['correct'], s['answer'])})")
            final = verdict(s["final_correct"], s["final_answer"])
            echo(f"      then -> {first_line(s['final_reply'])[:60]!r}  ({final})")
        else:
            echo(
                f"    {s['question']!r} -> {first_line(s['reply'])[:60]!r}  "
                f"(expected {s['answer']!r}: {'right' if s['correct'] else 'wrong'})"
            )
