"""Where and how a run executes: device, dtype, CPU threads, the model's position limit, eval problems, and the
checks of the inputs that need no model (`check_inputs`).

Kept apart from the loop so `quickloris train` and `quickloris eval` resolve these the same way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quickloris.config import ConfigError
from quickloris.data.chat import template_message
from quickloris.data.config import DataConfig
from quickloris.data.jsonl import DataFormatError, load_jsonl
from quickloris.data.sources import open_source
from quickloris.models.prepare import QLoRAConfig
from quickloris.train.config import EvalConfig, ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(cfg.device)
    except RuntimeError as e:
        raise ConfigError(
            ModelConfig, "device", f"must be 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r} ({e})"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(ModelConfig, "device", f"is {cfg.device!r} but no CUDA GPU is visible; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                ModelConfig, "device", f"is {cfg.device!r} but only {torch.cuda.device_count()} GPU(s) are visible"
            )
    elif device.type != "cpu":
        raise ConfigError(ModelConfig, "device", f"must be 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")
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


# Files transformers builds a tokenizer from (one of them, or the pair); a GGUF file carries its own.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json + merges.txt", "vocab.txt", "tiktoken.model")


def _missing_file(owner: type, name: str, path: Any, *, folder: bool = False) -> None:
    if path is None:
        return
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(owner, name, f"{str(path)!r} does not exist")
    if folder != p.is_dir():
        raise ConfigError(
            owner,
            name,
            f"{str(path)!r} is {'a file' if folder else 'a folder'}, not {'a folder' if folder else 'a file'}",
        )


def has_tokenizer(folder: Path) -> bool:
    return any(all((folder / part).is_file() for part in names.split(" + ")) for names in TOKENIZER_FILES)


def check_max_seq_len_option(data_cfg: DataConfig, limit: int | None) -> None:
    if limit is not None and data_cfg.max_seq_len > limit:
        raise ConfigError(
            DataConfig,
            "max_seq_len",
            f"={data_cfg.max_seq_len} is longer than the model can take "
            f"(max_position_embeddings={limit}); use at most that",
        )


def check_inputs(
    source: Any,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    qlora_cfg: QLoRAConfig,
    eval_cfg: EvalConfig,
    limit: int | None,
) -> None:
    """What can be checked from files before a model is loaded: the input files exist, the model's architecture
    (its config.json) is supported and has the --target-modules layers, its tokenizer files are there, and
    --max-seq-len fits its position limit (`limit`). Errors name the option (`ConfigError`)."""
    data = [(DataConfig, "data", p) for p in data_cfg.data or []]
    for owner, name, path in data + ([(EvalConfig, "eval_data", eval_cfg.eval_data)] if eval_cfg.eval_data else []):
        if not Path(path).expanduser().exists():
            raise ConfigError(owner, name, f"{str(path)!r} does not exist")
        try:
            open_source(path)  # a file type it cannot read, a folder that is not a datasets folder
        except DataFormatError as e:
            raise ConfigError(owner, name, f": {e}") from None
    _missing_file(DataConfig, "chat_template", data_cfg.chat_template)
    _missing_file(ModelConfig, "adapter", model_cfg.adapter, folder=True)
    if model_cfg.adapter is not None and not (Path(model_cfg.adapter).expanduser() / "adapter_config.json").is_file():
        raise ConfigError(
            ModelConfig, "adapter", f"{model_cfg.adapter!r} is not a PEFT adapter folder (no adapter_config.json)"
        )
    from quickloris.models.families import GENERIC, family_of, registered
    from quickloris.models.prepare import resolve_targets

    spec = GENERIC  # the generic path's placeholder: target names are checked when the model is prepared
    if source.config is not None:
        try:
            spec = family_of(source.config)
        except ValueError as e:
            raise ConfigError(ModelConfig, "model", f": {str(source.path)!r} is a {e}") from None
    elif source.is_gguf:
        from quickloris.models.loading import gguf_metadata

        arch = gguf_metadata(source.path, {"general.architecture"}).get("general.architecture")
        spec = next((s for s in registered().values() if s.gguf_arch == arch), GENERIC)
    if model_cfg.adapter is None:  # with an adapter, its own targets count (checked when it is read)
        resolve_targets(spec, qlora_cfg.target_modules)
    if not source.is_gguf and not has_tokenizer(source.folder):
        raise ConfigError(
            ModelConfig, "model", f": no tokenizer in {str(source.folder)!r} (looked for {', '.join(TOKENIZER_FILES)})"
        )
    check_max_seq_len_option(data_cfg, limit)


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

    prompt: tuple[dict[str, Any], ...]
    answer: str
    source: str
    tools: tuple[dict[str, Any], ...] | None = None  # the row's tools, rendered with the prompt

    @property
    def question(self) -> str:
        users = [m["content"] for m in self.prompt if m["role"] == "user"]
        return users[-1] if users else self.prompt[-1]["content"]

    def prompt_messages(self) -> list[dict[str, str]]:
        return [dict(m) for m in self.prompt]


def reference_answer(messages: list[dict[str, Any]], source: str) -> str:
    """The one-line reference answer of a held-out conversation: its last message, a final assistant text after at
    least one prompt message (DataFormatError naming `source` otherwise). Shared by text and vision --eval-data."""
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise DataFormatError(
            f"{source}: the last message must be the reference 'assistant' answer, after at least one prompt message"
        )
    if messages[-1].get("tool_calls"):
        raise DataFormatError(
            f"{source}: the last message is a tool call; --eval-data scores a final text answer (the embedded "
            "--task tools scores calls)"
        )
    answer = messages[-1]["content"].strip()
    if not answer:
        raise DataFormatError(f"{source}: the reference answer (last assistant message) is empty")
    if "\n" in answer:
        raise DataFormatError(
            f"{source}: the reference answer must be one line (exact match compares the first line of the reply "
            "with it)"
        )
    return answer


def load_eval_examples(path: str | os.PathLike, columns: dict[str, str] | None = None) -> list[ChatEvalExample]:
    """Exact-match problems from a data file of chat records (messages, alpaca, sharegpt, conversational
    prompt/completion; `columns`: the --data-columns renaming) whose last message is the reference answer. A bad
    record: one line naming --eval-data and the record (`ConfigError`)."""
    out = []
    try:
        for r in load_jsonl(path, columns=columns):
            if not r.is_chat:
                raise DataFormatError(
                    f"{r.source}: --eval-data needs chat records ({{'messages': [...]}}) ending with the reference "
                    "assistant answer; plain prompt/completion or text records have no chat prompt to generate from"
                )
            messages = [template_message(m) for m in r.messages]  # tool calls and results stay in the prompt
            answer = reference_answer(messages, r.source)
            out.append(ChatEvalExample(tuple(messages[:-1]), answer, r.source, r.tools))
    except DataFormatError as e:
        raise ConfigError(EvalConfig, "eval_data", f": {e}") from None
    return out
