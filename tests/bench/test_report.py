"""benchmarks.report: the committed reports are exactly what the recorded results give, every result file the README
cites has one, no recorded number is left out, and runs are grouped by topic, machine and month."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from benchmarks.report import REPORTS, RESULTS, ReportError, collect, load, render, report_name, write_all, write_for
from benchmarks.report.__main__ import main as report_main
from benchmarks.report.markdown import num

ROOT = Path(__file__).resolve().parents[2]


def _numbers(value, out):
    """num() of every recorded number, except inside numeric lists long enough to be summarised."""
    if isinstance(value, dict):
        for v in value.values():
            _numbers(v, out)
    elif isinstance(value, list):
        if len(value) > 8 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
            out.update(num(x) for x in (value[0], value[-1], min(value), max(value)))
        else:
            for v in value:
                _numbers(v, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out.add(num(value))
    return out


def test_committed_reports_are_what_the_results_give():
    groups = collect(RESULTS)
    assert {report_name(k) for k in groups} == {p.name for p in REPORTS.glob("*.md")}
    for key, runs in groups.items():
        committed = (REPORTS / report_name(key)).read_text(encoding="utf-8")
        assert committed == render(key, runs, REPORTS.resolve()), (
            f"{report_name(key)} is stale: python -m benchmarks.report"
        )
        for run in runs:
            assert f"## {run.name}\n" in committed
            missing = {n for n in _numbers(run.results, set()) if n not in committed}
            assert not missing, (run.name, sorted(missing)[:10])


def test_every_result_file_the_readme_cites_has_a_report():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    cited = set(re.findall(r"[\w.-]+-\d{8}T\d{4,6}Z\.json|example-2gpu[\w-]*\.json", readme))
    assert len(cited) >= 10
    reports = "".join(p.read_text(encoding="utf-8") for p in REPORTS.glob("*.md"))
    for name in sorted(cited):
        assert list(RESULTS.rglob(name)), f"README cites {name}, which is not under benchmarks/results/"
        assert f"## {name}\n" in reports, f"no report covers {name}"


_ENV = {
    "date_utc": "2027-01-05T10:10:10+00:00",
    "commit": "abc123",
    "python": "3.12.3",
    "host": "h",
    "cpu_count": 16,
    "versions": {"torch": "2.11.0", "triton": "3.6.0"},
    "cuda": "13.0",
    "gpus": [{"name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "memory_gib": 79.2, "sm_count": 132}] * 2,
}
_STACK = {
    "losses": [12.5, 12.25, 12.0],
    "step_s": [9.0, 0.5, 0.5],
    "tokens_per_step": 8192,
    "tokens_per_s": 12345.678,
    "first_step_s": 9.0,
    "peak_gib": 7.4766,
    "build_s": 0.3,
    "compile": {"unique_graphs": 3, "graph_breaks": 0, "calls_captured": 32},
}


def _record(root: Path, stamp: str, date: str, tokens_per_s: float) -> Path:
    env = dict(_ENV, date_utc=date)
    res = {
        "parts": ["1b"],
        "steps": 3,
        "lr": 1e-4,
        "attention": "sdpa",
        "tiny": False,
        "1b": {"4x2048": {"ql_compiled": dict(copy.deepcopy(_STACK), tokens_per_s=tokens_per_s)}},
    }
    path = root / "train" / f"train-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, "results": res}))
    return path


def test_runs_group_by_topic_machine_and_month(tmp_path):
    a = _record(tmp_path, "20270105T101010Z", "2027-01-05T10:10:10+00:00", 12345.678)
    _record(tmp_path, "20270120T090000Z", "2027-01-20T09:00:00+00:00", 23456.7)
    _record(tmp_path, "20270201T000000Z", "2027-02-01T00:00:00+00:00", 34567.0)
    report = write_for(a)
    assert report == tmp_path / "reports" / "train_2xh100_202701.md"  # --out DIR: DIR/reports/
    text = report.read_text()
    assert text.startswith("# train: 2 x NVIDIA H100 80GB HBM3, January 2027\n")
    assert "12,346" in text and "23,457" in text and "34,567" not in text  # February has its own report
    assert text.index("## train-20270105T101010Z.json") < text.index("## train-20270120T090000Z.json")
    assert "| ql_compiled | 12,346 |" in text and "7.477" in text and "3 graphs, 0 breaks" in text
    assert "[`train-20270105T101010Z.json`](../train/train-20270105T101010Z.json)" in text
    assert "Versions: python 3.12.3, torch 2.11.0, triton 3.6.0" in text and "CUDA 13.0" in text
    assert write_for(a).read_text() == text  # regenerating gives the same bytes
    assert sorted(p.name for p in write_all(tmp_path)) == ["train_2xh100_202701.md", "train_2xh100_202702.md"]


@pytest.mark.parametrize(
    "gpus, machine",
    [
        (["NVIDIA H100 80GB HBM3"], "h100"),
        (["NVIDIA H200"] * 2, "2xh200"),
        (["NVIDIA GeForce RTX 4090"], "geforce-rtx-4090"),
        ([], "cpu"),
    ],
)
def test_machine_names(tmp_path, gpus, machine):
    path = tmp_path / "t" / "x.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"environment": dict(_ENV, gpus=[{"name": n} for n in gpus]), "results": {}}))
    assert load(path, tmp_path).machine == machine


def test_unreportable_files_are_named(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    bad = tmp_path / "train" / "notes.json"
    bad.write_text(json.dumps({"results": {}}))
    with pytest.raises(ReportError, match="notes.json: no recorded environment"):
        load(bad, tmp_path)
    outside = tmp_path / "loose.json"
    outside.write_text("{}")
    assert report_main(["--results", str(tmp_path), str(outside)]) == 2
    assert "result files live in a topic folder" in capsys.readouterr().out
    assert report_main(["--results", str(tmp_path / "nope")]) == 2
    assert "--results" in capsys.readouterr().out


def test_cli_writes_only_the_reports_of_the_given_files(tmp_path, capsys):
    a = _record(tmp_path, "20270105T101010Z", "2027-01-05T10:10:10+00:00", 1000.0)
    _record(tmp_path, "20270201T000000Z", "2027-02-01T00:00:00+00:00", 2000.0)
    assert report_main(["--results", str(tmp_path), str(a)]) == 0
    assert [p.name for p in (tmp_path / "reports").iterdir()] == ["train_2xh100_202701.md"]
    assert "wrote" in capsys.readouterr().out


def test_train_run_titles_name_the_options_that_change_what_ran():
    """A run's title names a compile mode other than the default and MLP chunks other than 1."""
    from benchmarks.report.train import what

    plain = what("train", {"parts": ["1b"], "compile_mode": None, "mlp_chunks": 1})
    assert plain == "bench train: 1b"
    title = what("train", {"parts": ["1b"], "compile_mode": "reduce-overhead", "mlp_chunks": 8})
    assert "compile mode reduce-overhead" in title and "mlp chunks 8" in title
