"""Tool calling in OpenAI's chat format: validation, the checks that a chat template renders it, call parsing.

A row may carry a ``tools`` list (JSON schemas, ``{"type": "function", "function": {"name", "description",
"parameters"}}``), assistant messages may carry ``tool_calls`` (``content`` null, empty or text) and tool results are
``{"role": "tool", "tool_call_id": ..., "content": ...}`` messages. They are normalised to the form Hugging Face chat
templates read:

* a call is ``{"type": "function", "function": {"name": str, "arguments": dict}}`` (plus its ``id``): OpenAI's
  ``arguments`` is a JSON *string*, which templates would print as a quoted string (Qwen2.5's and Llama-3.1's
  ``arguments | tojson``), so it is parsed; a flat ``{"name", "arguments"}`` call is wrapped the same way;
* ``content: null`` becomes ``""``: templates test ``if message.content``, and string filters (``| trim``) would
  print ``None``;
* a flat tool schema ``{"name", "parameters", ...}`` is wrapped as ``{"type": "function", "function": ...}``, and a
  ``tools`` field given as a JSON string (as some datasets store it) is parsed.

How the calls look in the text is the template's business (Qwen2.5: ``<tool_call>`` JSON blocks, Llama-3.1: a bare
JSON object with ``parameters``...). A template that cannot render them must not train on a conversation with the
calls silently left out, so `check_tool_rendering` compares renders: the ``tools`` must change the text, every call's
name and argument names must appear in its assistant turn, the text of a turn with calls must survive (Llama-3.1's
template drops it), and every tool result must appear. quickloris ships a ChatML template that renders tools
(`TOOL_TEMPLATE`, Hermes / Qwen2.5 style ``<tool_call>`` JSON) for ChatML models whose own template has none, such as
SmolLM2-Instruct.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from quickloris.data.errors import DataFormatError

TOOL_TEMPLATE_NAME = "chatml_tools.jinja"
CHAT_TEMPLATE_OPTION = "--chat-template"


def tool_template_path() -> Path:
    """The ChatML tool template shipped with quickloris (`quickloris/data/templates/chatml_tools.jinja`)."""
    return Path(str(resources.files("quickloris.data") / "templates" / TOOL_TEMPLATE_NAME))


def tool_template() -> str:
    return tool_template_path().read_text(encoding="utf-8")


SHIPPED_TOOL_TEMPLATE = f"quickloris:{TOOL_TEMPLATE_NAME}"  # how a run's config.json names the shipped template


def template_from_run(run_config: Mapping[str, Any]) -> tuple[str | None, str]:
    """The chat template a `quickloris train` run used when it was not the tokenizer's (its config.json's
    ``resolved.chat_template``: `SHIPPED_TOOL_TEMPLATE` or a file), with where it came from; (None, "") when the run
    used the tokenizer's. A file that is gone raises (one line)."""
    name = (run_config.get("resolved") or {}).get("chat_template")
    if not name:
        return None, ""
    if name == SHIPPED_TOOL_TEMPLATE:
        return tool_template(), f"quickloris' ChatML tool template ({tool_template_path()})"
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"the adapter's run trained with the chat template {name}, which is gone; pass --chat-template FILE"
        )
    return path.read_text(encoding="utf-8"), str(path)


def _json_value(value: Any, where: str, what: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{where}: {what} is a string but not valid JSON: {e.msg} (column {e.colno})") from None


def check_tools(tools: Any, where: str) -> tuple[dict[str, Any], ...]:
    """The row-level ``tools`` list, normalised to ``{"type": "function", "function": {...}}`` schemas."""
    tools = _json_value(tools, where, "'tools'")
    if not isinstance(tools, list):
        raise DataFormatError(f"{where}: 'tools' must be a list of function schemas, got {type(tools).__name__}")
    out = []
    for k, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataFormatError(
                f"{where}: tools[{k}] must be a function schema {{'type': 'function', 'function': {{'name': ..., "
                "'parameters': {...}}}} with a non-empty name"
            )
        out.append(dict(tool) if "function" in tool else {"type": "function", "function": dict(tool)})
    return tuple(out)


def _check_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise DataFormatError(f"{where} must be an object {{'function': {{'name', 'arguments'}}}}")
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise DataFormatError(f"{where} needs a non-empty 'function': {{'name': ...}}")
    args = _json_value(fn.get("arguments", {}), where, "'arguments'")
    if not isinstance(args, dict):
        raise DataFormatError(f"{where}: 'arguments' must be a JSON object, got {type(args).__name__}")
    out: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if "id" in call:
        out["id"] = call["id"]
    return out


def check_tool_message(m: Mapping[str, Any], where: str) -> dict[str, Any]:
    """One message that takes part in tool calling (an assistant turn with ``tool_calls``, or a ``tool`` result),
    validated and normalised (`where` is e.g. ``"data.jsonl:3: messages[2]"``)."""
    role = m.get("role")
    if not isinstance(role, str) or not role:
        raise DataFormatError(f"{where}['role'] must be a non-empty string, got {role!r}")
    content = m.get("content")
    out: dict[str, Any] = {"role": role}
    if "tool_calls" in m and m["tool_calls"] is not None:
        if role != "assistant":
            raise DataFormatError(f"{where} has 'tool_calls' but role {role!r}; only assistant messages call tools")
        calls = m["tool_calls"]
        if not isinstance(calls, list):
            raise DataFormatError(f"{where}['tool_calls'] must be a list, got {type(calls).__name__}")
        if content is not None and not isinstance(content, str):
            raise DataFormatError(
                f"{where}['content'] must be a string or null next to 'tool_calls', got {type(content).__name__}"
            )
        out["content"] = content or ""
        if calls:  # an empty list is a plain assistant turn (some exports write tool_calls: [])
            out["tool_calls"] = [_check_call(c, f"{where}['tool_calls'][{k}]") for k, c in enumerate(calls)]
    else:
        if not isinstance(content, str):
            got = "missing" if "content" not in m else type(content).__name__
            raise DataFormatError(f"{where}['content'] must be a string, got {got}")
        out["content"] = content
    for key in ("tool_call_id", "name"):
        if key in m and m[key] is not None:
            if not isinstance(m[key], str):
                raise DataFormatError(f"{where}[{key!r}] must be a string, got {type(m[key]).__name__}")
            out[key] = m[key]
    return out


def is_tool_message(m: Mapping[str, Any]) -> bool:
    return m.get("role") == "tool" or m.get("tool_calls") is not None or "tool_call_id" in m


# --- does a template render tools? ------------------------------------------------------------------------------

Render = Callable[[Sequence[Mapping[str, Any]], bool, Sequence[Mapping[str, Any]] | None], str]


def _advice(option: str = CHAT_TEMPLATE_OPTION) -> str:
    return (
        f"pass a template that renders tools with {option} FILE (quickloris ships one for ChatML models: "
        f"{tool_template_path()})"
    )


def check_tool_rendering(
    render: Render,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    turns: Mapping[int, tuple[int, int]],
    full: str,
    source: str,
) -> None:
    """Raise `DataFormatError` (one line: `source`, what is missing, the option) unless the template renders the
    row's tools, every call (name and argument names inside its assistant turn), the text next to calls, and every
    tool result. `render(messages, add_generation_prompt, tools)` renders; `turns[i]` is the character span of
    assistant turn ``i`` in `full` (the whole conversation's render)."""
    if tools and render(messages, False, None) == full:
        raise DataFormatError(
            f"{source}: the chat template ignores the row's 'tools' (the same text with and without them); " + _advice()
        )
    for i, m in enumerate(messages):
        if m.get("role") == "tool" and m["content"].strip() and m["content"].strip() not in full:
            raise DataFormatError(f"{source}: the chat template drops the tool result messages[{i}]; " + _advice())
        calls = m.get("tool_calls")
        if not calls:
            continue
        a, b = turns[i]
        turn = full[a:b]
        for k, call in enumerate(calls):
            fn = call["function"]
            missing = [n for n in (fn["name"], *fn["arguments"]) if str(n) not in turn]
            if missing:
                raise DataFormatError(
                    f"{source}: the chat template does not render the tool call messages[{i}]['tool_calls'][{k}] "
                    f"({', '.join(map(repr, missing))} missing from the rendered turn); " + _advice()
                )
        if m["content"].strip() and m["content"].strip() not in turn:
            raise DataFormatError(
                f"{source}: the chat template drops the text of messages[{i}], an assistant turn with tool_calls "
                "(Llama-3.1's renders the call only); remove the text from such turns or " + _advice()
            )


PROBE_TOOLS = (
    {
        "type": "function",
        "function": {
            "name": "quickloris_probe",
            "description": "probe",
            "parameters": {"type": "object", "properties": {"probe_arg": {"type": "string"}}},
        },
    },
)
PROBE_MESSAGES = (
    {"role": "system", "content": "probe system"},
    {"role": "user", "content": "probe question"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_0",
                "type": "function",
                "function": {"name": "quickloris_probe", "arguments": {"probe_arg": "x"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_0", "name": "quickloris_probe", "content": "probe result"},
    {"role": "assistant", "content": "probe answer"},
)


def renders_tools(render: Render) -> bool:
    """Whether a template renders a probe conversation's tools, call and result (`check_tool_rendering`); a
    template that fails on it (raises) does not."""
    try:
        full = render(PROBE_MESSAGES, False, PROBE_TOOLS)
        prefix = render(PROBE_MESSAGES[:2], True, PROBE_TOOLS)
        upto = render(PROBE_MESSAGES[:3], False, PROBE_TOOLS)
        check_tool_rendering(render, PROBE_MESSAGES, PROBE_TOOLS, {2: (len(prefix), len(upto))}, full, "probe")
    except Exception:  # noqa: BLE001 - any failure means "cannot render tools"
        return False
    return True


# --- parsing a generated call ------------------------------------------------------------------------------------


def parse_tool_call(text: str) -> tuple[str, dict[str, Any]] | None:
    """The first tool call in generated `text`: its name and arguments, or None.

    The call is the JSON object starting at the text's first ``{`` (inside ``<tool_call>`` tags or bare, so
    Hermes / Qwen2.5 and Llama-3.1 outputs both parse) with a string ``name`` and an object ``arguments``
    (Llama-3.1: ``parameters``; a JSON string holding an object is parsed too)."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return (obj["name"], args) if isinstance(args, dict) else None
