"""python -m benchmarks.report [--results DIR] [--reports DIR] [FILE.json ...]: regenerate reports from results."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.report import RESULTS, ReportError, reports_dir_for, write_all


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    p.add_argument("files", nargs="*", type=Path, help="result files (default: every one under --results)")
    p.add_argument("--results", type=Path, default=RESULTS, help="results folder (default: benchmarks/results/)")
    p.add_argument(
        "--reports",
        type=Path,
        default=None,
        help="reports folder (default: benchmarks/reports/ for benchmarks/results/, else <results>/reports/)",
    )
    args = p.parse_args(argv)
    if not args.results.is_dir():
        print(f"--results: {args.results} is not a folder")
        return 2
    try:
        paths = write_all(args.results, args.reports or reports_dir_for(args.results), args.files or None)
    except ReportError as e:
        print(f"python -m benchmarks.report: {e}")
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
