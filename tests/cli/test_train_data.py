"""`quickloris train --data` on every file type and record shape, with a tiny random Llama: one training step
through the command line, the header line saying what was read, and exactly which tokens are trained (the tokens
whose label is not -100, decoded, against the assistant replies / completions / texts of the rows)."""

from __future__ import annotations

import csv
import gzip
import json

import pytest

pytest.importorskip("transformers")

from quickloris.cli.main import main  # noqa: E402
from quickloris.data.chat import IGNORE_INDEX  # noqa: E402
from quickloris.data.config import DataConfig, prepare_data  # noqa: E402
from tests.helpers import require  # noqa: E402
from tests.train.tiny import chat_tokenizer, save_tiny_llama  # noqa: E402

EOT = "<|im_end|>"  # the tiny ChatML tokenizer's end of turn and EOS


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


def _segments(ex, tok):
    """The labelled tokens of an example, as decoded runs of consecutive positions."""
    runs, run = [], []
    for i, y in zip(ex.input_ids, ex.labels):
        if y != IGNORE_INDEX:
            assert y == i
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    return [tok.decode(r) for r in runs + ([run] if run else [])]


def _write_jsonl_gz(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def _write_csv(path, rows):
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _save_to_disk(path, rows):
    require("datasets").Dataset.from_list(rows).save_to_disk(str(path))
    return path


def _run(model, out, data, *extra):
    args = ["train", "--model", str(model), "--output-dir", str(out), "--threads", "1", "--no-progress"]
    return main([*args, "--data", *map(str, data), "--max-steps", "1", "--batch-size", "8", *map(str, extra)])


PARTS = [{"type": "text", "text": "12 + "}, {"type": "text", "text": "30"}]
CASES = {
    # name: (writer, file name, rows, extra options, what the header says, trained text per row)
    "messages-parts-jsonl-gz": (
        _write_jsonl_gz,
        "chat.jsonl.gz",
        [
            {"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": PARTS},
                          {"role": "assistant", "content": "42"}]},
            {"messages": [{"role": "user", "content": "1 + 2"}, {"role": "assistant", "content": "3"},
                          {"role": "user", "content": "+ 4"}, {"role": "assistant", "content": "7"}]},
        ],
        [],
        "(JSON lines: messages 2)",
        [["42" + EOT], ["3" + EOT, "7" + EOT]],
    ),
    "prompt-completion-json-array": (
        lambda p, rows: p.write_text(json.dumps(rows, indent=2)) and p,
        "pc.json",
        [{"prompt": "12 + 30 =", "completion": " 42"}, {"prompt": "1 + 2 = ", "completion": "3" + EOT}],
        [],
        "(JSON array: prompt_completion 2)",
        [[" 42" + EOT], ["3" + EOT]],  # no separator added; an EOS already there is not doubled
    ),
    "alpaca-csv": (
        _write_csv,
        "alpaca.csv",
        [
            {"instruction": "Add the two numbers.", "input": "12 + 30", "output": "42", "system": ""},
            {"instruction": "Reverse the digits.\n123", "input": "", "output": "321", "system": "Be brief."},
        ],
        [],
        "(CSV: alpaca 2)",
        [["42" + EOT], ["321" + EOT]],
    ),
    "sharegpt-parquet": (
        _write_parquet,
        "sharegpt.parquet",
        [
            {"conversations": [{"from": "system", "value": "Add."}, {"from": "human", "value": "12 + 30"},
                               {"from": "gpt", "value": "42"}]},
            {"conversations": [{"from": "human", "value": "1 + 2"}, {"from": "gpt", "value": "3"},
                               {"from": "human", "value": "+ 4"}, {"from": "gpt", "value": "7"}]},
        ],
        [],
        "(Parquet: sharegpt 2)",
        [["42" + EOT], ["3" + EOT, "7" + EOT]],
    ),
    "text-save-to-disk": (
        _save_to_disk,
        "texts",
        [{"text": "12 + 30 = 42"}, {"text": "   "}, {"text": "Reverse the digits 123: 321"}],
        [],
        "(datasets folder: text 3): 2 examples (0 longer than --max-seq-len, 1 empty dropped)",
        [["12 + 30 = 42" + EOT], ["Reverse the digits 123: 321" + EOT]],  # every token (the first is not predicted)
    ),
    "columns-csv": (
        _write_csv,
        "qa.csv",
        [{"question": "12 + 30 =", "answer": " 42", "id": "a"}, {"question": "1 + 2 =", "answer": " 3", "id": "b"}],
        ["--data-columns", "prompt=question,completion=answer"],
        "(CSV: prompt_completion 2)",
        [[" 42" + EOT], [" 3" + EOT]],
    ),
    "forced-text-jsonl-gz": (
        _write_jsonl_gz,
        "forced.jsonl.gz",
        [{"text": "1 + 2 = 3", "output": "ignored"}],
        ["--data-format", "text"],
        "(JSON lines: text 1)",
        [["1 + 2 = 3" + EOT]],
    ),
}  # fmt: skip


# What the first example renders to (the context around the trained tokens), where the conversion composes it.
FIRST = {
    "messages-parts-jsonl-gz": "<|im_start|>system\nAdd.<|im_end|>\n<|im_start|>user\n12 + 30<|im_end|>\n"
    "<|im_start|>assistant\n42<|im_end|>\n",
    "alpaca-csv": "<|im_start|>user\nAdd the two numbers.\n12 + 30<|im_end|>\n<|im_start|>assistant\n42<|im_end|>\n",
    "sharegpt-parquet": "<|im_start|>system\nAdd.<|im_end|>\n<|im_start|>user\n12 + 30<|im_end|>\n"
    "<|im_start|>assistant\n42<|im_end|>\n",
    "columns-csv": "12 + 30 = 42<|im_end|>",
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_format_trains_one_step_on_exactly_the_right_tokens(model, tok, tmp_path, case, capsys):
    if case.endswith(("parquet", "csv", "disk")):
        require("datasets")
    write, name, rows, extra, header, trained = CASES[case]
    path = write(tmp_path / name, rows)
    assert _run(model, tmp_path / "run", [path], *extra) == 0
    printed = capsys.readouterr().out
    line = next(ln for ln in printed.splitlines() if ln.startswith("data: "))
    assert f"data: {path} {header}" in line, line

    options = dict(zip(extra[::2], extra[1::2]))
    cfg = DataConfig(
        data=str(path),
        data_format=options.get("--data-format", "auto"),
        data_columns=options.get("--data-columns", ""),
    )
    prep = prepare_data(cfg, tok)
    assert [_segments(ex, tok) for ex in prep.examples] == trained
    if case in FIRST:
        assert tok.decode(prep.examples[0].input_ids) == FIRST[case]
    if case.startswith("text"):  # language modelling: every token is a label
        assert all(ex.labels == ex.input_ids for ex in prep.examples)
    # the one step saw all rows (batch 8 >= rows): its trained-token count is the examples'
    step = json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"][0]
    assert step["trained_tokens"] == sum(ex.num_trainable for ex in prep.examples) == prep.stats.trainable_tokens
    assert f"{prep.stats.trainable_tokens} trained" in line


def test_several_files_of_several_types_in_one_run(model, tmp_path, capsys):
    require("datasets")
    a = _write_jsonl_gz(tmp_path / "a.jsonl.gz", [CASES["messages-parts-jsonl-gz"][2][1]])
    b = _write_parquet(tmp_path / "b.parquet", CASES["sharegpt-parquet"][2])
    c = _write_csv(tmp_path / "c.csv", CASES["alpaca-csv"][2])
    held = _save_to_disk(tmp_path / "held", CASES["sharegpt-parquet"][2])  # --eval-data: any type, a folder too
    assert _run(model, tmp_path / "run", [a, b], "--data", c, "--eval-data", held) == 0  # --data A B, and repeated
    printed = capsys.readouterr().out
    assert f"eval: --eval-data {held}" in printed and "eval after: exact match" in printed
    line = next(ln for ln in printed.splitlines() if ln.startswith("data: "))
    assert line.startswith(
        f"data: {a} (JSON lines: messages 1), {b} (Parquet: sharegpt 2), {c} (CSV: alpaca 2): 5 examples "
        "(0 longer than --max-seq-len dropped)"
    ), line
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["data"]["data"] == [str(a), str(b), str(c)]
    assert cfg["data_stats"]["shapes"] == {"messages": 1, "sharegpt": 2, "alpaca": 2}


@pytest.mark.parametrize(
    "name, content, expected",
    [
        (
            "qa.jsonl",
            '{"question": "q", "answer": "a"}\n',
            r"qa\.jsonl:1: no known record shape in keys 'question', 'answer'; shapes: messages .* text \{'text'\}; "
            "map other names with --data-columns",
        ),
        ("bad.jsonl", '{"messages": []}\n', r"bad\.jsonl:1: 'messages' is an empty list"),
        ("rows.xml", "<rows/>", r"--data: .*rows\.xml: unknown data file type \(suffix \.xml\); --data takes .jsonl"),
    ],
)
def test_bad_data_is_one_line(model, tmp_path, capsys, name, content, expected):
    import re

    (tmp_path / name).write_text(content)
    assert _run(model, tmp_path / "run", [tmp_path / name]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(expected, err[0]), err


def test_bad_options(model, tmp_path, capsys):
    p = _write_jsonl_gz(tmp_path / "a.jsonl.gz", [{"text": "x"}])
    assert _run(model, tmp_path / "r", [p], "--data-columns", "answer=a") == 2
    assert "--data-columns maps 'answer', which no record shape reads" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(model, tmp_path / "r", [p], "--data-format", "chatml")
    assert "invalid choice: 'chatml'" in capsys.readouterr().err
    assert _run(model, tmp_path / "r", [p], "--data-workers", "0") == 2
    assert "--data-workers must be a positive int, got 0" in capsys.readouterr().err


def test_eval_data_in_other_shapes_and_types(tmp_path):
    require("datasets")
    from quickloris.train.runtime import load_eval_examples

    path = _write_csv(tmp_path / "held.csv", [{"q": "12 + 30", "a": "42"}, {"q": "1 + 2", "a": "3"}])
    examples = load_eval_examples(path, {"instruction": "q", "output": "a"})
    assert [(e.question, e.answer, e.source) for e in examples] == [
        ("12 + 30", "42", f"{path}:2"),
        ("1 + 2", "3", f"{path}:3"),
    ]
