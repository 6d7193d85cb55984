"""Tool calling in OpenAI's format: validation and normalisation of rows, exactly which tokens are trained under the
real Qwen2.5 and Llama-3.1 chat templates and quickloris' ChatML tool template, and one-line refusals for templates
that would drop tools, calls, results or text.

The Qwen2.5 and Llama-3.1 templates are the originals as TRL stores them (``trl/chat_templates/qwen2_5.jinja`` and
``llama3_1.jinja``, kept byte-identical to the model repositories' for identity comparison; TRL is a test dependency),
so nothing is downloaded and nothing is copied here. Their tokenizers are byte-level BPEs with the models' special
tokens and pre-tokenizers, trained on the spot: what is trained depends on the template's text and on where tokens
start, both of which these reproduce.
"""

from __future__ import annotations

import json
import random
from importlib import resources

import pytest

from quickloris.data.chat import (
    IGNORE_INDEX,
    template_renders_tools,
    tokenize_record,
    tokenize_records,
    tool_task_template,
)
from quickloris.data.jsonl import DataFormatError, load_jsonl, parse_record
from quickloris.data.tools import parse_tool_call, tool_template, tool_template_path
from tests.data.conftest import CHATML
from tests.helpers import require

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _row(content=None, arguments='{"city": "Paris"}', tools=(WEATHER,)):
    row = {
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": content,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "18 C, sunny"},
            {"role": "assistant", "content": "It is 18 C and sunny in Paris."},
        ]
    }
    if tools is not None:
        row["tools"] = list(tools)
    return row


def _runs(tok, ex):
    """Decoded maximal runs of trained tokens, and the decoded untrained text."""
    runs, cur, context = [], [], []
    for i, y in zip(ex.input_ids, ex.labels):
        if y != IGNORE_INDEX:
            assert y == i
            cur.append(i)
        else:
            context.append(i)
            if cur:
                runs.append(cur)
                cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs], tok.decode(context)


def trl_template(name: str) -> str:
    require("trl")
    return (resources.files("trl") / "chat_templates" / name).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def qwen25():
    from tests.tiny import bpe_tokenizer

    specials = ("<|endoftext|>", "<|im_end|>", "<|im_start|>", "<tool_call>", "</tool_call>")
    corpus = ["system user assistant tool_response Weather in Paris? It is 18 C and sunny.", '{"name": "arguments"}']
    return bpe_tokenizer("qwen2", 400, corpus=corpus, specials=specials, chat_template=trl_template("qwen2_5.jinja"))


@pytest.fixture(scope="module")
def llama31():
    from tests.tiny import bpe_tokenizer

    specials = ("<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>")
    corpus = ["system user assistant ipython Weather in Paris? It is 18 C and sunny.", '{"name": "parameters"}']
    return bpe_tokenizer(
        "llama-bpe", 400, corpus=corpus, specials=specials, chat_template=trl_template("llama3_1.jinja")
    )


# --- rows ------------------------------------------------------------------------------------------------------


def test_openai_rows_are_normalised():
    rec = parse_record(_row(content=None), "d.jsonl:1")
    call = rec.messages[2]
    assert call == {
        "role": "assistant",
        "content": "",  # null: templates test `if message.content`, and `| trim` would print "None"
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}, "id": "c1"}
        ],
    }
    assert rec.messages[3] == {"role": "tool", "content": "18 C, sunny", "tool_call_id": "c1"}
    assert rec.tools == (WEATHER,)
    # "" and null are the same turn; arguments as an object; a flat call; tools as a JSON string; a flat schema
    assert parse_record(_row(content=""), "x").messages == rec.messages
    assert parse_record(_row(arguments={"city": "Paris"}), "x").messages == rec.messages
    flat = _row()
    flat["messages"][2]["tool_calls"] = [{"id": "c1", "name": "get_weather", "arguments": {"city": "Paris"}}]
    assert parse_record(flat, "x").messages == rec.messages
    assert parse_record(_row(tools=None) | {"tools": json.dumps([WEATHER])}, "x").tools == (WEATHER,)
    assert parse_record(_row(tools=[WEATHER["function"]]), "x").tools == (WEATHER,)
    assert parse_record(_row(tools=None), "x").tools is None
    # prompt / completion message lists keep the tools and the calls
    row = _row()
    pc = {"tools": row["tools"], "prompt": row["messages"][:2], "completion": row["messages"][2:]}
    both = parse_record(pc, "x")
    assert [{k: v for k, v in m.items() if k != "train"} for m in both.messages] == list(rec.messages)
    assert both.tools == (WEATHER,)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="{city: Paris}"), "not valid JSON"),
        (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="[1]"), "must be a JSON object"),
        (lambda r: r["messages"][2]["tool_calls"][0]["function"].pop("name"), "non-empty 'function'"),
        (lambda r: r["messages"][2].update(tool_calls={"a": 1}), r"\['tool_calls'\] must be a list"),
        (lambda r: r["messages"][2].update(content=5), "must be a string or null next to 'tool_calls'"),
        (lambda r: r["messages"][1].update(tool_calls=[]), "only assistant messages call tools"),
        (lambda r: r["messages"][3].update(content=None), r"messages\[3\]\['content'\] must be a string"),
        (lambda r: r["messages"][3].update(tool_call_id=7), "'tool_call_id'] must be a string"),
        (lambda r: r.update(tools={"a": 1}), "'tools' must be a list"),
        (lambda r: r.update(tools="[oops"), "'tools' is a string but not valid JSON"),
        (lambda r: r.update(tools=[{"type": "function", "function": {"description": "x"}}]), r"tools\[0\] must be"),
    ],
)
def test_bad_rows_name_the_file_and_line(tmp_path, edit, message):
    row = _row()
    edit(row)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(_row()) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=message) as e:
        load_jsonl(path)
    assert str(e.value).startswith(f"{path}:2: ") and "\n" not in str(e.value)


def test_tools_on_a_text_record_are_refused():
    with pytest.raises(DataFormatError, match="'tools' need a chat record"):
        parse_record({"prompt": "a", "completion": "b", "tools": [WEATHER]}, "d.jsonl:4")


# --- templates that cannot render tools -------------------------------------------------------------------------


@pytest.mark.parametrize("content", [None, ""])
def test_a_template_without_tools_is_refused_not_trained_without_the_call(smollm2_tokenizer, content, tmp_path):
    """What issue 16 saw: content "" trained an empty assistant turn with the call removed; content null was refused
    as not a string. Now both are read, and SmolLM2's template (no tools) is refused with one line naming the row and
    --chat-template, whether or not the row lists tools."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(_row(content=content)) + "\n" + json.dumps(_row(content, tools=None)) + "\n")
    with_tools, without = load_jsonl(path)
    with pytest.raises(DataFormatError, match=f"^{path}:1: the chat template ignores the row's 'tools'") as e:
        tokenize_record(smollm2_tokenizer, with_tools)
    assert "--chat-template FILE" in str(e.value) and str(tool_template_path()) in str(e.value)
    with pytest.raises(DataFormatError, match=rf"^{path}:2: .* does not render the tool call messages\[2\]") as e:
        tokenize_record(smollm2_tokenizer, without)
    assert "'get_weather', 'city' missing" in str(e.value) and "--chat-template FILE" in str(e.value)
    with pytest.raises(DataFormatError, match="does not render the tool call"):
        tokenize_records(smollm2_tokenizer, [without], max_seq_len=512)


def test_templates_that_drop_results_or_text_are_refused(smollm2_tokenizer, llama31):
    drops_tool = (
        "{% for m in messages %}{% if m.role != 'tool' %}{{ '<|im_start|>' + m.role + '\n' + m.content }}"
        "{% for c in m.tool_calls or [] %}{{ c.function.name + (c.function.arguments | tojson) }}{% endfor %}"
        "{{ '<|im_end|>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    rec = parse_record(_row(tools=None), "d.jsonl:9")
    with pytest.raises(DataFormatError, match=r"d.jsonl:9: the chat template drops the tool result messages\[3\]"):
        tokenize_record(smollm2_tokenizer, rec, chat_template=drops_tool)
    # Llama-3.1's template renders a call turn's text not at all: refused rather than trained without it
    rec = parse_record(_row(content="Let me look that up."), "d.jsonl:3")
    with pytest.raises(DataFormatError, match=r"d.jsonl:3: the chat template drops the text of messages\[2\]"):
        tokenize_record(llama31, rec)


def test_which_templates_render_tools(smollm2_tokenizer, qwen25, llama31):
    assert template_renders_tools(qwen25) and template_renders_tools(llama31)
    assert template_renders_tools(smollm2_tokenizer, tool_template())
    assert not template_renders_tools(smollm2_tokenizer) and not template_renders_tools(smollm2_tokenizer, CHATML)
    # --task tools: the model's own template if it can, else quickloris' for a ChatML model, else one line
    assert tool_task_template(qwen25, None) == (None, None)
    assert tool_task_template(smollm2_tokenizer, "{{ x }}") == ("{{ x }}", None)  # --chat-template wins
    text, note = tool_task_template(smollm2_tokenizer, None)
    assert text == tool_template() and "cannot render tools" in note and str(tool_template_path()) in note
    import copy

    plain = copy.deepcopy(llama31)
    plain.chat_template = trl_template("llama3.jinja")  # Llama 3.0: no tools, not ChatML
    with pytest.raises(ValueError, match="pass a template that renders tools with --chat-template FILE"):
        tool_task_template(plain, None)


# --- exactly what is trained ------------------------------------------------------------------------------------


def _check_ids_are_the_templates(tok, rec):
    ex = tokenize_record(tok, rec)
    msgs = [{k: v for k, v in m.items() if k != "train"} for m in rec.messages]
    assert ex.input_ids == list(tok.apply_chat_template(msgs, tools=list(rec.tools), tokenize=True, return_dict=False))
    return ex


def test_qwen25_trains_the_calls_and_answers_only(qwen25):
    row = _row(content="Let me check.")
    row["messages"][2]["tool_calls"].append(
        {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    )
    row["messages"][4:4] = [{"role": "tool", "tool_call_id": "c2", "content": "22 C, cloudy"}]
    rec = parse_record(row, "q.jsonl:1")
    runs, context = _runs(qwen25, _check_ids_are_the_templates(qwen25, rec))
    assert runs == [
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>',
        "It is 18 C and sunny in Paris.<|im_end|>",
    ]
    # context: the system prompt, the tool schemas, the question, both results (Qwen2.5 puts them in a user turn)
    for text in ("You are helpful.", '"description": "Current weather of a city."', "Weather in Paris?"):
        assert text in context
    assert "<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response>\n<tool_response>\n22 C, cloudy" in context


def test_llama31_trains_the_call_json_and_answers_only(llama31):
    rec = parse_record(_row(content=None), "l.jsonl:1")
    runs, context = _runs(llama31, _check_ids_are_the_templates(llama31, rec))
    assert runs == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        "It is 18 C and sunny in Paris.<|eot_id|>",
    ]
    assert context.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython")
    assert '"description": "Current weather of a city."' in context and "Weather in Paris?" in context
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"18 C, sunny"<|eot_id|>' in context


def test_shipped_template_trains_the_calls_and_answers_only(smollm2_tokenizer):
    tok, template = smollm2_tokenizer, tool_template()
    rec = parse_record(_row(), "s.jsonl:1")
    ex = tokenize_record(tok, rec, chat_template=template)
    msgs = list(rec.messages)
    ids = tok.apply_chat_template(msgs, tools=list(rec.tools), chat_template=template, return_dict=False)
    assert ex.input_ids == list(ids)
    runs, context = _runs(tok, ex)
    assert runs == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 18 C and sunny in Paris.<|im_end|>",
    ]
    assert context.startswith(
        "<|im_start|>system\nYou are helpful.\n\nTools:\nget_weather(city: string) - Current weather of a city.\n"
    )
    assert "<|im_start|>tool\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>" in context
    # without tools it is plain ChatML
    plain = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    for gen in (False, True):
        args = dict(tokenize=False, add_generation_prompt=gen)
        assert tok.apply_chat_template(plain, chat_template=template, **args) == tok.apply_chat_template(
            plain, chat_template=CHATML, **args
        )


def test_shipped_template_signatures_keep_the_schema():
    """Parameters beyond a bare type are shown as their JSON schema, optional ones are marked."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x: json.dumps(x)
    tool = {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {"q": {"type": "string"}, "k": {"type": "integer", "enum": [1, 5]}},
            "required": ["q"],
        },
    }
    text = env.from_string(tool_template()).render(messages=[{"role": "user", "content": "x"}], tools=[tool])
    assert '\nsearch(q: string, k?: {"type": "integer", "enum": [1, 5]})\n' in text


def test_random_tool_conversations(smollm2_tokenizer, seed):
    """Random names, arguments (unicode, quotes, numbers, nesting), texts and parallel calls under the shipped
    template: each assistant turn is one trained run, exactly its text and calls as JSON plus <|im_end|>."""
    tok, template = smollm2_tokenizer, tool_template()
    rng = random.Random(seed)
    words = ["a", "Zürich", "日本", 'say "hi"', "x\\y", "🙂", "12", "-3.5", "true", "<tool_call>"]

    def value(depth=0):
        kind = rng.randrange(5 if depth < 2 else 3)
        if kind == 0:
            return rng.choice(words)
        if kind == 1:
            return rng.randint(-1000, 1000)
        if kind == 2:
            return rng.random() < 0.5
        if kind == 3:
            return [value(depth + 1) for _ in range(rng.randint(0, 2))]
        return {rng.choice(words): value(depth + 1) for _ in range(rng.randint(0, 2))}

    for _ in range(8):
        names = [f"tool_{k}" for k in range(rng.randint(1, 3))]
        tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in names]
        messages, want = [{"role": "user", "content": rng.choice(words)}], []
        for turn in range(rng.randint(1, 2)):
            calls = [
                {"id": f"c{turn}{k}", "name": rng.choice(names), "arguments": {f"p{j}": value() for j in range(2)}}
                for k in range(rng.randint(1, 2))
            ]
            text = rng.choice(["", "", "Checking " + rng.choice(words)])
            messages.append({"role": "assistant", "content": text, "tool_calls": calls})
            blocks = [
                "<tool_call>\n"
                + json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False)
                + "\n</tool_call>"
                for c in calls
            ]
            want.append("\n".join(([text] if text else []) + blocks) + "<|im_end|>")
            messages += [{"role": "tool", "tool_call_id": c["id"], "content": rng.choice(words)} for c in calls]
        answer = "Done " + rng.choice(words)
        messages.append({"role": "assistant", "content": answer})
        want.append(answer + "<|im_end|>")
        rec = parse_record({"tools": json.dumps(tools), "messages": messages}, f"r{seed}")
        runs, _ = _runs(tok, tokenize_record(tok, rec, chat_template=template))
        assert runs == want, (seed, runs, want)


# --- parsing a generated call -----------------------------------------------------------------------------------


def test_parse_tool_call():
    call = ("calculator", {"expression": "2 * 3"})
    assert (
        parse_tool_call('<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 * 3"}}\n</tool_call>')
        == call
    )
    assert parse_tool_call('{"name": "calculator", "parameters": {"expression": "2 * 3"}}') == call  # Llama-3.1
    assert parse_tool_call('Sure. {"name": "calculator", "arguments": "{\\"expression\\": \\"2 * 3\\"}"} more') == call
    assert parse_tool_call('{"arguments": {"expression": "2 * 3"}, "name": "calculator"}') == call  # any key order
    assert parse_tool_call('{"name": "f"}') == ("f", {})
    for bad in (
        "",
        "no call",
        '{"name": "f", "arguments": {"a": 1}',
        '{"name": 3}',
        '{"name": "f", "arguments": [1]}',
        '{"name": "f", "arguments": "{bad"}',
        "[1, 2]",
        '{"x": {"name": "f"}}',
    ):
        assert parse_tool_call(bad) is None, bad
