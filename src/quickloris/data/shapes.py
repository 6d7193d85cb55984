"""Record shapes: which one a row has, and its conversion to the canonical shapes `quickloris.data.jsonl` validates.

A row (a JSON object, a CSV / Parquet / Arrow row as a dict) has one of these shapes; `detect` finds it from the
keys present (``--data-format`` forces one):

* ``messages`` -- OpenAI chat: ``{"messages": [{"role", "content"}, ...]}``. ``content`` is a string or a list
  of parts ``{"type": "text", "text": ...}``, whose texts are joined with nothing in between (as chat templates that
  take parts render them); an image part is refused (it needs a vision model). Keys whose value is null are
  dropped from each message (Arrow / Parquet give every message every key of the file's schema), ``content``
  excepted.
* ``prompt_completion`` -- ``{"prompt", "completion"}``: two strings (plain text) or two message lists.
* ``alpaca`` -- ``{"instruction", "input"?, "output", "system"?, "history"?}``, composed as LLaMA-Factory does:
  ``[system] + history turns + user: instruction + "\\n" + input (the non-empty one alone when the other is
  empty) + assistant: output``, a conversation rendered with the chat template.
* ``sharegpt`` -- ``{"conversations": [{"from", "value"}, ...], "system"?}``: ``from`` human / user -> user, gpt /
  assistant -> assistant, system, tool (``role`` / ``content`` keys are taken too, as TRL does); a top-level
  ``system`` string becomes a first system turn.
* ``text`` -- ``{"text"}``: language modelling, every token trained.

Detection, row by row: the shapes one of whose keys is present (messages; conversations; prompt or completion;
instruction or output); ``text`` only when none of those is, so a malformed row of another shape is reported, not
read as text. Several: the one whose required keys are all present, else an error asking for
``--data-format``. None: one line listing the keys found and the shapes supported. ``--data-columns
prompt=question,completion=answer`` renames the row's ``question`` / ``answer`` to ``prompt`` / ``completion``
first. `convert` returns ``(kind, row)``: kind ``messages`` (alpaca and sharegpt become conversations),
``prompt_completion`` or ``text``, the row holding the canonical keys plus the row's other keys (e.g. a ``tools``
list), untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from quickloris.data.errors import DataFormatError

SHAPES = ("messages", "prompt_completion", "alpaca", "sharegpt", "text")
FORMATS = ("auto", *SHAPES)
# What --data-columns may map to: every key a shape reads, and the label of classification rows.
COLUMNS = ("messages", "conversations", "prompt", "completion", "instruction", "input", "output", "system", "history",
           "text", "label")  # fmt: skip
_KEYS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
_SIGNATURE = {"messages": ("messages",), "sharegpt": ("conversations",), "prompt_completion": ("prompt", "completion"),
              "alpaca": ("instruction", "output")}  # fmt: skip
SUPPORTED = (
    "messages {'messages'}, prompt_completion {'prompt', 'completion'}, alpaca {'instruction', 'output', "
    "optional 'input', 'system'}, sharegpt {'conversations'}, text {'text'}"
)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "tool": "tool"}  # fmt: skip


def _keys(row: Mapping[str, Any]) -> str:
    names = list(row)
    shown = ", ".join(map(repr, names[:12])) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    return shown or "none"


# ----------------------------------------------------------------------------------------------- column mapping


def column_problem(items: Sequence[str]) -> str | None:
    """Check of ``--data-columns`` items (``name=column``): None, or the problem."""
    seen: dict[str, str] = {}
    for item in items:
        name, sep, column = item.partition("=")
        if not sep or not name or not column:
            return f"takes name=column items (e.g. prompt=question,completion=answer), got {item!r}"
        if name not in COLUMNS:
            return f"maps {name!r}, which no record shape reads; names: {', '.join(COLUMNS)}"
        if name in seen:
            return f"maps {name!r} twice"
        seen[name] = column
    return None


def parse_columns(items: Sequence[str] | None) -> dict[str, str]:
    """``["prompt=question", ...]`` -> ``{"prompt": "question", ...}`` (checked by `column_problem`)."""
    problem = column_problem(items or [])
    if problem:
        raise ValueError(f"--data-columns {problem}")
    return dict(item.partition("=")[::2] for item in items or [])


def rename(row: Any, columns: Mapping[str, str], where: str) -> Any:
    """`row` with its columns renamed by `columns` (name -> the row's column); a mapped column the row lacks is an
    error (a typo would otherwise surface as a missing field)."""
    if not columns or not isinstance(row, dict):
        return row
    missing = [c for c in columns.values() if c not in row]
    if missing:
        raise DataFormatError(
            f"{where}: --data-columns names {', '.join(map(repr, missing))}, which this record does not have "
            f"(keys: {_keys(row)})"
        )
    sources = set(columns.values())
    out = {k: v for k, v in row.items() if k not in sources and k not in columns}
    out.update({name: row[column] for name, column in columns.items()})
    return out


# ---------------------------------------------------------------------------------------------------- detection


def detect(row: Any, where: str) -> str:
    """The shape of `row` (module docstring); raises one line when it has none or is ambiguous."""
    if not isinstance(row, dict):
        raise DataFormatError(f"{where}: expected a JSON object (one record), got {type(row).__name__}")
    structured = [s for s, keys in _SIGNATURE.items() if any(k in row for k in keys)]
    if not structured:
        if "text" in row:
            return "text"
        raise DataFormatError(
            f"{where}: no known record shape in keys {_keys(row)}; shapes: {SUPPORTED}; map other names with "
            "--data-columns, e.g. prompt=question,completion=answer"
        )
    if len(structured) == 1:
        return structured[0]
    complete = [s for s in structured if all(k in row for k in _KEYS[s])]
    if len(complete) == 1:
        return complete[0]
    raise DataFormatError(
        f"{where}: keys {_keys(row)} fit several record shapes ({', '.join(complete or structured)}); "
        "choose one with --data-format"
    )


# --------------------------------------------------------------------------------------------------- conversion


def _string(row: Mapping[str, Any], key: str, where: str, *, optional: bool = False) -> str:
    value = row.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        got = "null" if value is None else type(value).__name__
        raise DataFormatError(f"{where}: {key!r} must be a string, got {got}")
    return value


def _require(row: Mapping[str, Any], shape: str, where: str) -> None:
    missing = [k for k in _KEYS[shape] if k not in row]
    if missing:
        raise DataFormatError(
            f"{where}: missing {', '.join(map(repr, missing))} for {'an' if shape[0] in 'aeiou' else 'a'} {shape} "
            f"record; found keys {_keys(row)}"
        )


def content_text(content: Any, where: str) -> Any:
    """A message's content as a string: a list of text parts joined; anything else returned as it is (the message
    checks of `quickloris.data.jsonl` judge it)."""
    if not isinstance(content, list):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(kind, str) and ("image" in kind or part.get("image") is not None):
            raise DataFormatError(f"{where}: content part {j} is an image: image parts need a vision model")
        else:
            raise DataFormatError(
                f"{where}: content part {j} must be {{'type': 'text', 'text': str}}, got {str(part)[:80]}"
            )
    return "".join(texts)


def normalize_messages(messages: Any, where: str, key: str) -> Any:
    """Messages with list-of-parts contents joined and null-valued keys (other than content) dropped; a value that
    is not a list of objects is returned as it is, for the message checks to report."""
    if not isinstance(messages, list):
        return messages
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict):
            m = {k: v for k, v in m.items() if v is not None or k == "content"}
            if "content" in m:
                m["content"] = content_text(m["content"], f"{where}: {key}[{i}]")
        out.append(m)
    return out


def _sharegpt(row: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataFormatError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} objects")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise DataFormatError(f"{where}: conversations[{i}] must be an object, got {type(t).__name__}")
        who, text = t.get("from", t.get("role")), t.get("value", t.get("content"))
        if who not in SHAREGPT_ROLES:
            raise DataFormatError(
                f"{where}: conversations[{i}]['from'] is {who!r}; ShareGPT roles: {', '.join(SHAREGPT_ROLES)}"
            )
        extra = {k: v for k, v in t.items() if k not in ("from", "value", "role", "content") and v is not None}
        messages.append({"role": SHAREGPT_ROLES[who], "content": text, **extra})
    system = row.get("system")
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": _string(row, "system", where)})
    return normalize_messages(messages, where, "conversations")


def _alpaca(row: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    instruction, output = _string(row, "instruction", where), _string(row, "output", where)
    query, system = _string(row, "input", where, optional=True), _string(row, "system", where, optional=True)
    messages = [{"role": "system", "content": system}] if system else []
    history = row.get("history") or []
    if not isinstance(history, list):
        raise DataFormatError(f"{where}: 'history' must be a list of [instruction, response] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataFormatError(f"{where}: history[{i}] must be an [instruction, response] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = "\n".join(part for part in (instruction, query) if part)
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


_CONSUMED = {
    "messages": ("messages",),
    "sharegpt": ("conversations", "system"),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "text": ("text",),
}


def convert(row: Any, shape: str, where: str) -> tuple[str, dict[str, Any]]:
    """``(kind, canonical row)`` of `row` read as `shape` (module docstring)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown record shape {shape!r}; shapes: {', '.join(SHAPES)}")
    if not isinstance(row, dict):
        raise DataFormatError(f"{where}: expected a JSON object (one record), got {type(row).__name__}")
    _require(row, shape, where)
    out = {k: v for k, v in row.items() if k not in _CONSUMED[shape]}
    if shape == "messages":
        return "messages", {**out, "messages": normalize_messages(row["messages"], where, "messages")}
    if shape == "sharegpt":
        return "messages", {**out, "messages": _sharegpt(row, where)}
    if shape == "alpaca":
        return "messages", {**out, "messages": _alpaca(row, where)}
    if shape == "prompt_completion":
        pc = {k: normalize_messages(row[k], where, k) for k in ("prompt", "completion")}
        return "prompt_completion", {**out, **pc}
    return "text", {**out, "text": _string(row, "text", where)}
