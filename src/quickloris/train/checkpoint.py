"""Resumable checkpoints: everything a run needs to continue as if it had never stopped.

``<output_dir>/checkpoints/step-000050/`` holds

* ``adapter_config.json`` + ``adapter_model.safetensors``: the LoRA weights, in PEFT's format;
* ``trainer_state.pt``: AdamW's state (both moments, its step counts), the step counter (which fixes the
  learning rate and the data position: `quickloris.train.loop`), the per-step records (the loss curve so far),
  the RNG states (CPU and CUDA: LoRA dropout draws from them) and the *fingerprint*: every option that changes
  the trajectory, compared on resume so that a checkpoint is never continued with different data or settings.

A checkpoint is written into a hidden temporary folder and renamed into place (each file atomically, then the
folder), so ``step-*`` folders are always complete; the previous one is deleted only after the new one exists.
The base model is not saved: it is rebuilt from its source, deterministically (NF4 quantization is exact).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from quickloris.models.adapters import save_adapter, load_adapter
from quickloris.train.loop import LoopState
from quickloris.utils.atomic import atomic_open

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
_PREFIX = "step-"


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
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


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


def save_checkpoint(output_dir: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: LoopState, fingerprint: dict[str, Any], *, keep: int = 1) -> Path:
    """Write the checkpoint of `state.step`; keep the newest `keep` checkpoints. Returns its folder."""
    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{state.step:06d}"
    if final.exists():  # written already (e.g. the end of the run fell on a --save-every step)
        return final
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_adapter(model, tmp)
        payload = {"step": state.step, "total_steps": state.total_steps, "elapsed": state.elapsed,
                   "history": state.history, "evals": state.evals, "optimizer": optimizer.state_dict(), "rng": _rng_state(),
                   "fingerprint": fingerprint}
        with atomic_open(tmp / STATE_FILE, "wb") as f:
            torch.save(payload, f)
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: saved -> current"`` for every trajectory option that differs."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def load_checkpoint(folder: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    fingerprint: dict[str, Any]) -> LoopState:
    """Restore adapter, optimizer and RNG states from `folder` into `model` / `optimizer`; returns the loop state.

    Raises ValueError if the checkpoint was made with different trajectory options (`fingerprint`).
    """
    folder = Path(folder)
    payload = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    diff = fingerprint_differences(payload["fingerprint"], fingerprint)
    if diff:
        raise ValueError(f"cannot resume from {folder}: it was made with other options ({'; '.join(diff)}); use "
                         "the same options, or another --output-dir to start a new run")
    load_adapter(model, folder)
    optimizer.load_state_dict(payload["optimizer"])
    _set_rng_state(payload["rng"])
    return LoopState(step=int(payload["step"]), total_steps=int(payload["total_steps"]),
                     history=list(payload["history"]), elapsed=float(payload["elapsed"]),
                     evals=dict(payload.get("evals", {})))
