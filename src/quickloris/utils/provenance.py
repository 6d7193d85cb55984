"""Provenance for every reported number: GPU, library versions, commit and date.

Benchmarks call `record(area, name, results)`; the JSON lands in `benchmarks/results/<area>/`
(or under `--out`, e.g. `$OUT` on the device machine) with the environment it was measured in.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from quickloris.utils.atomic import atomic_write_json

_PACKAGES = ("torch", "triton", "transformers", "peft", "bitsandbytes", "accelerate", "trl", "gguf")


def _version(pkg: str) -> str | None:
    try:
        return _md.version(pkg)
    except _md.PackageNotFoundError:
        return None


def git_commit() -> str:
    """The commit measured: $QUICKLORIS_COMMIT (set by device runs, which have no .git), else git."""
    env = os.environ.get("QUICKLORIS_COMMIT")
    if env:
        return env
    root = Path(__file__).resolve().parents[3]
    marker = root / ".device" / "commit.txt"
    if marker.is_file():
        return marker.read_text().strip()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict[str, Any]:
    """GPU(s), CUDA, library versions, host, commit and UTC date."""
    import torch

    env: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "versions": {p: _version(p) for p in _PACKAGES},
    }
    env["versions"]["torch"] = torch.__version__
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpus"] = [
            {
                "name": torch.cuda.get_device_name(i),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
                "sm_count": torch.cuda.get_device_properties(i).multi_processor_count,
            }
            for i in range(torch.cuda.device_count())
        ]
    else:
        env["gpus"] = []
    return env


def default_results_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "benchmarks" / "results"


def record(area: str, name: str, results: dict[str, Any], out_dir: str | os.PathLike | None = None) -> Path:
    """Write `{"environment": ..., "results": ...}` to `<out_dir>/<area>/<name>-<stamp>.json` atomically."""
    env = environment()
    stamp = env["date_utc"].replace(":", "").replace("-", "").replace("+0000", "Z")
    base = Path(out_dir) if out_dir is not None else default_results_dir()
    path = base / area / f"{name}-{stamp}.json"
    atomic_write_json(path, {"environment": env, "results": results})
    return path
