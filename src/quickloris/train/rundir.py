"""The run folder (--output-dir): what may be written where, checked before anything is.

A run folder is marked by `MARKER`, the first file a run writes. quickloris writes only the names in `RUN_FILES`
there. The rules (`check_output_dir`, before any model is loaded; `claim`, just before the first write):

* a folder that does not exist yet, or an empty one: a new run;
* a quickloris run (its marker; or, from before markers, its config.json of a run) that holds a checkpoint or an
  adapter: continued with --resume, started over with --overwrite (which removes the earlier run's files by name,
  nothing else), else refused;
* any other folder: refused, unless --overwrite, and even then refused if it holds one of `RUN_FILES` (that file
  was not written by quickloris, and --overwrite never replaces such a file);
* never the --model or --adapter folder, a folder inside them, or one that holds them (not even with --overwrite);
* a path that is a file, or that cannot be written: refused.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from quickloris.config import ConfigError
from quickloris.models.adapters import CONFIG_NAME, LABELS_NAME, WEIGHTS_NAME
from quickloris.train.config import TrainConfig
from quickloris.utils.atomic import atomic_write_json

# The layout of a run folder: every name quickloris writes there.
MARKER = ".quickloris-run"
CHECKPOINTS = "checkpoints"
ADAPTER_DIR = "adapter"
REPORT_FILES = ("config.json", "metrics.json", "loss.png")
RUN_FILES = (MARKER, *REPORT_FILES, ADAPTER_DIR, CHECKPOINTS)
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, LABELS_NAME)  # the class names: a classifier's adapter only
STATE_FILE = "trainer_state.pt"  # checkpoints/step-N/: ADAPTER_FILES, this, MANIFEST (quickloris.train.checkpoint)
MANIFEST = "manifest.json"
CHECKPOINT_FILES = (*ADAPTER_FILES, STATE_FILE, MANIFEST)


def _error(problem: str, *refs: str) -> ConfigError:
    return ConfigError(TrainConfig, "output_dir", problem, refs)


def is_run(folder: Path) -> bool:
    """Whether `folder` holds a quickloris run: its marker, or a run's config.json (runs made before markers)."""
    if (folder / MARKER).is_file():
        return True
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and {"train", "qlora", "resolved"} <= set(cfg)


def holds_results(folder: Path) -> str | None:
    """What of a run's results `folder` holds (a checkpoint or an adapter), for messages; None: nothing."""
    ckpts = sorted(p.name for p in (folder / CHECKPOINTS).glob("step-*")) if (folder / CHECKPOINTS).is_dir() else []
    if ckpts:
        return f"checkpoint {ckpts[-1]}"
    return "an adapter" if (folder / ADAPTER_DIR).is_dir() else None


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_output_dir(cfg: TrainConfig, protected: dict[str, Path | None]) -> bool:
    """Apply the module docstring's rules to ``cfg.output_dir`` without writing anything.

    `protected`: ``{"--model": path, "--adapter": path}`` (None: not given). Returns whether a run folder with
    results is there (continued with --resume, or cleared by `claim` with --overwrite).
    """
    out = Path(cfg.output_dir).expanduser().resolve()
    for option, path in protected.items():
        if path is not None and _overlap(out, Path(path).expanduser().resolve()):
            raise _error(
                f"{str(cfg.output_dir)!r} overlaps the {option} folder {str(path)!r}: a run never writes "
                "there; choose another {output_dir}",
                "output_dir",
            )
    if out.exists() and not out.is_dir():
        raise _error(f"{str(cfg.output_dir)!r} is a file, not a folder")
    _check_writable(out, cfg)
    if not out.is_dir() or not any(out.iterdir()):
        return False
    if is_run(out):
        results = holds_results(out)
        if results and not cfg.resume and not cfg.overwrite:
            raise _error(
                f"{str(cfg.output_dir)!r} holds a run ({results}): continue it with {{resume}}, start "
                "over with {overwrite}, or choose another {output_dir}",
                "resume",
                "overwrite",
                "output_dir",
            )
        return results is not None
    if not cfg.overwrite:
        raise _error(
            f"{str(cfg.output_dir)!r} exists and is not a quickloris run; choose a new or empty folder, or "
            "pass {overwrite} to write the run into it",
            "overwrite",
        )
    clash = [name for name in RUN_FILES if (out / name).exists()]
    if clash:
        raise _error(
            f"{str(cfg.output_dir)!r} holds {', '.join(clash)}, which quickloris did not write and "
            "{overwrite} never replaces; choose another {output_dir}",
            "overwrite",
            "output_dir",
        )
    return False


def _check_writable(out: Path, cfg: TrainConfig) -> None:
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise _error(f"{str(cfg.output_dir)!r} is inside {str(existing)!r}, which is a file")
    try:  # os.access says yes to root on read-only file systems: try it
        tempfile.TemporaryDirectory(dir=existing, prefix=".quickloris-probe-").cleanup()
    except OSError as e:
        raise _error(f"{str(cfg.output_dir)!r} cannot be written ({e.strerror or e} in {str(existing)!r})") from None


def claim(cfg: TrainConfig, protected: dict[str, Path | None], echo=lambda m: None) -> Path:
    """Check again (time has passed since the first check), then make the folder and write the marker, the run's
    first file; with --overwrite remove an earlier run's files; remove what a killed run left half-written."""
    has_results = check_output_dir(cfg, protected)
    out = Path(cfg.output_dir)
    if has_results and cfg.overwrite:
        echo(f"--overwrite: removing the earlier run's files in {out}")
        remove_run_files(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).is_file():
        from quickloris import __version__

        atomic_write_json(
            out / MARKER,
            {"written_by": f"quickloris {__version__} train", "created": time.time(), "files": list(RUN_FILES)},
        )
    for stale in remove_stale_temporaries(out):
        echo(f"removed {stale} (left by an interrupted write)")
    return out


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:  # not empty (files quickloris did not write stay) or gone
        pass


def remove_run_files(out: Path) -> None:
    """Delete the files an earlier run wrote, by name; anything else in the folder stays."""
    for name in REPORT_FILES:
        _unlink(out / name)
    for name in ADAPTER_FILES:
        _unlink(out / ADAPTER_DIR / name)
    _rmdir_if_empty(out / ADAPTER_DIR)
    root = out / CHECKPOINTS
    if root.is_dir():
        for folder in root.iterdir():
            if folder.is_dir() and (folder.name.startswith("step-") or folder.name.startswith(".step-")):
                for name in CHECKPOINT_FILES:
                    _unlink(folder / name)
                _rmdir_if_empty(folder)
        _rmdir_if_empty(root)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[str]:
    """Remove the hidden ``checkpoints/.step-N.tmp-PID/`` folders of writes whose process is gone, and the
    ``.<name>.*.tmp`` files `quickloris.utils.atomic` leaves when killed mid-write. Returns what was removed."""
    import shutil

    removed = []
    root = out / CHECKPOINTS
    for tmp in sorted(root.glob(".step-*.tmp-*")) if root.is_dir() else []:
        pid = tmp.name.rsplit("-", 1)[-1]
        if tmp.is_dir() and not (pid.isdigit() and _pid_alive(int(pid))):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(str(tmp))
    for folder in (out, out / ADAPTER_DIR):
        for name in (*REPORT_FILES, MARKER, *ADAPTER_FILES):
            for tmp in folder.glob(f".{name}.*.tmp"):
                _unlink(tmp)
                removed.append(str(tmp))
    return removed
