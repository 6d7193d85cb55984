"""Classification data: {"text", "label"} rows with file:line errors, the label set (strings or ints), unseen
labels in evaluation data, tokenization (class id at the pooled token, trailing pad ids dropped), batches with one
label per text, the embedded sentiment task's disjoint splits, and the data options of a classification run."""

from __future__ import annotations

import json

import pytest
import torch

from quickloris.config import ConfigError
from quickloris.data.classification import (
    CLASSIFICATION_TASKS,
    ClassificationRow,
    class_of,
    collate_classification,
    get_classification_task,
    label_ids,
    label_names,
    parse_row,
    read_classification_jsonl,
    tokenize_classification,
    write_classification_jsonl,
)
from quickloris.data.config import DataConfig, prepare_classification_data, prepare_data, task_name
from quickloris.data.jsonl import DataFormatError
from quickloris.data.packing import epoch_batches


def _write(path, lines):
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines))
    return path


def test_rows_and_errors_name_file_and_line(tmp_path):
    f = _write(tmp_path / "d.jsonl", [{"text": "good", "label": "pos"}, "\n", {"text": "bad", "label": "neg", "x": 1}])
    rows = read_classification_jsonl(f)
    assert [(r.text, r.label, r.source) for r in rows] == [("good", "pos", f"{f}:1"), ("bad", "neg", f"{f}:3")]
    cases = [
        ({"text": "a"}, "2: missing 'label'"),
        ({"label": 1}, "2: missing 'text'"),
        ({"text": "", "label": 1}, "'text' must be a non-empty string"),
        ({"text": "a", "label": True}, "'label' must be a non-empty string or an integer"),
        ({"text": "a", "label": 1.5}, "'label' must be"),
        ({"text": "a", "label": ""}, "'label' must be"),
        ({"messages": []}, "a chat record"),
        ([1, 2], "expected a JSON object"),
        ("{oops\n", "invalid JSON"),
    ]
    for i, (line, msg) in enumerate(cases):
        bad = _write(tmp_path / f"bad{i}.jsonl", [{"text": "ok", "label": 0}, line])
        with pytest.raises(DataFormatError, match=f"bad{i}.jsonl:2: .*" if ":" not in msg[:3] else None) as e:
            read_classification_jsonl(bad)
        assert msg in str(e.value) and f"bad{i}.jsonl:2" in str(e.value)
    with pytest.raises(DataFormatError, match="no rows"):
        read_classification_jsonl(_write(tmp_path / "empty.jsonl", ["\n"]))


def test_label_set_from_the_data(tmp_path):
    rows = [parse_row({"text": "t", "label": x}, f"f:{i}") for i, x in enumerate([10, 2, 2, 0])]
    assert label_names(rows) == ["0", "2", "10"]  # ints sort numerically
    assert label_ids(rows, {"0": 0, "2": 1, "10": 2}) == [2, 1, 1, 0]
    strs = [ClassificationRow("t", x, f"f:{i}") for i, x in enumerate(["pos", "neg", "Neutral"])]
    assert label_names(strs) == ["Neutral", "neg", "pos"]
    with pytest.raises(DataFormatError, match="f:1: label 'x' is a string, but f:0 has an int label"):
        label_names([ClassificationRow("t", 1, "f:0"), ClassificationRow("t", "x", "f:1")])
    with pytest.raises(DataFormatError, match="one label only"):
        label_names([ClassificationRow("t", "a", "f:0")] * 3)
    evald = read_classification_jsonl(
        _write(tmp_path / "e.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
    )
    with pytest.raises(
        DataFormatError,
        match=r"e.jsonl:2: label 'meh' is not one of the labels of the training "
        r"data \('neg', 'pos'\)",
    ):
        label_ids(evald, {"neg": 0, "pos": 1})


class _Tok:
    """Whitespace tokenizer: word -> its length + 3, a BOS (1) first; pad id 2 (also the id of 'zz' words)."""

    pad_token_id = 2

    def __call__(self, text):
        return {"input_ids": [1] + [2 if w == "zz" else len(w) + 3 for w in text.split()]}


def test_tokenize_puts_the_class_on_the_last_token_and_drops_trailing_pads():
    rows = [
        ClassificationRow("a bb ccc", "y", "f:1"),
        ClassificationRow("dddd zz zz", "x", "f:2"),
        ClassificationRow("a " * 20, "x", "f:3"),
    ]
    examples, stats = tokenize_classification(_Tok(), rows, {"x": 0, "y": 1}, max_seq_len=10)
    assert [e.input_ids for e in examples] == [[1, 4, 5, 6], [1, 7]]
    assert [e.labels for e in examples] == [[-100, -100, -100, 1], [-100, 0]]
    assert [class_of(e) for e in examples] == [1, 0]
    assert (stats.kept, stats.dropped_too_long, stats.dropped_sources, stats.tokens) == (2, 1, ["f:3"], 6)
    with pytest.raises(DataFormatError, match="f:3: 21 tokens, longer than max_seq_len=10"):
        tokenize_classification(_Tok(), rows, {"x": 0, "y": 1}, max_seq_len=10, overflow="error")
    with pytest.raises(DataFormatError, match="f:1: the text tokenizes to nothing but padding"):
        tokenize_classification(
            type("T", (), {"pad_token_id": 1, "__call__": lambda s, t: {"input_ids": [1]}})(),
            rows[:1],
            {"y": 0, "x": 1},
            max_seq_len=10,
        )


@pytest.mark.parametrize("packing", [False, True])
def test_batches_have_one_label_per_text_in_pooling_order(packing):
    rows = [ClassificationRow("a " * n, n % 3, f"f:{n}") for n in range(1, 9)]
    examples, _ = tokenize_classification(_Tok(), rows, {"0": 0, "1": 1, "2": 2}, max_seq_len=16)
    for plan in epoch_batches(
        [len(e) for e in examples], batch_size=3, seed=5, epoch=0, packing=packing, max_seq_len=16
    ):
        batch = collate_classification(examples, plan, packing=packing, pad_token_id=0)
        order = [i for row in plan for i in row]
        assert batch["labels"].tolist() == [class_of(examples[i]) for i in order]
        if packing:
            assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
            starts = (batch["position_ids"][0] == 0).sum()
            assert int(starts) == len(order)
        else:
            assert batch["input_ids"].shape[0] == len(order)


def test_embedded_sentiment_task_has_disjoint_deterministic_splits():
    task = get_classification_task("sentiment")
    train, held = task.rows("train", 1200, 0), task.rows("heldout", 200, 0)
    assert {r.text for r in train}.isdisjoint(r.text for r in held)
    assert len({r.text for r in train}) == 1200 and all(task.split_of(r.text) == "heldout" for r in held)
    assert task.rows("heldout", 200, 0) == held and task.rows("heldout", 200, 1) != held
    assert label_names(train) == ["negative", "positive"] == list(task.labels)
    share = sum(r.label == "positive" for r in train) / len(train)
    assert 0.4 < share < 0.6  # balanced by construction: P(positive) = 1/2
    negated = [r for r in train if " not " in r.text]
    assert negated and all(
        any(
            w in r.text
            for w in (
                "great",
                "wonderful",
                "delightful",
                "excellent",
                "amazing",
                "pleasant",
                "superb",
                "fantastic",
                "lovely",
                "brilliant",
                "charming",
                "enjoyable",
            )
        )
        == (r.label == "negative")
        for r in negated
    )
    with pytest.raises(ValueError, match="unknown classification task"):
        get_classification_task("addition")
    assert set(CLASSIFICATION_TASKS) == {"sentiment"}


def test_prepare_classification_data(tmp_path):
    tok = _Tok()
    train = tmp_path / "t.jsonl"
    write_classification_jsonl(
        [ClassificationRow("a b", "x"), ClassificationRow("c", "y"), ClassificationRow("ddd e", "x")], train
    )
    evald = _write(tmp_path / "e.jsonl", [{"text": "a", "label": "y"}])
    p = prepare_classification_data(DataConfig(data=str(train)), tok, eval_data=str(evald))
    assert p.labels == ["x", "y"] and [class_of(e) for e in p.examples] == [0, 1, 0]
    assert [r.text for r in p.eval_rows] == ["a"] and p.eval_source == f"--eval-data {evald}"
    assert prepare_classification_data(DataConfig(data=str(train)), tok).eval_rows == []
    emb = prepare_classification_data(DataConfig(num_train=40, num_eval=8), tok, seed=3)
    assert emb.labels == ["negative", "positive"] and len(emb.examples) == 40 and len(emb.eval_rows) == 8
    bad = _write(tmp_path / "b.jsonl", [{"text": "a", "label": "y"}, {"text": "b", "label": "z"}])
    with pytest.raises(DataFormatError, match="b.jsonl:2: label 'z'"):
        prepare_classification_data(DataConfig(data=str(train)), tok, eval_data=str(bad))
    # tasks belong to one task type; none: the type's default
    assert task_name(DataConfig, None, "classification") == "sentiment"
    assert task_name(DataConfig, None, "causal_lm") == "addition"
    with pytest.raises(ConfigError, match="'addition' is not a classification task") as e:
        prepare_classification_data(DataConfig(task="addition"), tok)
    assert e.value.name == "task"
    with pytest.raises(ConfigError, match="'sentiment' is not a causal lm task"):
        prepare_data(DataConfig(task="sentiment"), tok)
    with pytest.raises(ConfigError, match="unknown task; choose one of addition, reverse, tools, sentiment"):
        DataConfig(task="nope")
    assert torch.tensor(0).item() == 0


def test_rows_from_csv_parquet_and_several_files_with_column_names(tmp_path):
    from tests.helpers import require

    require("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv = tmp_path / "a.csv"
    csv.write_text('review,stars\n"so good,\nreally",10\nbad,2\n')
    pq.write_table(pa.Table.from_pylist([{"review": "meh", "stars": 5}]), tmp_path / "b.parquet")
    rows = read_classification_jsonl([csv, tmp_path / "b.parquet"], {"text": "review", "label": "stars"})
    assert [(r.text, r.label, r.source) for r in rows] == [
        ("so good,\nreally", 10, f"{csv}:2"),  # a CSV integer is an int label: numeric class order
        ("bad", 2, f"{csv}:4"),
        ("meh", 5, f"{tmp_path / 'b.parquet'}:row 0"),
    ]
    assert label_names(rows) == ["2", "5", "10"]
    with pytest.raises(DataFormatError, match="a.csv:2: --data-columns names 'label_'"):
        read_classification_jsonl(csv, {"text": "review", "label": "label_"})
    with pytest.raises(ConfigError, match="data_format is for causal LM data"):
        prepare_classification_data(DataConfig(data=str(csv), data_format="text"), None)
