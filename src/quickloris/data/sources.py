"""Data files, read row by row: JSON lines, JSON arrays, gzip, CSV, Parquet, Arrow, `datasets` ``save_to_disk`` folders.

`open_source(path)` finds what a path holds and `Source.rows()` yields ``(row, where)`` pairs lazily, ``where``
naming the row for error messages:

==========================================  ==========================  =====================================
what                                        read by                     ``where``
==========================================  ==========================  =====================================
``.jsonl`` / ``.json`` / ``.ndjson``        the standard ``json``       ``file:line`` (1-based)
(one object per line, or one JSON array),   module, line by line (an
also gzip-compressed (``.gz``)              array: whole, in memory)
``.csv`` (header line, UTF-8)               ``datasets`` (pandas),      ``file:line`` of the record's first
                                            every cell a string         line (``csv`` module, in step)
``.parquet``                                pyarrow, a row group at a   ``file:row N`` (0-based, as
                                            time                        ``dataset[N]``)
a ``save_to_disk`` folder, an ``.arrow``    ``datasets`` (memory-
file                                        mapped)                     ``file:row N``
==========================================  ==========================  =====================================

JSON is decoded here rather than by ``datasets``' JSON builder, which unifies one Arrow schema over the file: it
adds every key missing from a row as ``null`` and loses line numbers; records are kept as written. Parquet is read
with pyarrow (the engine ``datasets`` uses) one row group at a time: ``datasets``' streaming Parquet reader, and
pyarrow's ``iter_batches``, were measured holding the whole file (8 MB of Python and 8 MB of Arrow memory for an
8 MB file, 2 MB for a 2 MB one: tests/data/test_sources.py). What a file
holds is sniffed from its first bytes (Parquet's ``PAR1``, gzip's magic, a JSON ``[`` or ``{``) before its
suffix is trusted, so a JSON array in a ``.jsonl`` file or a Parquet file named ``.bin`` is read as what it is.

Memory: JSON lines, CSV (10 000-row chunks), Parquet (a row group) and Arrow rows are read a part at a time, memory
independent of the file's size; a JSON array is parsed whole. ``datasets`` / pyarrow are imported only to read CSV,
Parquet and Arrow.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quickloris.data.errors import DataFormatError

SUPPORTED = ".jsonl, .json, .jsonl.gz, .json.gz, .csv, .parquet, .arrow, or a datasets save_to_disk folder"
_WS = re.compile(r"[ \t\n\r]*")
_PARQUET_BATCH = 1000


@dataclass
class Source:
    """One data file or folder: `kind` is ``json``, ``csv``, ``parquet``, ``arrow`` or ``folder``; `label` says
    what was found once read (``JSON lines``, ``JSON array``, ...)."""

    path: Path
    kind: str
    gzipped: bool = False
    label: str = ""

    def rows(self) -> Iterator[tuple[Any, str]]:
        """``(row, where)`` for every row, lazily (JSON rows may be any JSON value: the caller checks them)."""
        read = {"json": _json_rows, "csv": _csv_rows, "parquet": _parquet_rows}.get(self.kind, _arrow_rows)
        return read(self)

    def count_hint(self) -> int | None:
        """The number of rows when the file says it without being read (Parquet footer, Arrow), else None."""
        try:
            if self.kind == "parquet":
                import pyarrow.parquet as pq

                return pq.ParquetFile(self.path).metadata.num_rows
            if self.kind in ("arrow", "folder"):
                return len(_arrow_dataset(self)[0])
        except Exception:  # a hint only: a broken file fails with its message when read
            return None
        return None


def open_source(path: str | os.PathLike) -> Source:
    """What `path` holds (module docstring); a missing path or an unknown file type raises one line."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return Source(p, "folder", label="datasets folder")
        raise DataFormatError(
            f"{p}: a folder that is not a datasets save_to_disk folder (no state.json or dataset_dict.json); "
            f"--data takes {SUPPORTED}"
        )
    if not p.is_file():
        raise DataFormatError(f"data file {str(path)!r} is not a regular file")
    with p.open("rb") as f:
        head = f.read(4)
    if head == b"PAR1":
        return Source(p, "parquet", label="Parquet")
    gzipped = head[:2] == b"\x1f\x8b"
    suffixes = [s.lower() for s in p.suffixes]
    if gzipped and suffixes[-1:] == [".gz"]:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in (".jsonl", ".json", ".ndjson"):
        return Source(p, "json", gzipped)
    if last == ".csv" and not gzipped:
        return Source(p, "csv", label="CSV")
    if last == ".arrow" and not gzipped:
        return Source(p, "arrow", label="Arrow file")
    if last == ".parquet":
        raise DataFormatError(f"{p}: not a Parquet file (it does not start with 'PAR1')")
    first = _first_char(p, gzipped)
    if first in ("{", "["):  # an unknown suffix holding JSON: read as JSON, as it was always read
        return Source(p, "json", gzipped)
    suffix = "".join(p.suffixes) or "none"
    raise DataFormatError(f"{p}: unknown data file type (suffix {suffix}); --data takes {SUPPORTED}")


def _first_char(p: Path, gzipped: bool) -> str:
    try:
        with gzip.open(p, "rb") if gzipped else p.open("rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    except (OSError, EOFError):
        return ""
    return head[:1].decode("latin-1")


# ------------------------------------------------------------------------------------------------------------ JSON


def _open_binary(source: Source) -> Any:
    return gzip.open(source.path, "rb") if source.gzipped else source.path.open("rb")


def _json_rows(source: Source) -> Iterator[tuple[Any, str]]:
    p = source.path
    try:
        with _open_binary(source) as f:
            head: list[bytes] = []
            for raw in f:  # blank lines before the first value, kept for the array's line numbers
                head.append(raw)
                if raw.strip(b"\xef\xbb\xbf \t\r\n"):
                    break
            if head and head[-1].lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
                source.label = "JSON array"
                yield from _json_array(p, b"".join(head) + f.read())
                return
            source.label = "JSON lines"
            lines = iter(head)
            for lineno, raw in enumerate(_chain(lines, f), start=1):
                obj = _json_line(p, lineno, raw)
                if obj is not _BLANK:
                    yield obj, f"{p}:{lineno}"
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataFormatError(f"{p}: cannot read it as gzip-compressed JSON ({e})") from None


def _chain(first: Iterator[bytes], rest: Any) -> Iterator[bytes]:
    yield from first
    yield from rest


_BLANK = object()


def _json_line(p: Path, lineno: int, raw: bytes) -> Any:
    where = f"{p}:{lineno}"
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # tolerate a BOM
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not line.strip():
        return _BLANK
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        hint = ""
        if e.pos >= len(line.rstrip()):  # the line ends inside a value: an object spread over several lines?
            hint = "; a JSON lines file holds one complete object per line"
        raise DataFormatError(f"{where}: invalid JSON: {e.msg} (column {e.colno}){hint}") from None


def _json_array(p: Path, data: bytes) -> Iterator[tuple[Any, str]]:
    """The elements of a JSON array, each with the line it starts on (the text is decoded whole)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        at = data.count(b"\n", 0, e.start) + 1
        raise DataFormatError(f"{p}:{at}: not valid UTF-8 ({e.reason})") from None
    decoder = json.JSONDecoder()
    i = _WS.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    if i < len(text) and text[i] == "]":
        i += 1
    else:
        while True:
            line += text.count("\n", counted, i)
            counted = i
            try:
                obj, i = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{p}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            yield obj, f"{p}:{line}"
            i = _WS.match(text, i).end()
            if i < len(text) and text[i] == ",":
                i = _WS.match(text, i + 1).end()
                continue
            if i < len(text) and text[i] == "]":
                i += 1
                break
            at = text.count("\n", 0, i) + 1
            raise DataFormatError(f"{p}:{at}: invalid JSON: expected ',' or ']' after an array element")
    if text[i:].strip():
        at = text.count("\n", 0, i + len(text[i:]) - len(text[i:].lstrip())) + 1
        raise DataFormatError(f"{p}:{at}: invalid JSON: text after the end of the array")


# ------------------------------------------------------------------------------------------- through `datasets`


def _datasets(source: Source, what: str) -> Any:
    try:
        import datasets
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"{source.path}: reading {what} needs the `datasets` library: pip install datasets"
        ) from None
    return datasets


def _read_error(source: Source, what: str, e: Exception) -> DataFormatError:
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return DataFormatError(f"{source.path}: cannot read it as {what} ({type(e).__name__}: {detail[:200]})")


def _numbered(source: Source, rows: Any, where: Callable[[int], str], what: str) -> Iterator[tuple[Any, str]]:
    """`rows` (a `datasets` iterable) with their names; errors of the reader become one line."""
    it = iter(rows)
    try:
        i = 0
        while True:
            try:
                row = next(it)
            except StopIteration:
                return
            except (UnicodeDecodeError, ValueError, OSError, TypeError, KeyError) as e:
                raise _read_error(source, what, e) from None
            yield row, where(i)
            i += 1
    finally:
        close = getattr(it, "close", None)
        if close is not None:  # a generator left open would be finalised at interpreter exit, noisily
            close()


def _parquet_rows(source: Source) -> Iterator[tuple[Any, str]]:
    """Parquet rows, one row group decoded at a time and turned into Python 1000 rows at a time."""
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"{source.path}: reading Parquet needs pyarrow (a dependency of datasets): pip install datasets"
        ) from None
    try:
        pf = pq.ParquetFile(source.path)
    except Exception as e:
        raise _read_error(source, "Parquet", e) from None

    def batches() -> Iterator[Any]:
        for g in range(pf.metadata.num_row_groups):
            for batch in pf.read_row_group(g).to_batches(max_chunksize=_PARQUET_BATCH):
                yield from batch.to_pylist()

    with pf:
        yield from _numbered(source, batches(), lambda i: f"{source.path}:row {i}", "Parquet")


def _arrow_dataset(source: Source) -> tuple[Any, str]:
    """The `datasets.Dataset` of an Arrow file or save_to_disk folder (a DatasetDict's ``train`` split, or its only
    one), and the path its rows are named by."""
    datasets = _datasets(source, "a datasets folder" if source.kind == "folder" else "an Arrow file")
    try:
        if source.kind == "arrow":
            return datasets.Dataset.from_file(str(source.path)), str(source.path)
        ds = datasets.load_from_disk(str(source.path))
    except Exception as e:
        raise _read_error(source, "a datasets folder" if source.kind == "folder" else "an Arrow file", e) from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        split = "train" if "train" in ds else splits[0] if len(splits) == 1 else None
        if split is None:
            raise DataFormatError(
                f"{source.path}: a DatasetDict with splits {', '.join(splits)} and none named 'train'; "
                f"pass the split's folder, e.g. {source.path / splits[0]}"
            )
        source.label = f"datasets folder, split {split!r}"
        return ds[split], str(source.path / split)
    return ds, str(source.path)


def _arrow_rows(source: Source) -> Iterator[tuple[Any, str]]:
    ds, name = _arrow_dataset(source)
    yield from _numbered(source, ds, lambda i: f"{name}:row {i}", "Arrow")


def _csv_rows(source: Source) -> Iterator[tuple[Any, str]]:
    """CSV rows from `datasets` (every cell a string, empty cells ""), named by the line each starts on."""
    datasets = _datasets(source, "CSV")
    p = source.path
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), None)
    except UnicodeDecodeError:
        raise _utf8_error(p) from None
    if not header:
        raise DataFormatError(f"{p}: empty CSV file (no header line)")
    features = datasets.Features({name: datasets.Value("string") for name in header})
    try:
        ds = datasets.load_dataset(
            "csv", data_files=str(p), split="train", streaming=True, features=features, keep_default_na=False
        )
    except Exception as e:
        raise _read_error(source, "CSV", e) from None
    lines = _csv_lines(p, header)
    rows = _numbered(source, ds, lambda i: "", "CSV")
    try:
        for i, (row, _) in enumerate(rows):
            line = next(lines, None)
            if line is not None and line[1] != [row.get(h) for h in header]:
                line, lines = None, iter(())  # the two parsers disagree: name rows by index from here on
            yield row, f"{p}:{line[0]}" if line is not None else f"{p}:row {i}"
    except DataFormatError as e:
        if "UnicodeDecodeError" in str(e):
            raise _utf8_error(p) from None
        raise


def _csv_lines(p: Path, header: list[str]) -> Iterator[tuple[int, list[str]]]:
    """(first line, cells) of every CSV record after the header, blank lines skipped as pandas skips them; stops
    quietly on what it cannot parse (the rows are then named by index)."""
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            next(reader, None)
            start = reader.line_num + 1
            for cells in reader:
                if cells:
                    yield start, cells
                start = reader.line_num + 1
    except (csv.Error, UnicodeDecodeError):
        return


def _utf8_error(p: Path) -> DataFormatError:
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return DataFormatError(f"{p}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})")
    return DataFormatError(f"{p}: not valid UTF-8")
