"""JSONL records: both shapes parse; every malformed line is reported with its file and line number."""

from __future__ import annotations

import json

import pytest

from quickloris.data.jsonl import DataFormatError, Record, load_jsonl, parse_record, records_from_dicts

CHAT = {"messages": [{"role": "user", "content": "1 + 2"}, {"role": "assistant", "content": "3"}]}
TEXT = {"prompt": "Q: 1 + 2 =", "completion": " 3"}


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines), encoding="utf-8"
    )
    return path


def test_both_shapes_and_blank_lines(tmp_path):
    conv = {
        "prompt": [{"role": "user", "content": "hi"}],
        "completion": [{"role": "assistant", "content": "yo"}],
        "id": 7,
    }
    path = _write(tmp_path, [CHAT, "", "   ", TEXT, conv])
    recs = load_jsonl(path)
    assert [r.is_chat for r in recs] == [True, False, True]
    assert recs[0].messages == ({"role": "user", "content": "1 + 2"}, {"role": "assistant", "content": "3"})
    assert (recs[1].prompt, recs[1].completion) == ("Q: 1 + 2 =", " 3")
    # conversational prompt/completion: prompt turns are context only, the completion is trained
    assert [m.get("train", True) for m in recs[2].messages] == [False, True]
    assert recs[0].source.endswith("data.jsonl:1") and recs[1].source.endswith("data.jsonl:4")


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"messages": [}', "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"question": "hello"}, r"no known record shape in keys 'question'; shapes: messages .*--data-columns"),
        ({"text": 3}, "'text' must be a string, got int"),
        ({"prompt": "a"}, "missing 'completion'"),
        ({"prompt": "a", "completion": 3}, "both be strings or both be lists"),
        ({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}, "both be strings or both be lists"),
        ({"messages": "hi"}, "must be a list"),
        ({"messages": []}, "empty list"),
        ({"messages": [{"role": "user"}]}, "missing 'content'"),
        ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}, "must be a string"),
        ({"messages": [{"role": 1, "content": "x"}]}, "non-empty string"),
        ({"messages": ["hi"]}, "must be an object"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no 'assistant' turn"),
        (
            {"messages": CHAT["messages"], "prompt": "a", "completion": "b"},
            r"fit several record shapes \(messages, prompt_completion\); choose one with --data-format",
        ),
        (
            {"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "b"}]},
            "no 'assistant' turn",
        ),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path, [CHAT, TEXT, "", bad, CHAT])
    with pytest.raises(DataFormatError, match=message) as info:
        load_jsonl(path)
    assert f"{path}:4:" in str(info.value)


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(CHAT).encode() + b"\n" + b'{"prompt": "\xff\xfe", "completion": "x"}\n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: not valid UTF-8"):
        load_jsonl(path)


def test_empty_missing_and_directory(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n")
    with pytest.raises(DataFormatError, match="contains no records"):
        load_jsonl(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataFormatError, match="a folder that is not a datasets save_to_disk folder"):
        load_jsonl(tmp_path)


def test_in_memory_rows_and_record_invariants():
    recs = records_from_dicts([CHAT, TEXT], source="rows")
    assert [r.source for r in recs] == ["rows[0]", "rows[1]"]
    with pytest.raises(DataFormatError, match=r"rows\[1\]: missing 'prompt'"):
        records_from_dicts([CHAT, {"completion": "x"}], source="rows")
    with pytest.raises(DataFormatError, match="no records"):
        records_from_dicts([])
    with pytest.raises(DataFormatError, match=r"one of 'messages', 'prompt' \+ 'completion' or 'text'"):
        Record(messages=({"role": "assistant", "content": "x"},), prompt="a", completion="b")
    with pytest.raises(DataFormatError, match="must both be strings"):
        Record(prompt="a", completion=None)
    assert parse_record(TEXT).source == "<memory>"
