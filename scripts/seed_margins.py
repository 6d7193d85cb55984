"""Run randomized tests over many seeds and report, per test, how many seeds failed and how much of each tolerance
the closest seed used: the margin of a threshold, measured instead of guessed (issue 20 item 7).

    .venv/bin/python scripts/seed_margins.py --seeds 0-49 tests/export/test_llama_cpp.py -k f32_export
    .venv/bin/python scripts/seed_margins.py --seeds 0-49 --out margins.json tests/ops tests/models

Every test that takes the `seed` fixture runs once per seed (tests/conftest.py: QUICKLORIS_TEST_SEEDS); every
`torch.testing.assert_close` with a float tolerance, every `pytest.approx` comparison (from 2026-12-06 21:20 UTC)
and every `tests.helpers.within` bound records the fraction of its tolerance it used (max |a - e| / (atol + rtol
|e|), |a - e| / approx's tolerance, or value / bound; <= 1 passes). The report lists per
test: seeds run, seeds failed, and per check (file:line) the largest fraction used over the seeds, with its seed;
margin = 1 / that fraction. Exact checks (tolerance 0) and `==` asserts record nothing: they either hold or fail.
Extra arguments go to pytest (e.g. ``-m "not slow"``, ``-x``). Not part of CI: a run over 50 seeds of a slow test
takes 50x its time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(seeds: str, pytest_args: list[str], python: str) -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        log, junit = Path(tmp) / "margins.jsonl", Path(tmp) / "junit.xml"
        env = dict(os.environ, QUICKLORIS_TEST_SEEDS=seeds, QUICKLORIS_MARGIN_LOG=str(log))
        cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *pytest_args]
        print("$", " ".join(cmd), f"(QUICKLORIS_TEST_SEEDS={seeds})", file=sys.stderr, flush=True)
        subprocess.run(cmd, cwd=ROOT, env=env)
        outcomes = {}
        if junit.exists():
            for case in ET.parse(junit).getroot().iter("testcase"):
                name = f"{case.get('classname')}::{case.get('name')}"
                bad = case.find("failure") is not None or case.find("error") is not None
                outcomes[name] = "skipped" if case.find("skipped") is not None else "failed" if bad else "passed"
        used = defaultdict(list)
        if log.exists():
            for line in log.read_text().splitlines():
                rec = json.loads(line)
                used[rec["test"]].append((rec["where"], rec["used"]))
        return outcomes, used


_SEED = re.compile(r"seed(\d+)")


def split(test_id: str) -> tuple[str, int | None]:
    """'file::test[param-seed7]' -> ('file::test[param]', 7)."""
    m = re.search(r"\[(.*)\]$", test_id)
    if not m:
        return test_id, None
    parts = m.group(1).split("-")
    seeds = [p for p in parts if _SEED.fullmatch(p)]
    rest = [p for p in parts if not _SEED.fullmatch(p)]
    base = test_id[: m.start()] + (f"[{'-'.join(rest)}]" if rest else "")
    return base, int(seeds[-1][4:]) if seeds else None


def report(outcomes: dict, used: dict) -> dict:
    tests: dict[str, dict] = {}
    for junit_name, outcome in outcomes.items():
        cls, _, name = junit_name.rpartition("::")
        base, seed = split(name)
        key = f"{cls}::{base}"
        t = tests.setdefault(key, {"seeds": 0, "failed_seeds": [], "skipped": 0, "checks": {}})
        if outcome == "skipped":
            t["skipped"] += 1
            continue
        t["seeds"] += 1
        if outcome == "failed":
            t["failed_seeds"].append(seed)
    for test_id, records in used.items():
        path, _, name = test_id.partition("::")
        base, seed = split(name)
        cls = path.removesuffix(".py").replace("/", ".")
        t = tests.setdefault(f"{cls}::{base}", {"seeds": 0, "failed_seeds": [], "skipped": 0, "checks": {}})
        for where, fraction in records:
            worst = t["checks"].get(where)
            if worst is None or fraction > worst["used"]:
                t["checks"][where] = {
                    "used": fraction,
                    "margin": (1 / fraction) if fraction > 0 else None,
                    "seed": seed,
                }
    return tests


def environment(python: str) -> dict:
    """Where the margins were measured: commit, CPU, torch's vector ISA and threads (what rounding depends on)."""
    probe = (
        "import json, os, platform, torch; print(json.dumps({'torch': torch.__version__, "
        "'cpu_capability': torch.backends.cpu.get_cpu_capability(), 'threads': torch.get_num_threads(), "
        "'machine': platform.machine()}))"
    )
    env = json.loads(subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    return {
        **env,
        "commit": commit + ("-dirty" if dirty else ""),
        "cpu": cpu,
        "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0-49", help="seed range A-B (inclusive), default 0-49")
    parser.add_argument("--out", help="also write the report as JSON to this file")
    parser.add_argument("--python", default=sys.executable)
    args, pytest_args = parser.parse_known_args(argv)
    outcomes, used = run(args.seeds, pytest_args, args.python)
    tests = report(outcomes, used)
    print(f"\n{'test':<100} {'seeds':>5} {'failed':>6}  worst check: fraction of tolerance used (margin), seed")
    for name, t in sorted(tests.items()):
        checks = sorted(t["checks"].items(), key=lambda kv: -kv[1]["used"])
        head = f"{name:<100} {t['seeds']:>5} {len(t['failed_seeds']):>6}  " + (
            f"{checks[0][1]['used']:.3g} ({checks[0][1]['margin'] or float('inf'):.3g}x) seed "
            f"{checks[0][1]['seed']} at {checks[0][0]}"
            if checks
            else "no tolerance check recorded"
        )
        print(head)
        if t["failed_seeds"]:
            print(f"{'':<100} failed seeds: {t['failed_seeds']}")
        for where, c in checks[1:]:
            print(f"{'':<115}{c['used']:.3g} ({c['margin'] or float('inf'):.3g}x) seed {c['seed']} at {where}")
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "seeds": args.seeds,
                    "pytest_args": pytest_args,
                    "environment": environment(args.python),
                    "tests": tests,
                },
                indent=1,
            )
        )
    return 1 if any(t["failed_seeds"] for t in tests.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
