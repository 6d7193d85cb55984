"""Build examples/tool_calling.ipynb from the cells below and execute it in place (CPU, ~30-60 minutes on 2 busy cores).

    python examples/tool_calling_notebook.py           # build + execute, write the notebook with its outputs
    python examples/tool_calling_notebook.py --build   # build only (no outputs)

The notebook fine-tunes the embedded SmolLM2-135M-Instruct on the embedded tool-calling task (`--task tools`), scores
the tool call and the final answer before and after, exports a GGUF file that carries quickloris' tool template, and
runs a tool loop on that file with llama.cpp (llama-cpp-python). Its last cell writes the numbers to
benchmarks/results/train/tools-cpu-<UTC time>.json. The cells are defined here, so the committed notebook is always
the executed version of this file (tests/data/test_tool_calling_notebook.py compares them and checks the outputs).

Needs nbformat, nbclient and ipykernel (``pip install nbclient ipykernel``; not quickloris dependencies) and
llama-cpp-python.
"""

from __future__ import annotations

import argparse
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().with_name("tool_calling.ipynb")

CELLS: list[tuple[str, str]] = [
    (
        "markdown",
        """# Tool calling with quickloris, on a CPU

Fine-tune SmolLM2-135M-Instruct (embedded, no download) to call tools, in OpenAI's chat format, then run the result in
llama.cpp:

1. **data**: the embedded task `--task tools`: questions that need one of three tools (a calculator, a unit
   converter, a stock lookup), the assistant's call, the tool's result and a final answer from it. Rows are OpenAI
   rows (`tools`, `tool_calls` with `content: null`, `role: "tool"` results); the loss covers what the assistant
   writes (the call and the answer), not the tool schemas, the system prompt or the results;
2. **train** QLoRA on the CPU, scoring held-out problems **before and after**: the call (name and arguments,
   parsed as JSON) and the final answer (exact match);
3. **export** a GGUF file (LoRA merged into the NF4 base, Q8_0) that carries the chat template training used;
4. **llama.cpp**: `create_chat_completion(..., tools=...)` on that file renders the tools with the file's
   template, the model answers with a `<tool_call>`, we parse it, run the tool and feed the result back.

SmolLM2-Instruct's own chat template has no tools, so quickloris uses the ChatML tool template it ships
(`quickloris/data/templates/chatml_tools.jinja`, Hermes / Qwen2.5-style `<tool_call>` JSON) and says so.

This notebook is generated and executed by `python examples/tool_calling_notebook.py`.""",
    ),
    (
        "code",
        """import json
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ["TQDM_DISABLE"] = "1"  # progress bars do not render in a saved notebook; the log lines stay
warnings.filterwarnings("ignore", message="IProgress not found")

from quickloris.cli.main import main

WORK = Path(tempfile.mkdtemp(prefix="quickloris-tools-"))
RUN, GGUF = WORK / "run", WORK / "smollm2-tools.q8_0.gguf"
STEPS, BATCH, NUM_EVAL = 40, 4, 50  # 160 training conversations; 50 held-out problems scored
started = time.perf_counter()
print(f"working folder {WORK}; {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")""",
    ),
    (
        "markdown",
        "## 1. Data\n\nOne training row of the embedded task, as OpenAI-format JSON (what `--data FILE` reads too):",
    ),
    (
        "code",
        """from quickloris.data.jsonl import load_jsonl
from quickloris.data.tasks import get_task, write_jsonl

task = get_task("tools")
rows = task.generate("train", 3, seed=0)
print(json.dumps(rows[0].row(), indent=1))
write_jsonl(rows, WORK / "sample.jsonl")  # and read back as quickloris reads --data files
record = load_jsonl(WORK / "sample.jsonl")[0]
print(record.messages[2])  # normalised: content "" and the arguments parsed""",
    ),
    (
        "markdown",
        "Rendered with the tool template, and the tokens the loss is computed on (everything else is context):",
    ),
    (
        "code",
        """from quickloris.data.chat import IGNORE_INDEX, tokenize_record
from quickloris.data.tools import tool_template
from quickloris.models.loading import load_tokenizer, resolve_model

tok = load_tokenizer(resolve_model(None))
ex = tokenize_record(tok, record, chat_template=tool_template())
print(tok.decode(ex.input_ids))
runs, cur = [], []
for token, label in zip(ex.input_ids, ex.labels):
    if label != IGNORE_INDEX:
        cur.append(token)
    elif cur:
        runs, cur = runs + [cur], []
print(f"trained ({ex.num_trainable} of {len(ex.input_ids)} tokens):")
for run in runs:
    print("   ", repr(tok.decode(run)))""",
    ),
    (
        "markdown",
        """## 2. Train, scoring before and after

`quickloris train --task tools`: the model is quantized to NF4, LoRA (r=16) on every linear layer, AdamW. The held-out
problems are scored twice each: the call generated after the question, and the final answer generated after the
reference call and its result.""",
    ),
    (
        "code",
        """t0 = time.perf_counter()
args = ["train", "--task", "tools", "--batch-size", BATCH, "--max-steps", STEPS, "--num-eval", NUM_EVAL]
assert main([*map(str, args), "--output-dir", str(RUN), "--no-progress", "--log-every", "5"]) == 0
train_minutes = (time.perf_counter() - t0) / 60
evals = json.loads((RUN / "metrics.json").read_text())["eval"]
for label, r in evals.items():
    print(f"{label:6s} tool call {100 * r['call_accuracy']:5.1f}%   final answer {100 * r['answer_accuracy']:5.1f}%")
print(f"quickloris train took {train_minutes:.1f} minutes (load, both evaluations and {STEPS} steps)")""",
    ),
    (
        "markdown",
        """## 3. Export a GGUF file with the tool template

The run recorded which chat template it trained with, so `quickloris export gguf --adapter` stores that template in
the file (`--chat-template FILE` would override it). `quickloris eval --gguf` scores the file through llama.cpp on the
same held-out problems.""",
    ),
    (
        "code",
        """args = ["export", "gguf", "--adapter", RUN / "adapter", "--quant", "q8_0", "--out", GGUF]
assert main(list(map(str, args))) == 0
args = ["eval", "--gguf", GGUF, "--task", "tools", "--num-eval", NUM_EVAL, "--output", WORK / "eval-gguf.json"]
assert main(list(map(str, args))) == 0
exported = json.loads((WORK / "eval-gguf.json").read_text())""",
    ),
    (
        "markdown",
        """## 4. A tool loop in llama.cpp

llama-cpp-python reads the chat template from the file and renders `tools=` with it. The model's reply is parsed
(`quickloris.data.tools.parse_tool_call`), the tool runs here, and its result goes back for the final answer. The
questions are held-out ones (never trained on).""",
    ),
    (
        "code",
        """from llama_cpp import Llama

from quickloris.data.tool_task import INSTRUCTION, TOOLS, stock_of
from quickloris.data.tools import parse_tool_call

UNITS = {("km", "m"): 1000, ("m", "cm"): 100, ("kg", "g"): 1000, ("l", "ml"): 1000, ("h", "min"): 60, ("min", "s"): 60}


def run_tool(name, args):
    if name == "calculator":
        left, op, right = args["expression"].split()
        a, b = int(left), int(right)
        return str({"+": a + b, "-": a - b, "*": a * b}[op])
    if name == "convert_units":
        return f"{args['value'] * UNITS[args['from_unit'], args['to_unit']]} {args['to_unit']}"
    return str(stock_of(args["item"]))


llm = Llama(model_path=str(GGUF), n_ctx=1024, verbose=False)
print("chat format:", llm.chat_format, "(the template stored in the file)")
chats = []
for ex in get_task("tools").generate("heldout", 6, seed=1)[:6]:
    messages = [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": ex.question}]
    reply = llm.create_chat_completion(messages=messages, tools=list(TOOLS), temperature=0.0, max_tokens=64)
    text = reply["choices"][0]["message"]["content"]
    call = parse_tool_call(text)
    print(f"user: {ex.question}\\nmodel: {text!r}")
    if call is None:
        print("  no parseable tool call\\n")
        chats.append({"question": ex.question, "reply": text, "call": None})
        continue
    print("  parsed call:", json.dumps({"name": call[0], "arguments": call[1]}))
    result = run_tool(*call)
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": call[0], "arguments": json.dumps(call[1])}}
        ]},
        {"role": "tool", "tool_call_id": "call_0", "content": result},
    ]
    final = llm.create_chat_completion(messages=messages, tools=list(TOOLS), temperature=0.0, max_tokens=32)
    answer = final["choices"][0]["message"]["content"]
    print(f"  tool result: {result!r}\\n  final answer: {answer!r}\\n")
    chats.append({"question": ex.question, "reply": text, "call": list(call), "result": result, "answer": answer})""",
    ),
    ("markdown", "## Result file"),
    (
        "code",
        """from quickloris.utils.atomic import atomic_write_json
from quickloris.utils.provenance import default_results_dir, environment

stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
path = default_results_dir() / "train" / f"tools-cpu-{stamp}.json"
keep = ("call_accuracy", "call_correct", "answer_accuracy", "answer_correct", "total", "seconds")
results = {
    "what": "examples/tool_calling.ipynb: quickloris train --task tools on SmolLM2-135M-Instruct (CPU), GGUF export, "
    "llama.cpp tool loop",
    "steps": STEPS,
    "batch_size": BATCH,
    "num_eval": NUM_EVAL,
    "train_minutes": round(train_minutes, 1),
    "before": {k: evals["before"][k] for k in keep},
    "after": {k: evals["after"][k] for k in keep},
    "exported_q8_0": {k: exported[k] for k in keep},
    "llama_cpp_chats": chats,
    "total_minutes": round((time.perf_counter() - started) / 60, 1),
}
atomic_write_json(path, {"environment": environment(), "results": results})
print(f"wrote {path.relative_to(default_results_dir().parent.parent)}")
print(json.dumps({k: results[k] for k in ("before", "after", "exported_q8_0", "total_minutes")}))""",
    ),
]


def build():
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    for kind, source in CELLS:
        nb.cells.append(
            nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
        )
    return nb


def main() -> None:
    import nbformat

    p = argparse.ArgumentParser()
    p.add_argument("--build", action="store_true", help="only build the notebook, do not execute it")
    p.add_argument("--timeout", type=int, default=7200, help="seconds per cell")
    args = p.parse_args()
    nb = build()
    if not args.build:
        from nbclient import NotebookClient

        NotebookClient(
            nb, timeout=args.timeout, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
        ).execute()
    tmp = NOTEBOOK.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    tmp.replace(NOTEBOOK)  # atomic: a failed run leaves the previous notebook
    print(f"wrote {NOTEBOOK}")


if __name__ == "__main__":
    main()
