"""Data options of `quickloris train` / `quickloris eval` and the one call that turns them into examples.

`prepare_data(cfg, tokenizer, seed=...)` reads the JSONL file (or generates the embedded task), tokenizes
with response-only labels, drops or rejects over-long examples and checks that something is left to train
on. The embedded task also gives the held-out problems that `quickloris.train.exact_match` scores.
`prepare_classification_data` does the same for sequence classification (`quickloris.data.classification`): the
label set comes from the training rows, and the held-out rows (the embedded task's, or an evaluation file's) must
use those labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Literal

from quickloris.config import Config, ConfigError, at_least, field
from quickloris.data.chat import (
    TokenizedExample,
    TokenizeStats,
    check_max_seq_len,
    tokenize_records,
    tool_task_template,
)
from quickloris.data.classification import (
    CLASSIFICATION_TASKS,
    DEFAULT_CLASSIFICATION_TASK,
    ClassificationRow,
    label_names,
    read_classification_jsonl,
    tokenize_classification,
)
from quickloris.data.jsonl import load_jsonl
from quickloris.data.tasks import DEFAULT_TASK, TASKS, TaskExample, get_task
from quickloris.data.tool_task import TOOLS_TASK, ToolExample
from quickloris.data.tools import SHIPPED_TOOL_TEMPLATE

TaskType = Literal["causal_lm", "classification"]


def known_task(name: str) -> str | None:
    """Check of a task name (`quickloris.config.field`): None if it is an embedded task."""
    names = sorted(TASKS) + sorted(CLASSIFICATION_TASKS)
    return None if name in names else f"{name!r} is an unknown task; choose one of {', '.join(names)}"


def task_name(owner: type, task: str | None, task_type: str) -> str:
    """The embedded task of a run: `task`, or the task type's default; a task of the other type raises."""
    tasks, default = (
        (CLASSIFICATION_TASKS, DEFAULT_CLASSIFICATION_TASK) if task_type == "classification" else (TASKS, DEFAULT_TASK)
    )
    if task is None:
        return default
    if task not in tasks:
        raise ConfigError(
            owner,
            "task",
            f"{task!r} is not a {task_type.replace('_', ' ')} task (--task-type "
            f"{task_type}); choose one of {', '.join(sorted(tasks))}",
        )
    return task


@dataclass
class DataConfig(Config):
    """Training data: a JSONL file or the embedded task, and how it is tokenized and batched."""

    data: str | None = field(
        None,
        help="training data: a JSONL file with a {'messages': [...]} or a "
        "{'prompt', 'completion'} object per line (with --task-type classification a "
        "{'text', 'label'} object); none: the embedded task (see --task)",
    )
    task: str | None = field(
        None,
        help="embedded task generated when --data is none, and the task scored by "
        "evaluation: 'addition' (sum of two 3-digit numbers), 'reverse' (reverse 5-7 digits) or 'tools' (call a "
        "calculator, unit converter or stock lookup, then answer from its result); "
        "with --task-type classification 'sentiment' (of a generated review sentence); none: "
        "addition, or sentiment for classification",
        check=known_task,
    )
    num_train: int = field(1200, help="training problems generated for the embedded task", check=at_least(1))
    num_eval: int = field(
        200, help="held-out problems of the embedded task scored by exact match", check=at_least(1), fingerprint=False
    )
    max_seq_len: int = field(
        256,
        help="longest tokenized example (at most the model's "
        "max_position_embeddings); longer examples are handled by --overflow",
        check=at_least(2),
    )
    overflow: Literal["drop", "error"] = field(
        "drop", help="an example longer than --max-seq-len is dropped (and counted) or raises"
    )
    packing: bool = field(
        False,
        help="padding-free packing: concatenate examples into rows of up to "
        "--max-seq-len tokens, position ids restarting per example",
    )
    chat_template: str | None = field(None, help="a Jinja chat template file used instead of the tokenizer's")


@dataclass
class PreparedData:
    """Tokenized training examples, what was dropped, and the held-out problems of the task."""

    examples: list[TokenizedExample]
    stats: TokenizeStats
    eval_examples: list[TaskExample | ToolExample]
    source: str
    chat_template: str | None = None  # the template used (None: the tokenizer's), for evaluation
    template_file: str | None = None  # where it came from: --chat-template, or quickloris' tool template
    notes: list[str] = dataclass_field(default_factory=list)  # for the user (e.g. which template --task tools uses)


def read_chat_template(path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"chat template file {path!r} does not exist")
    return p.read_text(encoding="utf-8")


def prepare_data(
    cfg: DataConfig, tokenizer: Any, *, seed: int = 0, max_position_embeddings: int | None = None
) -> PreparedData:
    """Examples to train on and problems to evaluate, from `cfg` (the task's splits depend on `seed`)."""
    check_max_seq_len(cfg.max_seq_len, max_position_embeddings)
    task = get_task(task_name(DataConfig, cfg.task, "causal_lm"))
    chat_template, notes = read_chat_template(cfg.chat_template), []
    template_file = None if cfg.chat_template is None else str(Path(cfg.chat_template).resolve())
    if task is TOOLS_TASK and cfg.data is None:
        chat_template, note = tool_task_template(tokenizer, chat_template)
        if note:
            notes.append(note)
            template_file = SHIPPED_TOOL_TEMPLATE
    if cfg.data is None:
        records, source = task.records("train", cfg.num_train, seed), f"embedded task {task.name!r}"
    else:
        records, source = load_jsonl(cfg.data), cfg.data
    examples, stats = tokenize_records(
        tokenizer,
        records,
        max_seq_len=cfg.max_seq_len,
        overflow=cfg.overflow,
        chat_template=chat_template,
    )
    heldout = task.generate("heldout", cfg.num_eval, seed)
    return PreparedData(examples, stats, heldout, source, chat_template, template_file, notes)


@dataclass
class PreparedClassification:
    """Tokenized training texts (class id at the last token), the class names, and the held-out texts."""

    examples: list[TokenizedExample]
    stats: TokenizeStats
    labels: list[str]
    eval_rows: list[ClassificationRow]
    source: str
    eval_source: str


def prepare_classification_data(
    cfg: DataConfig,
    tokenizer: Any,
    *,
    seed: int = 0,
    eval_data: str | None = None,
    max_position_embeddings: int | None = None,
) -> PreparedClassification:
    """Training texts from --data (or the embedded classification task), their label set, and the rows scored
    before / after training: `eval_data`'s (labels checked against the training labels, naming file:line), the
    task's held-out split, or none (training on --data without `eval_data`)."""
    from quickloris.data.classification import get_classification_task, label_ids

    check_max_seq_len(cfg.max_seq_len, max_position_embeddings)
    task = get_classification_task(task_name(DataConfig, cfg.task, "classification"))
    if cfg.data is None:
        rows, source = task.rows("train", cfg.num_train, seed), f"embedded classification task {task.name!r}"
    else:
        rows, source = read_classification_jsonl(cfg.data), cfg.data
    labels = label_names(rows)
    label2id = {name: i for i, name in enumerate(labels)}
    examples, stats = tokenize_classification(
        tokenizer, rows, label2id, max_seq_len=cfg.max_seq_len, overflow=cfg.overflow
    )
    if eval_data is not None:
        eval_rows, eval_source = read_classification_jsonl(eval_data), f"--eval-data {eval_data}"
    elif cfg.data is None:
        eval_rows = task.rows("heldout", cfg.num_eval, seed)
        eval_source = f"{len(eval_rows)} held-out texts of task {task.name!r}"
    else:
        eval_rows, eval_source = [], "no evaluation: training on --data without --eval-data"
    label_ids(eval_rows, label2id)
    return PreparedClassification(examples, stats, labels, eval_rows, source, eval_source)
