"""Record shapes: detection from the keys (or forced), the conversion of each shape to a canonical Record (Alpaca's
composition, ShareGPT's roles, content parts), column mapping, and one-line errors naming the record."""

from __future__ import annotations

import pytest

from quickloris.data.errors import DataFormatError
from quickloris.data.jsonl import parse_record, records_from_dicts
from quickloris.data.shapes import column_problem, detect, parse_columns

CHAT = [{"role": "user", "content": "1 + 2"}, {"role": "assistant", "content": "3"}]


@pytest.mark.parametrize(
    "row, shape",
    [
        ({"messages": CHAT}, "messages"),
        ({"messages": CHAT, "prompt": "p", "prompt_id": "x"}, "messages"),  # ultrachat: a prompt without completion
        ({"conversations": [], "id": 3}, "sharegpt"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"completion": "c"}, "prompt_completion"),  # reported as missing 'prompt' by the conversion
        ({"instruction": "i", "input": "", "output": "o", "text": "### Instruction: i"}, "alpaca"),  # tatsu-lab
        ({"output": "o", "text": "t"}, "alpaca"),  # a broken alpaca row is not read as text
        ({"text": "t", "label": 1}, "text"),
    ],
)
def test_detection(row, shape):
    assert detect(row, "f:1") == shape


@pytest.mark.parametrize(
    "row, message",
    [
        ([1, 2], "f:1: expected a JSON object"),
        ({"question": "q", "answer": "a"}, "f:1: no known record shape in keys 'question', 'answer'; shapes: messages"),
        ({"messages": CHAT, "prompt": "p", "completion": "c"}, r"fit several record shapes \(messages, prompt_comp"),
        ({"prompt": "p", "instruction": "i"}, r"fit several record shapes \(prompt_completion, alpaca\)"),
    ],
)
def test_detection_errors(row, message):
    with pytest.raises(DataFormatError, match=message) as info:
        detect(row, "f:1")
    assert "\n" not in str(info.value)


def test_no_shape_lists_the_keys_found_and_every_shape():
    with pytest.raises(DataFormatError) as info:
        detect({f"k{i}": i for i in range(15)}, "f:1")
    msg = str(info.value)
    assert "'k0', 'k1'" in msg and "and 3 more" in msg and "--data-columns" in msg
    for shape in ("messages", "prompt_completion", "alpaca", "sharegpt", "text"):
        assert shape in msg


def test_alpaca_follows_llama_factory_composition():
    rec = parse_record({"instruction": "Add", "input": "1 and 2", "output": "3", "system": "Be brief."}, "f:1")
    assert rec.messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add\n1 and 2"},
        {"role": "assistant", "content": "3"},
    )
    # no input (absent, empty or null: Parquet / CSV), no system, history turns before
    for row in ({"instruction": "Hi", "output": "Yo"}, {"instruction": "Hi", "input": None, "output": "Yo"}):
        assert parse_record(row).messages == ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"})
    rec = parse_record({"instruction": "B?", "input": "", "output": "b", "history": [["A?", "a"]], "system": ""})
    assert [m["content"] for m in rec.messages] == ["A?", "a", "B?", "b"]
    with pytest.raises(DataFormatError, match="f:2: 'output' must be a string, got null"):
        parse_record({"instruction": "x", "output": None}, "f:2")
    with pytest.raises(DataFormatError, match=r"f:2: missing 'instruction' for an alpaca record; found keys 'outpu"):
        parse_record({"output": "x", "text": "y"}, "f:2")
    with pytest.raises(DataFormatError, match=r"history\[0\] must be an \[instruction, response\] pair"):
        parse_record({"instruction": "x", "output": "y", "history": [["only one"]]}, "f:2")


def test_sharegpt_roles_system_and_extra_keys():
    row = {
        "system": "Be brief.",
        "conversations": [
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "yo", "weight": None},
            {"from": "user", "value": "2+2"},
            {"role": "assistant", "content": "4"},  # TRL's converter takes role / content too
        ],
    }
    rec = parse_record(row, "f:1")
    assert [(m["role"], m["content"]) for m in rec.messages] == [
        ("system", "Be brief."),
        ("user", "hi"),
        ("assistant", "yo"),
        ("user", "2+2"),
        ("assistant", "4"),
    ]
    with pytest.raises(DataFormatError, match=r"f:1: conversations\[0\]\['from'\] is 'bot'; ShareGPT roles: human"):
        parse_record({"conversations": [{"from": "bot", "value": "x"}]}, "f:1")
    with pytest.raises(DataFormatError, match="no 'assistant' turn"):
        parse_record({"conversations": [{"from": "human", "value": "x"}]}, "f:1")
    with pytest.raises(DataFormatError, match="'conversations' must be a non-empty list"):
        parse_record({"conversations": []}, "f:1")


def test_content_parts_are_joined_and_images_refused():
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "1 + 2?", "image_url": None}]
    rec = parse_record({"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "3"}]})
    assert rec.messages[0] == {"role": "user", "content": "What is 1 + 2?"}
    image = [{"type": "image_url", "image_url": {"url": "data:..."}}, {"type": "text", "text": "what is it?"}]
    with pytest.raises(DataFormatError, match=r"f:3: messages\[0\]: content part 0 is an image: image parts need a"):
        parse_record({"messages": [{"role": "user", "content": image}, CHAT[1]]}, "f:3")
    with pytest.raises(DataFormatError, match=r"content part 0 must be \{'type': 'text', 'text': str\}"):
        parse_record({"messages": [{"role": "user", "content": [{"type": "audio"}]}, CHAT[1]]}, "f:3")
    # parts in prompt/completion lists and ShareGPT values too
    rec = parse_record({"prompt": [{"role": "user", "content": parts}], "completion": [CHAT[1]]})
    assert rec.messages[0]["content"] == "What is 1 + 2?"
    assert parse_record({"conversations": [{"from": "human", "value": parts}, {"from": "gpt", "value": "3"}]}).messages[
        0
    ]["content"] == ("What is 1 + 2?")


def test_null_message_keys_from_columnar_files_are_dropped():
    msgs = [{"role": "user", "content": "hi", "name": None}, {"role": "assistant", "content": "yo", "name": None}]
    assert parse_record({"messages": msgs, "tools": None}).messages == tuple(
        {"role": m["role"], "content": m["content"]} for m in msgs
    )


def test_text_records_and_forced_formats():
    assert parse_record({"text": "abc", "meta": 1}).text == "abc"
    assert parse_record({"text": "abc", "output": "x"}, shape="text").text == "abc"  # forced: no alpaca detection
    with pytest.raises(DataFormatError, match="f:1: missing 'text' for a text record; found keys 'body'"):
        parse_record({"body": "abc"}, "f:1", shape="text")
    rec = parse_record({"messages": CHAT, "prompt": "p", "completion": "c"}, shape="prompt_completion")
    assert (rec.prompt, rec.completion) == ("p", "c")
    recs = records_from_dicts([{"text": "a"}, {"messages": CHAT}], source="rows")
    assert [r.kind for r in recs] == ["text", "messages"]


def test_column_mapping():
    cols = parse_columns(["prompt=question", "completion=answer"])
    rec = parse_record({"question": "Q", "answer": "A", "prompt": "ignored"}, "f:1", columns=cols)
    assert (rec.prompt, rec.completion) == ("Q", "A")
    rec = parse_record({"q": "Add", "a": "3"}, columns=parse_columns(["instruction=q", "output=a"]))
    assert rec.messages[-1] == {"role": "assistant", "content": "3"}
    with pytest.raises(DataFormatError, match="f:1: --data-columns names 'answer', which this record does not have"):
        parse_record({"question": "Q", "reply": "A"}, "f:1", columns=cols)
    assert column_problem(["prompt=q", "completion=a"]) is None
    assert "takes name=column items" in column_problem(["prompt"])
    assert "maps 'answer', which no record shape reads" in column_problem(["answer=a"])
    assert "maps 'prompt' twice" in column_problem(["prompt=a", "prompt=b"])
    with pytest.raises(ValueError, match="--data-columns takes name=column"):
        parse_columns(["=x"])


def test_alpaca_with_an_empty_instruction_keeps_the_input_alone():
    rec = parse_record({"instruction": "", "input": "12 + 30", "output": "42"})
    assert rec.messages[0] == {"role": "user", "content": "12 + 30"}
