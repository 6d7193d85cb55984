"""Where and how a run executes: device, dtype, CPU threads, the model's position limit, eval problems.

Kept apart from the loop so `quickloris train` and `quickloris eval` resolve these the same way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from quickloris.data.jsonl import DataFormatError, load_jsonl
from quickloris.train.config import ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(cfg.device)
    except RuntimeError as e:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r} ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={cfg.device!r} but no CUDA GPU is visible; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={cfg.device!r} but only {torch.cuda.device_count()} GPU(s) are visible")
    elif device.type != "cpu":
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")
    return device


def resolve_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that has it (else fp32: fp16 without loss scaling can overflow), fp32 on CPU."""
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def resolve_threads(cfg: ModelConfig) -> tuple[int, str]:
    """Threads for PyTorch's CPU ops and a line saying why: --threads, else the cores left idle by others.

    OpenMP threads wait for each other at every parallel region; one of them sharing its core with another busy
    process stalls the others (measured: 2 threads on 2 busy cores 4-10 s per SmolLM2 step, 1 thread 1.2-1.9 s).
    """
    cores = cpu_cores()
    if cfg.threads is not None:
        return cfg.threads, f"{cfg.threads} CPU threads (--threads)"
    load = load_average()
    if load is None:
        return cores, f"{cores} CPU threads (all cores; load average unknown)"
    n = max(1, min(cores, int(cores - load + 0.5)))
    return n, f"{n} CPU thread{'s' * (n != 1)} ({cores} cores, load average {load:.2f}; set --threads to override)"


def max_position_embeddings(source: Any) -> int | None:
    """The longest sequence a model takes, from its files (no model built): config.json, or the GGUF header."""
    from quickloris.models.loading import gguf_metadata, max_positions

    if source.config is not None:
        return max_positions(source.config)
    if source.is_gguf:
        arch = gguf_metadata(source.path, {"general.architecture"}).get("general.architecture")
        if arch:
            value = gguf_metadata(source.path, {f"{arch}.context_length"}).get(f"{arch}.context_length")
            return int(value) if value is not None else None
    return None


@contextlib.contextmanager
def eager_regions() -> Iterator[None]:
    """Run compiled regions eagerly inside: generation (KV caches, one token at a time) is not what they were
    compiled for, and a fullgraph region would refuse the cache objects rather than fall back."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:  # pragma: no cover - torch < 2.6
        yield
        return
    with set_stance("force_eager"):
        yield


@dataclass(frozen=True)
class ChatEvalExample:
    """A held-out conversation: the prompt messages and the reference answer (the final assistant turn)."""

    prompt: tuple[dict[str, str], ...]
    answer: str
    source: str

    @property
    def question(self) -> str:
        users = [m["content"] for m in self.prompt if m["role"] == "user"]
        return users[-1] if users else self.prompt[-1]["content"]

    def prompt_messages(self) -> list[dict[str, str]]:
        return [dict(m) for m in self.prompt]


def load_eval_examples(path: str | os.PathLike) -> list[ChatEvalExample]:
    """Exact-match problems from a JSONL file of chat records whose last message is the reference answer."""
    out = []
    for r in load_jsonl(path):
        if not r.is_chat:
            raise DataFormatError(f"{r.source}: --eval-data needs chat records ({{'messages': [...]}}) ending with "
                                  "the reference assistant answer; plain prompt/completion text has no chat prompt "
                                  "to generate from")
        messages = [{"role": m["role"], "content": m["content"]} for m in r.messages]
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise DataFormatError(f"{r.source}: the last message must be the reference 'assistant' answer, after at "
                                  "least one prompt message")
        answer = messages[-1]["content"].strip()
        if not answer:
            raise DataFormatError(f"{r.source}: the reference answer (last assistant message) is empty")
        if "\n" in answer:
            raise DataFormatError(f"{r.source}: the reference answer must be one line (exact match compares the "
                                  "first line of the reply with it)")
        out.append(ChatEvalExample(tuple(messages[:-1]), answer, r.source))
    return out
