"""Training records: the canonical `Record` every data shape becomes, its checks, and reading data files.

A file (`quickloris.data.sources`: JSON lines / array, CSV, Parquet, Arrow, a ``save_to_disk`` folder) gives rows;
each row's shape (`quickloris.data.shapes`: messages, prompt_completion, alpaca, sharegpt, text) is detected from its
keys (or forced with ``--data-format``) and the row becomes one of three canonical records (keys other than the
ones a shape reads are ignored):

* ``messages`` -- a conversation ``[{"role": ..., "content": str}, ...]``, rendered with the tokenizer's chat
  template; every ``assistant`` turn is trained, everything else is context (labels -100). Alpaca and ShareGPT
  rows become conversations.
* ``prompt`` + ``completion`` -- either two strings (plain text, no chat template: the model is trained on ``C``
  plus the end-of-sequence token after ``P``, the TRL "standard" convention) or two lists of messages
  (conversational: ``prompt + completion`` is rendered as one conversation, the completion's assistant turns are
  trained).
* ``text`` -- language modelling: every token trained, an end-of-sequence token appended (TRL's convention).

Tool calling (OpenAI's format, `quickloris.data.tools`): a chat row may carry a ``tools`` list of function schemas,
assistant messages ``tool_calls`` (``content`` null, empty or text) and ``{"role": "tool", "tool_call_id": ...,
"content": ...}`` results; they are rendered by the chat template with ``tools=``.

Every problem is reported as a `DataFormatError` (a `ValueError`) naming the file and the 1-based line (``file:row
N`` for Parquet / Arrow rows), so that a 100k-line file with one bad line says where to look.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from quickloris.data import shapes
from quickloris.data.errors import DataFormatError
from quickloris.data.sources import Source, open_source
from quickloris.data.tools import check_tool_message, check_tools, is_tool_message

__all__ = ["DataFormatError", "Record", "iter_jsonl", "load_jsonl", "parse_record", "records_from_dicts"]


@dataclass(frozen=True)
class Record:
    """One training example, before tokenization.

    Exactly one of the three kinds is set: ``messages`` (a conversation), ``prompt`` + ``completion`` (plain
    text, the completion trained) or ``text`` (language modelling, all trained). ``source`` is ``"file:line"``
    (or a caller-chosen label) for error messages.
    """

    messages: tuple[Mapping[str, Any], ...] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    source: str = "<memory>"
    tools: tuple[Mapping[str, Any], ...] | None = None  # function schemas the chat template renders (tools=)

    def __post_init__(self) -> None:
        is_chat = self.messages is not None
        is_pair = self.prompt is not None or self.completion is not None
        is_text = self.text is not None
        if is_chat + is_pair + is_text != 1:
            raise DataFormatError(f"{self.source}: a record holds one of 'messages', 'prompt' + 'completion' or 'text'")
        if is_pair and not (isinstance(self.prompt, str) and isinstance(self.completion, str)):
            raise DataFormatError(f"{self.source}: 'prompt' and 'completion' must both be strings")
        if is_text and not isinstance(self.text, str):
            raise DataFormatError(f"{self.source}: 'text' must be a string")
        if self.tools is not None and not is_chat:
            raise DataFormatError(f"{self.source}: 'tools' need a chat record ('messages' or message lists)")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def kind(self) -> str:
        """``messages``, ``prompt_completion`` or ``text``."""
        return "messages" if self.is_chat else "text" if self.text is not None else "prompt_completion"


def _check_messages(messages: Any, where: str, key: str) -> tuple[dict[str, Any], ...]:
    if not isinstance(messages, list):
        raise DataFormatError(
            f"{where}: {key!r} must be a list of {{'role', 'content'}} objects, got {type(messages).__name__}"
        )
    if not messages:
        raise DataFormatError(f"{where}: {key!r} is an empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataFormatError(
                f"{where}: {key}[{i}] must be an object with 'role' and 'content', got {type(m).__name__}"
            )
        if is_tool_message(m):  # tool_calls / tool results: validated and normalised by quickloris.data.tools
            out.append(check_tool_message(m, f"{where}: {key}[{i}]"))
            continue
        missing = [k for k in ("role", "content") if k not in m]
        if missing:
            raise DataFormatError(f"{where}: {key}[{i}] is missing {', '.join(map(repr, missing))}")
        if not isinstance(m["role"], str) or not m["role"]:
            raise DataFormatError(f"{where}: {key}[{i}]['role'] must be a non-empty string, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise DataFormatError(f"{where}: {key}[{i}]['content'] must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _row_tools(obj: dict[str, Any], where: str) -> tuple[dict[str, Any], ...] | None:
    return None if obj.get("tools") is None else check_tools(obj["tools"], where)


def parse_record(
    obj: Any,
    where: str = "<memory>",
    *,
    shape: str = "auto",
    columns: Mapping[str, str] | None = None,
) -> Record:
    """Validate one decoded row and turn it into a `Record` (errors name `where`).

    `shape`: one of `quickloris.data.shapes.SHAPES`, or ``auto`` (detected from the keys); `columns`: the
    ``--data-columns`` renaming (name -> the row's column)."""
    row = shapes.rename(obj, columns or {}, where)
    if shape == "auto":
        shape = shapes.detect(row, where)
    kind, row = shapes.convert(row, shape, where)
    if kind == "text":
        return Record(text=row["text"], source=where)
    if kind == "messages":
        messages = _check_messages(row["messages"], where, "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataFormatError(f"{where}: the conversation has no 'assistant' turn, so nothing to train on")
        return Record(messages=messages, source=where, tools=_row_tools(row, where))
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return Record(prompt=prompt, completion=completion, source=where, tools=_row_tools(row, where))
    if isinstance(prompt, list) and isinstance(completion, list):
        p = _check_messages(prompt, where, "prompt")
        c = _check_messages(completion, where, "completion")
        if not any(m["role"] == "assistant" for m in c):
            raise DataFormatError(f"{where}: 'completion' has no 'assistant' turn, so nothing to train on")
        # Only completion turns are trained: prompt assistant turns (few-shot examples) become context.
        p = tuple({**m, "train": False} for m in p)
        return Record(messages=p + c, source=where, tools=_row_tools(row, where))
    raise DataFormatError(
        f"{where}: 'prompt' and 'completion' must both be strings or both be lists of "
        f"messages, got {type(prompt).__name__} and {type(completion).__name__}"
    )


def iter_jsonl(
    path: str | os.PathLike | Source,
    *,
    data_format: str = "auto",
    columns: Mapping[str, str] | None = None,
    seen: Callable[[Source, str], None] | None = None,
) -> Iterator[Record]:
    """Yield the records of a data file one by one, lazily (any file `quickloris.data.sources` reads; the name is
    historical). Each row's shape is `data_format`, or detected from its keys; `seen(source, shape)` is called
    for every row before it is converted."""
    source = path if isinstance(path, Source) else open_source(path)
    for row, where in source.rows():
        row = shapes.rename(row, columns or {}, where)
        shape = shapes.detect(row, where) if data_format == "auto" else data_format
        if seen is not None:
            seen(source, shape)
        yield parse_record(row, where, shape=shape)


def load_jsonl(path: str | os.PathLike, **options: Any) -> list[Record]:
    """All records of a data file (`iter_jsonl`'s options); raises `DataFormatError` for an empty file or a bad row."""
    records = list(iter_jsonl(path, **options))
    if not records:
        raise DataFormatError(f"data file {str(path)!r} contains no records (empty or blank lines only)")
    return records


def records_from_dicts(rows: Sequence[Any], source: str = "<memory>", **options: Any) -> list[Record]:
    """Validate in-memory rows (`parse_record`'s options: each row's shape detected unless `shape` is given);
    errors name ``source[index]``."""
    if not rows:
        raise DataFormatError(f"{source}: no records")
    return [parse_record(r, f"{source}[{i}]", **options) for i, r in enumerate(rows)]
