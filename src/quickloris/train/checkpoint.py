"""Resumable checkpoints: everything a run needs to continue as if it had never stopped, checked before use.

``<output_dir>/checkpoints/step-000050/`` holds

* ``adapter_config.json`` + ``adapter_model.safetensors``: the LoRA weights, in PEFT's format;
* ``trainer_state.pt``: AdamW's state (both moments, its step counts), the step counter (which fixes the
  learning rate and the data position: `quickloris.train.loop`), the per-step records (the loss curve so far),
  the RNG states (CPU and CUDA: LoRA dropout draws from them) and the *fingerprint*: every option that changes
  the trajectory and the data's own fingerprint (`data_fingerprint`), compared on resume so that a checkpoint is
  never continued with different data or settings;
* ``manifest.json``, written last: each other file's size and SHA-256.

A checkpoint is written into a hidden ``.step-N.tmp-PID`` folder and renamed into place (each file atomically, then
the folder), so ``step-*`` folders are always complete; an interrupted write removes its temporary folder, a killed
one leaves it for `quickloris.train.rundir.remove_stale_temporaries`. The newest `keep` (2) checkpoints are kept,
so that a damaged one (a flipped bit, a truncated file: `verify` compares the manifest) leaves an intact one to
resume from (`resumable_checkpoint`). Weights that are not finite are never saved.
The base model is not saved: it is rebuilt from its source, deterministically (NF4 quantization is exact).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from quickloris.models.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from quickloris.train.loop import LoopState, TrainingDiverged
from quickloris.train.rundir import CHECKPOINTS, MANIFEST, STATE_FILE
from quickloris.utils.atomic import atomic_open, atomic_write_json

_PREFIX = "step-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: damaged, or made with other options or data."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints of a run that were written to the end (they have a manifest), oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX) :].isdigit() and (p / MANIFEST).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(folder: Path) -> int:
    """The step of checkpoint `folder` (from its name)."""
    return int(folder.name[len(_PREFIX) :])


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify(folder: str | os.PathLike) -> str | None:
    """What is wrong with checkpoint `folder` (a missing, resized or changed file), or None if it is intact."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (written by an older quickloris, or not to the end)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for name in (CONFIG_NAME, WEIGHTS_NAME, STATE_FILE):
        entry = files.get(name) if isinstance(files, dict) else None
        path = folder / name
        if entry is None:
            return f"{MANIFEST} does not list {name}"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry.get("bytes"):
            return f"{name} has {path.stat().st_size} bytes, the manifest says {entry.get('bytes')} (truncated?)"
        if _sha256(path) != entry.get("sha256"):
            return f"{name} does not match its checksum (the file changed after it was written)"
    return None


def resumable_checkpoint(output_dir: str | os.PathLike, notice: Callable[[str], None] = lambda m: None) -> Path | None:
    """The newest intact checkpoint; each damaged newer one is reported through `notice` and skipped.

    Raises CheckpointError if there are checkpoints but none is intact.
    """
    dirs = checkpoint_dirs(output_dir)
    damaged = []
    for folder in reversed(dirs):
        problem = verify(folder)
        if problem is None:
            if damaged:
                notice(
                    f"checkpoint {damaged[-1][0]} is damaged ({damaged[-1][1]}); resuming from {folder.name} instead"
                )
            return folder
        damaged.append((folder.name, problem))
    if damaged:
        raise CheckpointError(
            f"no intact checkpoint in {Path(output_dir) / CHECKPOINTS}: "
            + "; ".join(f"{name}: {problem}" for name, problem in damaged)
        )
    return None


def _rng_state() -> dict[str, Any]:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        states = rng["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def save_checkpoint(
    output_dir: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: LoopState,
    fingerprint: dict[str, Any],
    *,
    keep: int = 2,
) -> Path:
    """Write the checkpoint of `state.step`; keep the newest `keep` checkpoints. Returns its folder.

    Raises `TrainingDiverged` (and writes nothing) if a trainable weight is not finite.
    """
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    if bad:
        raise TrainingDiverged(state.step, f"trainable weight {bad[0]}", float("nan"))
    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{state.step:06d}"
    if final.exists():
        if verify(final) is None:  # written already (e.g. the end of the run fell on a --save-every step)
            return final
        shutil.rmtree(final)  # a damaged one the run resumed before: written anew

    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_adapter(model, tmp)
        payload = {
            "step": state.step,
            "total_steps": state.total_steps,
            "elapsed": state.elapsed,
            "history": state.history,
            "evals": state.evals,
            "optimizer": optimizer.state_dict(),
            "rng": _rng_state(),
            "fingerprint": fingerprint,
        }
        with atomic_open(tmp / STATE_FILE, "wb") as f:
            torch.save(payload, f)
        files = {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
            for name in (CONFIG_NAME, WEIGHTS_NAME, STATE_FILE)
        }
        atomic_write_json(tmp / MANIFEST, {"step": state.step, "files": files})
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:  # Ctrl-C included: no half-written folder stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _data_sha256(data: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    """A file's SHA-256; for several files or a folder (a datasets save_to_disk folder), the SHA-256 of each file's
    name and SHA-256, in order (a folder's files sorted by their path inside it)."""
    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if len(paths) == 1 and Path(paths[0]).is_file():
        return _sha256(Path(paths[0]))
    whole = hashlib.sha256()
    for p in map(Path, paths):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            whole.update(f"{f.relative_to(p) if p.is_dir() else f.name}\0{_sha256(f)}\0".encode())
    return whole.hexdigest()


def data_fingerprint(
    examples: Sequence[Any], data_file: str | os.PathLike | Sequence[str | os.PathLike] | None
) -> dict[str, Any]:
    """What identifies the training data: the data files' SHA-256 (`_data_sha256`; None for the embedded task), the
    example count, and a hash of the tokenized examples (token ids and labels: it also changes with the tokenizer
    or chat template)."""
    tokens = hashlib.sha256()
    for ex in examples:
        tokens.update(array("q", [len(ex.input_ids)]).tobytes())
        tokens.update(array("q", ex.input_ids).tobytes())
        tokens.update(array("q", ex.labels).tobytes())
    return {
        "data.file_sha256": _data_sha256(data_file)[:16] if data_file is not None else None,
        "data.examples": len(examples),
        "data.tokens_sha256": tokens.hexdigest()[:16],
    }


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: saved -> current"`` for every trajectory option that differs."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def load_checkpoint(
    folder: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer, fingerprint: dict[str, Any]
) -> LoopState:
    """Restore adapter, optimizer and RNG states from `folder` into `model` / `optimizer`; returns the loop state.

    Raises CheckpointError if the checkpoint is damaged or was made with different trajectory options or data
    (`fingerprint`).
    """
    folder = Path(folder)
    problem = verify(folder)
    if problem is not None:
        raise CheckpointError(f"checkpoint {folder} is damaged: {problem}")
    try:
        payload = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise CheckpointError(f"checkpoint {folder} cannot be read: {type(e).__name__}: {e}") from None
    diff = fingerprint_differences(payload["fingerprint"], fingerprint)
    if diff:
        raise CheckpointError(
            f"cannot resume from {folder}: it was made with other options or data "
            f"({'; '.join(diff)}); use the same ones, or start a new run (another --output-dir, "
            "or --overwrite)"
        )
    load_adapter(model, folder)
    optimizer.load_state_dict(payload["optimizer"])
    _set_rng_state(payload["rng"])
    return LoopState(
        step=int(payload["step"]),
        total_steps=int(payload["total_steps"]),
        history=list(payload["history"]),
        elapsed=float(payload["elapsed"]),
        evals=dict(payload.get("evals", {})),
    )
