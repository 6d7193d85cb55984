"""DataConfig: CLI options derived from it, validation, and prepare_data on the embedded task and on JSONL."""

from __future__ import annotations

import argparse
import json

import pytest

from quickloris.config import add_dataclass_arguments, dataclass_from_args
from quickloris.data.config import DataConfig, prepare_data
from quickloris.data.jsonl import DataFormatError


def test_cli_round_trip():
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, DataConfig)
    cfg = dataclass_from_args(
        DataConfig,
        parser.parse_args(
            ["--task", "reverse", "--max-seq-len", "64", "--packing", "--overflow", "error", "--data", "x.jsonl"]
        ),
    )
    assert cfg == DataConfig(data="x.jsonl", task="reverse", max_seq_len=64, packing=True, overflow="error")
    assert dataclass_from_args(DataConfig, parser.parse_args([])) == DataConfig()
    with pytest.raises(SystemExit):
        parser.parse_args(["--overflow", "truncate"])


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"task": "nope"}, "unknown task"),
        ({"num_train": 0}, "num_train must be a positive int"),
        ({"num_eval": -1}, "num_eval"),
        ({"max_seq_len": 1}, ">= 2"),
        ({"overflow": "cut"}, "overflow must be"),
    ],
)
def test_validation(kwargs, error):
    with pytest.raises(ValueError, match=error):
        DataConfig(**kwargs)


def test_prepare_embedded_task(smollm2_tokenizer):
    prep = prepare_data(DataConfig(num_train=40, num_eval=7), smollm2_tokenizer, seed=3, max_position_embeddings=8192)
    assert len(prep.examples) == prep.stats.kept == 40 and len(prep.eval_examples) == 7
    assert prep.source == "embedded task 'addition'"
    assert all(4 <= ex.num_trainable <= 5 for ex in prep.examples)  # 3-4 digits + <|im_end|>
    train_q = {smollm2_tokenizer.decode(ex.input_ids) for ex in prep.examples}
    assert not any(f"\n{e.question}<|im_end|>" in t for e in prep.eval_examples for t in train_q)
    with pytest.raises(ValueError, match="longer than the model can take"):
        prepare_data(DataConfig(max_seq_len=512), smollm2_tokenizer, max_position_embeddings=256)


def test_prepare_jsonl_with_template_file(tmp_path, smollm2_tokenizer):
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
        + "\n"
        + json.dumps({"prompt": "a", "completion": "b"})
        + "\n"
    )
    template = tmp_path / "t.jinja"
    template.write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    prep = prepare_data(DataConfig(data=str(data), chat_template=str(template)), smollm2_tokenizer)
    assert prep.source == str(data) and len(prep.examples) == 2
    assert smollm2_tokenizer.decode(prep.examples[0].input_ids) == "[user] hi\n[assistant] yo\n"
    with pytest.raises(FileNotFoundError, match="chat template file"):
        prepare_data(DataConfig(data=str(data), chat_template=str(tmp_path / "none")), smollm2_tokenizer)
    data.write_text(data.read_text() + "{oops\n")
    with pytest.raises(DataFormatError, match=r"d.jsonl:3: invalid JSON"):
        prepare_data(DataConfig(data=str(data)), smollm2_tokenizer)


def test_data_options():
    assert DataConfig(data="a.jsonl").data == ["a.jsonl"] and DataConfig(data=[]).data is None
    from pathlib import Path

    assert DataConfig(data=(Path("a.csv"), "b.json")).data == ["a.csv", "b.json"]
    assert DataConfig(data_columns="prompt=q,completion=a").data_columns == ["prompt=q", "completion=a"]
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, DataConfig)
    args = parser.parse_args(["--data", "a b.jsonl", "c,d.csv", "--data", "e", "--data-columns", "text=body"])
    cfg = dataclass_from_args(DataConfig, args)
    assert cfg.data == ["a b.jsonl", "c,d.csv", "e"] and cfg.data_columns == ["text=body"]
    for kwargs, error in (
        ({"data_columns": ["text"]}, "data_columns takes name=column items"),
        ({"data_format": "chatml"}, "data_format must be one of auto, messages"),
        ({"data_workers": 0}, "data_workers must be a positive int"),
    ):
        with pytest.raises(ValueError, match=error):
            DataConfig(**kwargs)
