"""`quickloris train --task tools` -> `export gguf` -> llama.cpp on a tiny random Llama with a ChatML tokenizer whose
template has no tools: quickloris' tool template is used (with a note), recorded in the run, stored in the GGUF file
and rendered by llama-cpp-python exactly as training rendered it; `quickloris eval --gguf` scores the file."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickloris.cli.main import main  # noqa: E402
from quickloris.data.tools import SHIPPED_TOOL_TEMPLATE, tool_template, tool_template_path  # noqa: E402
from tests.helpers import require  # noqa: E402
from tests.train.tiny import save_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("tools")
    n = torch.get_num_threads()
    model = save_tiny_llama(d / "model", max_position_embeddings=1024)
    out = d / "run"
    args = ["train", "--model", model, "--task", "tools", "--num-train", 8, "--num-eval", 3, "--max-seq-len", 1024]
    args += ["--output-dir", out, "--threads", 1, "--no-progress", "--batch-size", 4, "--max-steps", 2]
    rc = main(list(map(str, args)))
    torch.set_num_threads(n)
    assert rc == 0
    return {"model": model, "out": out, "dir": d}


def test_train_uses_and_records_the_tool_template(run, capsys):
    cfg = json.loads((run["out"] / "config.json").read_text())
    assert cfg["resolved"]["chat_template"] == SHIPPED_TOOL_TEMPLATE
    ev = json.loads((run["out"] / "metrics.json").read_text())["eval"]
    for label in ("before", "after"):
        r = ev[label]
        assert r["total"] == 3 and r["accuracy"] == r["call_accuracy"] and 0 <= r["answer_accuracy"] <= 1
        assert r["samples"][0]["final_answer"] and "get_stock" in r["samples"][0]["answer"] or r["samples"][0]["answer"]


def test_export_stores_the_template_and_llama_cpp_renders_it_alike(run, tmp_path, capsys):
    gguf_mod = require("gguf")
    llama_chat_format = require("llama_cpp.llama_chat_format")
    from quickloris.data.tool_task import TOOLS_TASK
    from quickloris.models.loading import load_tokenizer, resolve_model

    out = tmp_path / "tools.gguf"
    args = ["export", "gguf", "--model", run["model"], "--adapter", run["out"] / "adapter", "--quant", "f32"]
    assert main([*map(str, args), "--out", str(out)]) == 0
    assert "chat template: quickloris' ChatML tool template" in capsys.readouterr().out
    reader = gguf_mod.GGUFReader(str(out))
    field = reader.fields["tokenizer.chat_template"]
    stored = bytes(field.parts[field.data[0]]).decode("utf-8")
    assert stored == tool_template()
    # llama-cpp-python's formatter (what create_chat_completion uses for a file's template) renders the prompt the
    # model was trained on, tools included
    tok = load_tokenizer(resolve_model(str(run["model"])))
    ex = TOOLS_TASK.generate("heldout", 1, 0)[0]
    fmt = llama_chat_format.Jinja2ChatFormatter(stored, eos_token=tok.eos_token, bos_token="")
    theirs = fmt(messages=ex.answer_prompt_messages(), tools=list(ex.tools)).prompt
    ours = tok.apply_chat_template(
        ex.answer_prompt_messages(),
        tools=list(ex.tools),
        chat_template=stored,
        add_generation_prompt=True,
        tokenize=False,
    )
    assert theirs == ours and "get_stock(item: string)" in ours
    # --chat-template overrides; a missing file is one line
    other = tmp_path / "t.jinja"
    other.write_text("{{ 'x' }}")
    assert main([*map(str, args), "--out", str(tmp_path / "o.gguf"), "--chat-template", str(other)]) == 0
    field = gguf_mod.GGUFReader(str(tmp_path / "o.gguf")).fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == "{{ 'x' }}"
    assert main([*map(str, args), "--out", str(tmp_path / "p.gguf"), "--chat-template", str(tmp_path / "no")]) == 2
    assert "--chat-template" in capsys.readouterr().err

    # quickloris eval scores the file on the tool task (the same template, chosen the same way)
    res = tmp_path / "eval.json"
    eval_args = ["eval", "--model", run["model"], "--gguf", out, "--task", "tools", "--num-eval", 2, "--output", res]
    assert main([*map(str, eval_args), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "quickloris' ChatML tool template" in printed and "eval exported: tool call" in printed
    result = json.loads(res.read_text())
    assert result["total"] == 2 and "call_accuracy" in result and "answer_accuracy" in result
    assert str(tool_template_path()) in printed
