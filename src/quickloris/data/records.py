"""Several data files read as one lazy stream of records, and what was found in each (a run's data header line).

`DataFiles(paths, data_format=..., columns=...)` checks that every path exists and is a data file before anything
is read, then yields the records of the files in order (`quickloris.data.jsonl.iter_jsonl`: each row's shape
detected, or forced). Rows of the ``text`` shape whose text is empty or only whitespace are dropped and counted:
they hold nothing to learn. A file without any record is an error. `describe()` says, per file, its type and
how many rows of each shape it held.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from quickloris.data.errors import DataFormatError
from quickloris.data.jsonl import Record, iter_jsonl
from quickloris.data.sources import Source, open_source


@dataclass
class FileReport:
    """What one file held: its type (once read), rows per shape, and rows dropped as empty."""

    path: str
    label: str = ""
    shapes: Counter = field(default_factory=Counter)
    dropped_empty: int = 0

    @property
    def rows(self) -> int:
        return sum(self.shapes.values())

    def describe(self) -> str:
        found = ", ".join(f"{shape} {n}" for shape, n in self.shapes.most_common())
        return f"{self.path} ({self.label}: {found or 'no rows'})"


class DataFiles:
    """The records of `paths`, in order, read lazily (module docstring); iterate once."""

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        data_format: str = "auto",
        columns: Mapping[str, str] | None = None,
    ) -> None:
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise DataFormatError("no data files given")
        self.sources: list[Source] = [open_source(p) for p in paths]  # a missing file fails before reading
        self.reports = [FileReport(str(p)) for p in paths]
        self.data_format, self.columns = data_format, dict(columns or {})

    def __iter__(self) -> Iterator[Record]:
        for source, report in zip(self.sources, self.reports):

            def seen(src: Source, shape: str, report: FileReport = report) -> None:
                report.label = src.label
                report.shapes[shape] += 1

            for record in iter_jsonl(source, data_format=self.data_format, columns=self.columns, seen=seen):
                if record.text is not None and not record.text.strip():
                    report.dropped_empty += 1
                    continue
                yield record
            if report.rows == 0:
                raise DataFormatError(f"data file {report.path!r} contains no records (empty or blank lines only)")

    def count_hint(self) -> int | None:
        """Rows in all files when every file says it without being read (Parquet, Arrow), else None."""
        counts = [s.count_hint() for s in self.sources]
        return None if any(c is None for c in counts) else sum(counts)

    @property
    def dropped_empty(self) -> int:
        return sum(r.dropped_empty for r in self.reports)

    def describe(self) -> str:
        """``a.jsonl (JSON lines: messages 1200), b.parquet (Parquet: alpaca 500)``."""
        return ", ".join(r.describe() for r in self.reports)

    def name(self) -> str:
        """A short name: the file, or the first file and how many others."""
        first = self.reports[0].path
        return first if len(self.reports) == 1 else f"{first} + {len(self.reports) - 1} more"
