"""Training records from JSONL files: chat `messages` or `prompt` / `completion` pairs.

One JSON object per line; blank lines are skipped. Two record shapes are accepted (keys other than the
ones named here are ignored):

* ``{"messages": [{"role": "system"|"user"|"assistant"|..., "content": str}, ...]}`` -- a conversation,
  rendered with the tokenizer's chat template; every ``assistant`` turn is trained, everything else is
  context (labels -100).
* ``{"prompt": P, "completion": C}`` -- either two strings (plain text, no chat template: the model is
  trained on ``C`` plus the end-of-sequence token after ``P``, the TRL "standard" convention) or two lists
  of messages (conversational: ``prompt + completion`` is rendered as one conversation, the completion's
  assistant turns are trained).

Tool calling (OpenAI's format, `quickloris.data.tools`): a chat row may carry a ``tools`` list of function schemas,
assistant messages ``tool_calls`` (``content`` null, empty or text) and ``{"role": "tool", "tool_call_id": ...,
"content": ...}`` results; they are rendered by the chat template with ``tools=``.

Every problem is reported as a `DataFormatError` (a `ValueError`) naming the file and the 1-based line, so
that a 100k-line file with one bad line says where to look.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quickloris.data.errors import DataFormatError
from quickloris.data.tools import check_tool_message, check_tools, is_tool_message


@dataclass(frozen=True)
class Record:
    """One training example, before tokenization.

    Exactly one of the two shapes is set: ``messages`` (a conversation) or ``prompt`` + ``completion``
    (plain text). ``source`` is ``"file:line"`` (or a caller-chosen label) for error messages.
    """

    messages: tuple[Mapping[str, Any], ...] | None = None
    prompt: str | None = None
    completion: str | None = None
    source: str = "<memory>"
    tools: tuple[Mapping[str, Any], ...] | None = None  # function schemas the chat template renders (tools=)

    def __post_init__(self) -> None:
        is_chat = self.messages is not None
        is_text = self.prompt is not None or self.completion is not None
        if is_chat == is_text:
            raise DataFormatError(f"{self.source}: a record holds either 'messages' or 'prompt' + 'completion'")
        if is_text and not (isinstance(self.prompt, str) and isinstance(self.completion, str)):
            raise DataFormatError(f"{self.source}: 'prompt' and 'completion' must both be strings")
        if self.tools is not None and not is_chat:
            raise DataFormatError(f"{self.source}: 'tools' need a chat record ('messages' or message lists)")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


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


def parse_record(obj: Any, where: str = "<memory>") -> Record:
    """Validate one decoded JSON value and turn it into a `Record` (errors name `where`)."""
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    has_messages = "messages" in obj
    has_pc = "prompt" in obj or "completion" in obj
    if has_messages and has_pc:
        raise DataFormatError(f"{where}: has both 'messages' and 'prompt'/'completion'; use one shape")
    if has_messages:
        messages = _check_messages(obj["messages"], where, "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataFormatError(f"{where}: 'messages' has no 'assistant' turn, so nothing to train on")
        return Record(messages=messages, source=where, tools=_row_tools(obj, where))
    if has_pc:
        missing = [k for k in ("prompt", "completion") if k not in obj]
        if missing:
            raise DataFormatError(
                f"{where}: missing {', '.join(map(repr, missing))} (a prompt/completion record needs both)"
            )
        prompt, completion = obj["prompt"], obj["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return Record(prompt=prompt, completion=completion, source=where, tools=_row_tools(obj, where))
        if isinstance(prompt, list) and isinstance(completion, list):
            p = _check_messages(prompt, where, "prompt")
            c = _check_messages(completion, where, "completion")
            if not any(m["role"] == "assistant" for m in c):
                raise DataFormatError(f"{where}: 'completion' has no 'assistant' turn, so nothing to train on")
            # Only completion turns are trained: prompt assistant turns (few-shot examples) become context.
            p = tuple({**m, "train": False} for m in p)
            return Record(messages=p + c, source=where, tools=_row_tools(obj, where))
        raise DataFormatError(
            f"{where}: 'prompt' and 'completion' must both be strings or both be lists of "
            f"messages, got {type(prompt).__name__} and {type(completion).__name__}"
        )
    keys = ", ".join(map(repr, list(obj)[:8])) or "none"
    raise DataFormatError(f"{where}: expected a 'messages' list or 'prompt' and 'completion' fields; found keys {keys}")


def iter_jsonl(path: str | os.PathLike) -> Iterable[Record]:
    """Yield the records of a JSONL file one by one (see the module docstring for the shapes)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data file {str(p)!r} does not exist")
    if not p.is_file():
        raise DataFormatError(f"data file {str(p)!r} is not a regular file")
    with p.open("rb") as f:  # binary + per-line decoding, so a bad byte is reported on its own line
        for lineno, raw in enumerate(f, start=1):
            where = f"{p}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # tolerate a BOM
            except UnicodeDecodeError as e:
                raise DataFormatError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
            yield parse_record(obj, where)


def load_jsonl(path: str | os.PathLike) -> list[Record]:
    """All records of a JSONL file; raises `DataFormatError` for an empty file or any bad line."""
    records = list(iter_jsonl(path))
    if not records:
        raise DataFormatError(f"data file {str(path)!r} contains no records (empty or blank lines only)")
    return records


def records_from_dicts(rows: Sequence[Any], source: str = "<memory>") -> list[Record]:
    """Validate in-memory rows (same shapes as the JSONL lines); errors name ``source[index]``."""
    if not rows:
        raise DataFormatError(f"{source}: no records")
    return [parse_record(r, f"{source}[{i}]") for i, r in enumerate(rows)]
