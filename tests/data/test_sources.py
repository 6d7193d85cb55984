"""Data files of every type are read row by row, each row named by its line (JSON, CSV) or row (Parquet, Arrow);
what a file holds is sniffed before its suffix is trusted; a bad file or row is one line naming where."""

from __future__ import annotations

import gzip
import json
import random
import string

import pytest

from quickloris.data.errors import DataFormatError
from quickloris.data.sources import open_source
from tests.helpers import require

ROWS = [{"instruction": "Add 1 and 2", "input": "", "output": "3"}, {"instruction": "say\nhi", "output": "hi"}]


def _rows(path):
    return list(open_source(path).rows())


def test_json_lines_and_array_name_the_line_each_record_starts_on(tmp_path):
    lines = tmp_path / "a.jsonl"
    lines.write_text("\ufeff" + json.dumps(ROWS[0]) + "\n\n  \n" + json.dumps(ROWS[1]) + "\r\n", encoding="utf-8")
    assert _rows(lines) == [(ROWS[0], f"{lines}:1"), (ROWS[1], f"{lines}:4")]
    array = tmp_path / "a.json"
    array.write_text("\n[\n  " + json.dumps(ROWS[0]) + ",\n\n  " + json.dumps(ROWS[1], indent=2) + "\n]\n")
    assert _rows(array) == [(ROWS[0], f"{array}:3"), (ROWS[1], f"{array}:5")]
    source = open_source(array)
    list(source.rows())
    assert source.label == "JSON array"
    # a JSON array in a .jsonl file (the issue: "invalid JSON" for valid JSON) and JSON lines in a .json file
    swapped = tmp_path / "b.jsonl"
    swapped.write_text(json.dumps(ROWS))
    assert [r for r, _ in _rows(swapped)] == ROWS
    swapped = tmp_path / "b.json"
    swapped.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert [w for _, w in _rows(swapped)] == [f"{swapped}:1", f"{swapped}:2"]
    empty = tmp_path / "e.json"
    empty.write_text(" [ ] ")
    assert _rows(empty) == []


def test_gzip_and_sniffed_types(tmp_path):
    gz = tmp_path / "a.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS))
    assert _rows(gz) == [(ROWS[0], f"{gz}:1"), (ROWS[1], f"{gz}:2")]
    arr = tmp_path / "a.json.gz"
    arr.write_bytes(gzip.compress(json.dumps(ROWS).encode()))
    assert [r for r, _ in _rows(arr)] == ROWS
    odd = tmp_path / "rows.txt"  # an unknown suffix holding JSON lines: read as before
    odd.write_text(json.dumps(ROWS[0]) + "\n")
    assert _rows(odd) == [(ROWS[0], f"{odd}:1")]
    with pytest.raises(DataFormatError, match=r"rows\.bin: unknown data file type \(suffix \.bin\); --data takes"):
        (tmp_path / "rows.bin").write_bytes(b"\x00\x01")
        open_source(tmp_path / "rows.bin")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_source(tmp_path / "none.jsonl")


@pytest.mark.parametrize(
    "text, line, message",
    [
        ('{"a": 1}\n{"a": }\n', 2, r"invalid JSON: Expecting value \(column 7\)$"),
        ('{"a": 1}\n{\n  "a": 1\n}\n', 2, "invalid JSON: .*one complete object per line"),
        ('[\n {"a": 1},\n {"a": 2}\n {"a": 3}\n]', 4, "invalid JSON: expected ',' or ']' after an array element"),
        ('[\n {"a": 1},\n {"a": tru}\n]', 3, r"invalid JSON: Expecting value \(column 8\)"),
        ('[\n {"a": 1}\n]\n{"b": 2}\n', 4, "invalid JSON: text after the end of the array"),
    ],
)
def test_bad_json_names_the_line(tmp_path, text, line, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataFormatError, match=f"bad.json:{line}: {message}"):
        _rows(path)


def test_bad_bytes_name_the_line(tmp_path):
    for name, data, line in (
        ("a.jsonl", b'{"a": 1}\n{"a": "\xff"}\n', 2),
        ("a.json", b'[\n{"a": 1},\n{"a": "\xff"}]', 3),
        ("a.csv", b"text,label\nok,1\nbad \xff,2\n", 3),
    ):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataFormatError, match=rf"{name}:{line}: not valid UTF-8"):
            _rows(tmp_path / name)
    bad_gz = tmp_path / "b.jsonl.gz"
    bad_gz.write_bytes(gzip.compress(b'{"a": 1}\n')[:-6])
    with pytest.raises(DataFormatError, match="b.jsonl.gz: cannot read it as gzip-compressed JSON"):
        _rows(bad_gz)


def test_csv_cells_are_strings_and_rows_are_named_by_their_first_line(tmp_path):
    require("datasets")
    path = tmp_path / "a.csv"
    # a quoted cell over two lines, a blank line, an empty cell, numbers and NA-like words kept as written
    path.write_text('instruction,input,output\n"two\nlines",,42\n\nNA,x,007\n"a ""q""",null,1.50\n')
    assert _rows(path) == [
        ({"instruction": "two\nlines", "input": "", "output": "42"}, f"{path}:2"),
        ({"instruction": "NA", "input": "x", "output": "007"}, f"{path}:5"),
        ({"instruction": 'a "q"', "input": "null", "output": "1.50"}, f"{path}:6"),
    ]
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(DataFormatError, match="e.csv: empty CSV file"):
        _rows(empty)


def test_parquet_arrow_and_save_to_disk_name_rows(tmp_path):
    datasets = require("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"row {i}", "n": i} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet", row_group_size=2)
    assert _rows(tmp_path / "a.parquet") == [(r, f"{tmp_path / 'a.parquet'}:row {i}") for i, r in enumerate(rows)]
    assert open_source(tmp_path / "a.parquet").count_hint() == 5
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "parquet.bin")  # sniffed by its magic bytes
    assert [r for r, _ in _rows(tmp_path / "parquet.bin")] == rows

    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "folder"))
    assert _rows(tmp_path / "folder") == [(r, f"{tmp_path / 'folder'}:row {i}") for i, r in enumerate(rows)]
    datasets.DatasetDict({"test": ds.select([0]), "train": ds}).save_to_disk(str(tmp_path / "dict"))
    source = open_source(tmp_path / "dict")
    assert [w for _, w in source.rows()][-1] == f"{tmp_path / 'dict' / 'train'}:row 4"
    assert source.label == "datasets folder, split 'train'" and source.count_hint() == 5
    datasets.DatasetDict({"a": ds, "b": ds}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataFormatError, match="splits a, b and none named 'train'; pass the split's folder"):
        _rows(tmp_path / "two")
    arrow = next((tmp_path / "folder").glob("*.arrow"))
    assert [r for r, _ in _rows(arrow)] == rows
    with pytest.raises(DataFormatError, match="not a datasets save_to_disk folder"):
        open_source(tmp_path / "folder" / ".." / "dict" / "..")


def test_a_broken_parquet_file_is_one_line_not_a_utf8_error(tmp_path):
    require("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "x" * 100}] * 50), good)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataFormatError, match=r"cut.parquet: cannot read it as Parquet \(") as info:
        _rows(cut)
    assert "UTF-8" not in str(info.value) and "\n" not in str(info.value)
    fake = tmp_path / "fake.parquet"
    fake.write_text('{"text": "json in disguise"}\n')
    with pytest.raises(DataFormatError, match="fake.parquet: not a Parquet file"):
        open_source(fake)


def _write(kind, path, n, rng):
    """`n` records of ~1 KB random text, as JSON lines or Parquet (row groups of 500)."""
    rows = ({"text": "".join(rng.choices(string.ascii_letters, k=1000)), "label": i % 3} for i in range(n))
    if kind == "jsonl":
        with path.open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        with pq.ParquetWriter(path, pa.schema([("text", pa.string()), ("label", pa.int64())])) as w:
            batch = []
            for r in rows:
                batch.append(r)
                if len(batch) == 500:
                    w.write_table(pa.Table.from_pylist(batch, schema=w.schema))
                    batch = []
            if batch:
                w.write_table(pa.Table.from_pylist(batch, schema=w.schema))


def _peak_while_reading(path):
    """Peak Python heap (tracemalloc) and peak Arrow memory pool (sampled per row) while reading every row."""
    import tracemalloc

    import pyarrow as pa

    source = open_source(path)
    arrow_peak, n = 0, 0
    tracemalloc.start()
    try:
        for _row in source.rows():
            n += 1
            if n % 50 == 0:
                arrow_peak = max(arrow_peak, pa.total_allocated_bytes())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return n, peak, arrow_peak


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_reading_streams_memory_does_not_grow_with_the_file(tmp_path, kind, seed):
    """The same rows, 2 000 and 8 000 of them (2 MB and 8 MB of text): reading them all takes about the same peak
    memory. A reader holding every row would need 4x at the larger size (~6 MB more of Python strings), so the
    bound (the smaller run's peak + 1.5 MB, e.g. a Parquet batch of 1 000 rows) fails it."""
    require("datasets")
    rng = random.Random(seed)
    small, large = tmp_path / f"s.{kind}", tmp_path / f"l.{kind}"
    _write(kind, small, 2000, rng)
    _write(kind, large, 8000, rng)
    _peak_while_reading(small)  # imports and one-time caches out of the measurement
    n_small, py_small, arrow_small = _peak_while_reading(small)
    n_large, py_large, arrow_large = _peak_while_reading(large)
    assert (n_small, n_large) == (2000, 8000)
    assert py_large < py_small + 1_500_000, (py_small, py_large)
    assert arrow_large < arrow_small + 1_500_000, (arrow_small, arrow_large)
