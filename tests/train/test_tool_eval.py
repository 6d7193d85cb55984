"""Scoring the tool task: the call (name + arguments as JSON values) and the final answer (exact first line), generation
lengths from the reference replies, and prompts rendered with their tools."""

from __future__ import annotations

import json

import pytest
import torch

from quickloris.data.tool_task import TOOLS_TASK
from quickloris.data.tools import tool_template
from quickloris.train.exact_match import evaluate_task, generate_replies, prompt_ids
from quickloris.train.tool_eval import describe, evaluate_tool_calls, is_tool_task


def _call(name, args, style="hermes"):
    if style == "hermes":
        return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"
    return json.dumps({"name": name, "parameters": args})  # Llama-3.1


def test_scoring_with_an_oracle(chat_tokenizer):
    tok, template = chat_tokenizer, tool_template()
    examples = TOOLS_TASK.generate("heldout", 12, seed=2)
    calls, answers = {}, {}
    for k, ex in enumerate(examples):
        wrong = {key: (v + 1 if isinstance(v, int) else v + "x") for key, v in ex.arguments.items()}
        floats = {key: (float(v) if isinstance(v, int) else v) for key, v in ex.arguments.items()}
        calls[ex.question] = [
            _call(ex.name, ex.arguments),  # right
            _call(ex.name, dict(reversed(list(ex.arguments.items())))),  # right: key order does not matter
            _call(ex.name, floats, "llama"),  # right: 12.0 == 12, Llama-3.1's "parameters"
            _call(ex.name, wrong),  # wrong arguments
            _call("calculator" if ex.name != "calculator" else "get_stock", ex.arguments),  # wrong tool
            _call(ex.name, ex.arguments)[:-20],  # cut off: not JSON
        ][k % 6]
        answers[ex.question] = [ex.answer, ex.answer + "\nmore", "It is " + ex.answer][k % 3]
    seen = []

    def generate(prompts, tools, n):
        seen.append((len(prompts[0]), n))
        assert tools == [list(ex.tools) for ex in examples]
        if len(prompts[0]) == 2:  # system + question: the call
            return [calls[p[1]["content"]] for p in prompts]
        assert [p[2:] for p in prompts] == [ex.answer_prompt_messages()[2:] for ex in examples]  # reference call
        return [answers[p[1]["content"]] for p in prompts]

    result = evaluate_tool_calls(generate, tok, examples, chat_template=template, num_samples=4)
    assert (result.correct, result.total, result.accuracy) == (6, 12, 0.5)
    d = result.to_dict()
    assert (d["call_correct"], d["call_accuracy"], d["answer_correct"], d["answer_accuracy"]) == (6, 0.5, 8, 8 / 12)
    assert [s["correct"] for s in result.samples] == [True, True, True, False]
    assert [s["final_correct"] for s in result.samples] == [True, True, False, True]
    assert describe(d) == "tool call 50.0% (6/12), final answer 66.7% (8/12)"
    # generation runs to the longest reference reply (the trained tokens: the call or answer and <|im_end|>) + 4
    longest_call = max(
        len(tok(_call(ex.name, ex.arguments) + "<|im_end|>", add_special_tokens=False)["input_ids"]) for ex in examples
    )
    longest_answer = max(len(tok(ex.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]) for ex in examples)
    assert seen == [(2, longest_call + 4), (4, longest_answer + 4)]
    assert result.max_new_tokens == longest_call + 4 and d["max_new_tokens_answer"] == longest_answer + 4
    # an explicit --max-new-tokens is used for both
    seen.clear()
    evaluate_tool_calls(generate, tok, examples, chat_template=template, max_new_tokens=7)
    assert [n for _, n in seen] == [7, 7]
    assert is_tool_task(examples) and not is_tool_task([]) and describe({"accuracy": 0.25, "correct": 1, "total": 4})


def test_prompts_are_rendered_with_their_tools(tiny_llama, chat_tokenizer):
    tok, template = chat_tokenizer, tool_template()
    examples = TOOLS_TASK.generate("heldout", 3, seed=0)
    prompts, tools = [ex.answer_prompt_messages() for ex in examples], [list(ex.tools) for ex in examples]
    ids = prompt_ids(tok, prompts, template, tools)
    for got, p, t in zip(ids, prompts, tools):
        want = tok.apply_chat_template(
            p, tools=t, chat_template=template, add_generation_prompt=True, return_dict=False
        )
        assert got == list(want)
        assert "get_stock(item: string)" in tok.decode(got)
    # batched (left padded) == one by one, with tools
    batched = generate_replies(
        tiny_llama, tok, prompts, max_new_tokens=5, batch_size=2, chat_template=template, tools=tools
    )
    alone = []
    for p in ids:
        out = tiny_llama.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        alone.append(tok.decode(out[0, len(p) :], skip_special_tokens=True))
    assert batched == alone


def test_evaluate_on_a_real_model(tiny_llama, chat_tokenizer):
    examples = TOOLS_TASK.generate("heldout", 4, seed=1)

    def generate(prompts, tools, n):
        return generate_replies(
            tiny_llama, chat_tokenizer, prompts, max_new_tokens=n, chat_template=tool_template(), tools=tools
        )

    result = evaluate_tool_calls(generate, chat_tokenizer, examples, chat_template=tool_template())
    assert result.total == 4 and result.correct == 0  # a random model does not write the call
    with pytest.raises(TypeError, match="scored by quickloris.train.tool_eval.evaluate_tool_calls"):
        evaluate_task(tiny_llama, chat_tokenizer, "tools", n=2)
    assert len(result.samples) == 4 and all(isinstance(s["reply"], str) for s in result.samples)


def test_eval_data_with_tool_calls_keeps_them_in_the_prompt(tiny_llama, chat_tokenizer, tmp_path, monkeypatch):
    """--eval-data rows in OpenAI's tool format: the final answer is scored after the prompt with its tools, calls and
    results; a template that cannot render them is refused (file:line), as is a row ending with a call."""
    from quickloris.data.errors import DataFormatError
    from quickloris.data.tasks import write_jsonl
    from quickloris.train.exact_match import evaluate_exact_match
    from quickloris.train.runtime import load_eval_examples

    examples = TOOLS_TASK.generate("heldout", 2, seed=4)
    path = tmp_path / "held.jsonl"
    write_jsonl(examples, path)
    loaded = load_eval_examples(path)
    assert [ex.answer for ex in loaded] == [ex.answer for ex in examples]
    assert [list(ex.prompt_messages()) for ex in loaded] == [
        [{k: v for k, v in m.items() if v is not None} for m in ex.answer_prompt_messages()] for ex in examples
    ]
    assert all(ex.tools == examples[0].tools for ex in loaded)
    seen, generate = [], tiny_llama.generate

    def spy(**kw):
        seen.append(kw["input_ids"])
        return generate(**kw)

    monkeypatch.setattr(tiny_llama, "generate", spy)
    result = evaluate_exact_match(tiny_llama, chat_tokenizer, loaded, max_new_tokens=3, chat_template=tool_template())
    assert result.total == 2
    prompts = chat_tokenizer.batch_decode(seen[0], skip_special_tokens=True)
    for ex, prompt in zip(examples, prompts):  # generated from the prompt with the tools, the call and the result
        assert "get_stock(item: string)" in prompt and json.dumps(ex.arguments) in prompt and ex.result in prompt
    with pytest.raises(DataFormatError, match=rf"^{path}:1: the chat template ignores the row's 'tools'"):
        evaluate_exact_match(tiny_llama, chat_tokenizer, loaded, max_new_tokens=3)  # its ChatML template: no tools
    rows = [ex.row() for ex in examples]
    rows[1]["messages"] = rows[1]["messages"][:3]  # ends with the call
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from quickloris.config import ConfigError

    with pytest.raises(ConfigError, match=rf"^EvalConfig.eval_data: {path}:2: the last message is a tool call"):
        load_eval_examples(path)  # one line naming --eval-data (on the command line) and the row
