"""Readable reports of recorded benchmark results: ``reports/<topic>_<machine>_<yyyymm>.md``.

A report covers every JSON result of one topic (``results/<topic>/``, sub-folders included) measured on one kind
of machine (``h100``, ``2xh200``, ``cpu``) in one month, oldest run first: per run its file, date, commit,
hardware, library versions, the protocol, the headline tables and every recorded value. All of it is read from
the JSON files: nothing is typed by hand, and regenerating gives the same bytes. Numbers are rounded for display
only (`markdown.num`); the JSON files hold them in full.

    python -m benchmarks.report                    # every report, from benchmarks/results/ to benchmarks/reports/
    python -m benchmarks.report FILE.json ...      # only the reports these result files belong to

The benches call `write_for(path)` after recording a run: with the default results folder the report goes to
``benchmarks/reports/``; with ``--out DIR`` to ``DIR/reports/`` (it then covers the results under DIR only).
Topic modules (``benchmarks/report/<topic>.py``) give `protocol(kind, results)` and `headline(kind, results)`;
a topic without one gets the generic layout.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.report.markdown import cell_text, render_value, table

BENCHMARKS = Path(__file__).resolve().parents[1]
RESULTS = BENCHMARKS / "results"
REPORTS = BENCHMARKS / "reports"
_STAMP = re.compile(r"^(.*)-(\d{8}T\d{4,6}Z)$")


class ReportError(ValueError):
    """A result file that cannot be reported (named with the reason)."""


@dataclass
class Run:
    """One result file: its topic, kind (the file name without its time stamp) and normalised environment."""

    path: Path
    topic: str
    name: str  # the path below the topic folder
    kind: str
    date: dt.datetime
    commit: str
    gpus: list[dict[str, Any]]
    host: dict[str, Any]
    versions: dict[str, Any]
    results: dict[str, Any]
    extra_files: list[str] = field(default_factory=list)

    @property
    def machine(self) -> str:
        """`h100`, `2xh200`, `cpu`: the GPU model (from its name), prefixed by the count when more than one."""
        if not self.gpus:
            return "cpu"
        names = sorted({g["name"] for g in self.gpus})
        slug = "+".join(_gpu_slug(n) for n in names)
        return f"{len(self.gpus)}x{slug}" if len(self.gpus) > 1 else slug

    @property
    def month(self) -> str:
        return self.date.strftime("%Y%m")

    @property
    def key(self) -> tuple[str, str, str]:
        return self.topic, self.machine, self.month


def _gpu_slug(name: str) -> str:
    short = re.sub(r"^(NVIDIA|AMD)\s+", "", name)
    m = re.match(r"[A-Za-z]+\d+", short)
    return (m.group(0) if m else re.sub(r"[^a-z0-9]+", "-", short.lower()).strip("-")).lower()


def _date(text: str, where: Path) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(dt.timezone.utc)
    except (TypeError, ValueError) as e:
        raise ReportError(f"{where}: unreadable date {text!r}") from e


def load(path: Path, results_root: Path) -> Run:
    """A result file under `results_root` (its first folder below the root is the topic)."""
    path, results_root = Path(path).resolve(), Path(results_root).resolve()
    try:
        topic = path.relative_to(results_root).parts[0]
    except ValueError:
        raise ReportError(f"{path}: not under the results folder {results_root}") from None
    if path.parent == results_root:
        raise ReportError(f"{path}: result files live in a topic folder, {results_root}/<topic>/")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: not a JSON object")
    env = data.get("environment") or {}
    m = _STAMP.match(path.stem)
    kind = m.group(1) if m else path.stem
    if "date_utc" in env:  # quickloris.utils.provenance.environment()
        date, commit = _date(env["date_utc"], path), env.get("commit", "unknown")
        gpus = env.get("gpus") or []
        host = {
            "cuda": env.get("cuda"),
            "cpu_count": env.get("cpu_count"),
            "python": env.get("python"),
            "host": env.get("host"),
        }
        versions = dict(env.get("versions") or {})
        results = data.get("results", {})
    elif "date" in data:  # scripts/device/fsdp_launchers.sh keeps its own flat environment
        date, commit = _date(data["date"], path), data.get("commit", "unknown")
        gpus = [{"name": n} for n in env.get("gpu_names", [])]
        host = {"cuda": env.get("cuda")}
        versions = {k: v for k, v in env.items() if k not in ("cuda", "gpus", "gpu_names")}
        results = {k: v for k, v in data.items() if k not in ("environment", "commit", "date")}
    else:
        raise ReportError(f"{path}: no recorded environment (date, commit, GPUs): not a benchmark result")
    extra = sorted(p.name for p in path.parent.iterdir() if p.stem == path.stem and p.suffix != ".json")
    name = "/".join(path.relative_to(results_root).parts[1:])
    return Run(path, topic, name, kind, date, commit, gpus, host, versions, results, extra)


def collect(results_root: Path = RESULTS, topics: set[str] | None = None) -> dict[tuple[str, str, str], list[Run]]:
    """Every result file under `results_root/<topic>/`, grouped by (topic, machine, month), oldest first."""
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for topic_dir in sorted(p for p in Path(results_root).iterdir() if p.is_dir()):
        if topics is not None and topic_dir.name not in topics:
            continue
        for path in sorted(topic_dir.rglob("*.json")):
            run = load(path, results_root)
            groups.setdefault(run.key, []).append(run)
    for runs in groups.values():
        runs.sort(key=lambda r: (r.date, r.path.name))
    return groups


def reports_dir_for(results_root: Path) -> Path:
    """benchmarks/reports/ for benchmarks/results/; `<out>/reports/` for any other results folder (`--out`)."""
    root = Path(results_root).resolve()
    return REPORTS if root == RESULTS.resolve() else root / "reports"


def report_name(key: tuple[str, str, str]) -> str:
    return "{}_{}_{}.md".format(*key)


def _topic_module(topic: str):
    try:
        return importlib.import_module(f"benchmarks.report.{topic}")
    except ModuleNotFoundError as e:
        if e.name != f"benchmarks.report.{topic}":
            raise
        return None


def _hardware(run: Run) -> str:
    if run.gpus:
        names = sorted({g["name"] for g in run.gpus})
        g = run.gpus[0]
        detail = ", ".join(
            x
            for x in (
                f"{g['memory_gib']} GiB" if "memory_gib" in g else "",
                f"compute capability {g['capability']}" if "capability" in g else "",
                f"{g['sm_count']} SMs" if "sm_count" in g else "",
            )
            if x
        )
        text = f"{len(run.gpus)} x {' + '.join(names)}" + (f" ({detail})" if detail else "")
    else:
        text = "no GPU (CPU run)"
    if run.host.get("cuda"):
        text += f"; CUDA {run.host['cuda']}"
    if run.host.get("cpu_count"):
        text += f"; {run.host['cpu_count']} CPU threads"
    return text


def _versions(run: Run) -> str:
    items = ([("python", run.host["python"])] if run.host.get("python") else []) + [
        (k, v) for k, v in run.versions.items() if v
    ]
    return ", ".join(f"{k} {v}" for k, v in items) or "not recorded"


def render_run(run: Run, report_dir: Path) -> list[str]:
    mod = _topic_module(run.topic)
    rel = Path(os.path.relpath(run.path, report_dir)).as_posix()
    out = [f"## {run.name}", ""]
    out += [
        f"- File: [`{run.name}`]({rel})"
        + (f" (beside it: {', '.join(f'`{x}`' for x in run.extra_files)})" if run.extra_files else ""),
        f"- Date (UTC): {run.date.strftime('%Y-%m-%d %H:%M:%S')}; commit `{run.commit}`",
        f"- Hardware: {_hardware(run)}",
        f"- Versions: {_versions(run)}",
        "",
    ]
    protocol = mod.protocol(run.kind, run.results) if mod else None
    if protocol:
        out += ["### Protocol", "", protocol.strip(), ""]
    headline = mod.headline(run.kind, run.results) if mod else []
    if headline:
        out += ["### Results", ""] + headline
    out += ["<details><summary>All recorded values</summary>", ""]
    out += render_value("", run.results, 4)
    out += ["</details>", ""]
    return out


def render(key: tuple[str, str, str], runs: list[Run], report_dir: Path) -> str:
    topic, machine, month = key
    first = runs[0]
    names = sorted({g["name"] for g in first.gpus})
    where = f"{len(first.gpus)} x {' + '.join(names)}" if first.gpus else "CPU"
    title = f"# {topic}: {where}, {first.date.strftime('%B %Y')}"
    mod = _topic_module(topic)
    lines = [
        title,
        "",
        f"Generated by `python -m benchmarks.report` from the result files of `{topic}` measured on "
        f"{where} in {first.date.strftime('%B %Y')} (do not edit; regenerate). Values are as recorded, rounded "
        "for display (4 significant digits; from 1,000 up, to the unit); the JSON files hold them in full.",
        "",
    ]
    lines += table(
        ["run", "date (UTC)", "commit", "what"],
        [
            [
                f"`{r.name}`",
                r.date.strftime("%Y-%m-%d %H:%M"),
                f"`{r.commit[:12]}`" + (" (dirty)" if r.commit.endswith("-dirty") else ""),
                cell_text(mod.what(r.kind, r.results)) if mod and hasattr(mod, "what") else r.kind,
            ]
            for r in runs
        ],
    )
    for run in runs:
        lines += render_run(run, report_dir)
    return "\n".join(lines).rstrip() + "\n"


def write(key: tuple[str, str, str], runs: list[Run], report_dir: Path) -> Path:
    from quickloris.utils.atomic import atomic_write_text

    path = Path(report_dir) / report_name(key)
    atomic_write_text(path, render(key, runs, Path(report_dir).resolve()))
    return path


def write_for(result: Path, results_root: Path | None = None, report_dir: Path | None = None) -> Path:
    """Regenerate the report the result file `result` (``<results_root>/<topic>/...json``) belongs to."""
    result = Path(result).resolve()
    root = Path(results_root) if results_root is not None else result.parent.parent
    run = load(result, root)
    groups = collect(root, {run.topic})
    return write(run.key, groups[run.key], report_dir or reports_dir_for(root))


def after_record(result: Path) -> Path | None:
    """What a bench calls once it recorded `result`: regenerate that report and say where both went. A result
    that cannot be reported is named with the reason; the recorded run itself stands either way."""
    print(f"wrote {result}")
    try:
        report = write_for(result)
    except ReportError as e:
        print(f"no report: {e}")
        return None
    print(f"wrote {report}")
    return report


def write_all(
    results_root: Path = RESULTS, report_dir: Path | None = None, only: list[Path] | None = None
) -> list[Path]:
    """Every report of `results_root` (or only those the files in `only` belong to)."""
    keys = None if only is None else {load(p, results_root).key for p in only}
    groups = collect(results_root, None if keys is None else {k[0] for k in keys})
    out_dir = report_dir or reports_dir_for(results_root)
    return [write(k, runs, out_dir) for k, runs in sorted(groups.items()) if keys is None or k in keys]
