"""The embedded tool-calling task: deterministic, disjoint splits, calls and answers that follow from the tools, OpenAI
rows that read back, and conversations that fit the default --max-seq-len with SmolLM2 and the shipped template."""

from __future__ import annotations

import json
import re

import pytest

from quickloris.data.chat import tokenize_records
from quickloris.data.jsonl import load_jsonl, parse_record
from quickloris.data.tasks import get_task, write_jsonl
from quickloris.data.tool_task import TOOLS, TOOLS_TASK, ToolExample, stock_of
from quickloris.data.tools import tool_template

UNITS = {("km", "m"): 1000, ("m", "cm"): 100, ("kg", "g"): 1000, ("l", "ml"): 1000, ("h", "min"): 60, ("min", "s"): 60}


def _run_tool(ex: ToolExample) -> str:
    """The tools, written here from their descriptions, not from the task's code."""
    a = ex.arguments
    if ex.name == "calculator":
        left, op, right = a["expression"].split(" ")
        x, y = int(left), int(right)
        return str({"+": x + y, "-": x - y, "*": x * y}[op])
    if ex.name == "convert_units":
        return f"{a['value'] * UNITS[a['from_unit'], a['to_unit']]} {a['to_unit']}"
    return str(stock_of(a["item"]))


def test_registered_and_deterministic(seed):
    assert get_task("tools") is TOOLS_TASK
    s = seed % 1000
    assert TOOLS_TASK.generate("train", 50, s) == TOOLS_TASK.generate("train", 50, s)
    assert TOOLS_TASK.generate("train", 50, s) != TOOLS_TASK.generate("train", 50, s + 1)
    assert TOOLS_TASK.generate("train", 20, s) == TOOLS_TASK.generate("train", 50, s)[:20]


def test_calls_results_and_answers_follow_from_the_tools(seed):
    exs = TOOLS_TASK.generate("train", 300, seed % 1000) + TOOLS_TASK.generate("heldout", 100, seed % 1000)
    assert {ex.name for ex in exs} == {"calculator", "convert_units", "get_stock"}
    for ex in exs:
        assert ex.result == _run_tool(ex), ex
        assert ex.tools == TOOLS and ex.name in {t["function"]["name"] for t in ex.tools}
        props = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == ex.name)
        assert list(ex.arguments) == list(props["properties"]) == props["required"]
        if ex.name == "calculator":
            assert ex.answer == f"{ex.arguments['expression']} = {ex.result}"
            nums = re.findall(r"\d+", ex.question)
            assert nums == re.findall(r"\d+", ex.arguments["expression"])
        elif ex.name == "convert_units":
            assert ex.answer == f"{ex.arguments['value']} {ex.arguments['from_unit']} = {ex.result}"
            assert str(ex.arguments["value"]) in ex.question
        else:
            assert ex.answer == f"{ex.result} {ex.arguments['item']}s in stock"
            assert ex.arguments["item"] + "s" in ex.question


@pytest.mark.parametrize("s", [0, 1, 12345])
def test_splits_are_disjoint_by_call(s):
    def key(ex):
        return ex.name + json.dumps(ex.arguments, sort_keys=True)

    train, held = TOOLS_TASK.generate("train", 1200, s), TOOLS_TASK.generate("heldout", 200, s)
    assert len({ex.question for ex in train}) == 1200 and len({ex.question for ex in held}) == 200
    assert not {key(ex) for ex in train} & {key(ex) for ex in held}
    assert all(TOOLS_TASK.split_of(key(ex)) == "heldout" for ex in held)


def test_rows_are_openai_format_and_read_back(tmp_path):
    exs = TOOLS_TASK.generate("heldout", 5, 3)
    row = exs[0].row()
    call = row["messages"][2]
    assert call["content"] is None and isinstance(call["tool_calls"][0]["function"]["arguments"], str)
    assert row["messages"][3]["role"] == "tool" and row["messages"][3]["tool_call_id"] == call["tool_calls"][0]["id"]
    write_jsonl(exs, tmp_path / "t.jsonl")
    recs = load_jsonl(tmp_path / "t.jsonl")
    assert [r.tools for r in recs] == [TOOLS] * 5
    # reading the OpenAI row gives the conversation the task trains on
    assert [list(r.messages) for r in recs] == [list(parse_record({"messages": ex.messages()}).messages) for ex in exs]
    assert [r.messages for r in TOOLS_TASK.records("heldout", 5, 3)] == [r.messages for r in recs]


def test_conversations_fit_the_default_max_seq_len(smollm2_tokenizer):
    records = TOOLS_TASK.records("train", 400, 0) + TOOLS_TASK.records("heldout", 100, 0)
    examples, stats = tokenize_records(
        smollm2_tokenizer, records, max_seq_len=256, overflow="error", chat_template=tool_template()
    )
    assert stats.kept == 500 and stats.longest <= 256
    assert all(ex.num_trainable > 10 for ex in examples)  # the call and the answer


def test_signatures_are_shorter_than_json(smollm2_tokenizer):
    """What README and the template say: the three tools take 61 SmolLM2 tokens as the template's signatures, 208 as
    JSON schemas (one per line, as Hermes-style templates list them)."""
    tok = smollm2_tokenizer
    ex = TOOLS_TASK.generate("train", 1, 0)[0]
    text = tok.apply_chat_template(
        ex.prompt_messages(), tools=list(TOOLS), chat_template=tool_template(), tokenize=False
    )
    listing = text[text.index("Tools:\n") + len("Tools:\n") : text.index("\nTo call a tool")]
    assert listing.splitlines()[0] == "calculator(expression: string) - Evaluate an arithmetic expression."

    def count(s):
        return len(tok(s, add_special_tokens=False)["input_ids"])

    assert (count(listing), count("\n".join(json.dumps(t) for t in TOOLS))) == (61, 208)
