"""Several data files as one stream: order, the report per file (type, rows per shape), empty text rows dropped and
counted, a file without records refused, and the row count when the files state it."""

from __future__ import annotations

import json

import pytest

from quickloris.data.errors import DataFormatError
from quickloris.data.records import DataFiles
from tests.helpers import require


def test_files_in_order_with_their_report(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text(
        "\n".join(
            json.dumps(r)
            for r in (
                {"text": "one"},
                {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]},
                {"text": " \n "},
                {"text": "two"},
            )
        )
    )
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"instruction": "i", "output": "o"}]))
    files = DataFiles([a, str(b)])
    records = list(files)
    assert [r.kind for r in records] == ["text", "messages", "text", "messages"]
    assert [r.source for r in records] == [f"{a}:1", f"{a}:2", f"{a}:4", f"{b}:1"]
    assert files.dropped_empty == 1 and files.count_hint() is None
    assert files.describe() == f"{a} (JSON lines: text 3, messages 1), {b} (JSON array: alpaca 1)"
    assert files.name() == f"{a} + 1 more" and DataFiles(a).name() == str(a)
    forced = DataFiles(a, data_format="text")
    with pytest.raises(DataFormatError, match=f"{a}:2: missing 'text' for a text record"):
        list(forced)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DataFiles([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
    (tmp_path / "e.jsonl").write_text("\n\n")
    (tmp_path / "t.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(DataFormatError, match="e.jsonl' contains no records"):
        list(DataFiles([tmp_path / "t.jsonl", tmp_path / "e.jsonl"]))
    with pytest.raises(DataFormatError, match="no data files given"):
        DataFiles([])


def test_count_hint_from_parquet_footers(tmp_path):
    require("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, n in (("a.parquet", 3), ("b.parquet", 4)):
        pq.write_table(pa.Table.from_pylist([{"text": f"t{i}"} for i in range(n)]), tmp_path / name)
    files = DataFiles([tmp_path / "a.parquet", tmp_path / "b.parquet"])
    assert files.count_hint() == 7 and len(list(files)) == 7
