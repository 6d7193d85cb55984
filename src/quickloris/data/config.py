"""Data options of `quickloris train` / `quickloris eval` and the one call that turns them into examples.

`prepare_data(cfg, tokenizer, seed=...)` reads the JSONL file (or generates the embedded task), tokenizes
with response-only labels, drops or rejects over-long examples and checks that something is left to train
on. The embedded task also gives the held-out problems that `quickloris.hf.evaluate` scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from quickloris.config import Config, at_least, field
from quickloris.data.chat import TokenizedExample, TokenizeStats, check_max_seq_len, tokenize_records
from quickloris.data.jsonl import load_jsonl
from quickloris.data.tasks import DEFAULT_TASK, TASKS, TaskExample, get_task


def known_task(name: str) -> str | None:
    """Check of a task name (`quickloris.config.field`): None if it is an embedded task."""
    return None if name in TASKS else f"{name!r} is an unknown task; choose one of {', '.join(sorted(TASKS))}"


@dataclass
class DataConfig(Config):
    """Training data: a JSONL file or the embedded task, and how it is tokenized and batched."""

    data: str | None = field(None, help="training data: a JSONL file with a {'messages': [...]} or a "
                             "{'prompt', 'completion'} object per line; none: the embedded task (see --task)")
    task: str = field(DEFAULT_TASK, help="embedded task generated when --data is none, and the task scored "
                      "by evaluation: 'addition' (sum of two 3-digit numbers) or 'reverse' (reverse 5-7 digits)",
                      check=known_task)
    num_train: int = field(1200, help="training problems generated for the embedded task", check=at_least(1))
    num_eval: int = field(200, help="held-out problems of the embedded task scored by exact match",
                          check=at_least(1), fingerprint=False)
    max_seq_len: int = field(256, help="longest tokenized example (at most the model's "
                             "max_position_embeddings); longer examples are handled by --overflow", check=at_least(2))
    overflow: Literal["drop", "error"] = field("drop", help="an example longer than --max-seq-len is dropped "
                                               "(and counted) or raises")
    packing: bool = field(False, help="padding-free packing: concatenate examples into rows of up to "
                          "--max-seq-len tokens, position ids restarting per example")
    chat_template: str | None = field(None, help="a Jinja chat template file used instead of the tokenizer's")


@dataclass
class PreparedData:
    """Tokenized training examples, what was dropped, and the held-out problems of the task."""

    examples: list[TokenizedExample]
    stats: TokenizeStats
    eval_examples: list[TaskExample]
    source: str


def read_chat_template(path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"chat template file {path!r} does not exist")
    return p.read_text(encoding="utf-8")


def prepare_data(cfg: DataConfig, tokenizer: Any, *, seed: int = 0,
                 max_position_embeddings: int | None = None) -> PreparedData:
    """Examples to train on and problems to evaluate, from `cfg` (the task's splits depend on `seed`)."""
    check_max_seq_len(cfg.max_seq_len, max_position_embeddings)
    task = get_task(cfg.task)
    if cfg.data is None:
        records, source = task.records("train", cfg.num_train, seed), f"embedded task {task.name!r}"
    else:
        records, source = load_jsonl(cfg.data), cfg.data
    examples, stats = tokenize_records(tokenizer, records, max_seq_len=cfg.max_seq_len, overflow=cfg.overflow,
                                       chat_template=read_chat_template(cfg.chat_template))
    return PreparedData(examples, stats, task.generate("heldout", cfg.num_eval, seed), source)
