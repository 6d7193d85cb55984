"""Data options of `quickloris train` / `quickloris eval` and the one call that turns them into examples.

`prepare_data(cfg, tokenizer, seed=...)` reads the data files (`quickloris.data.records.DataFiles`: any file type
of `quickloris.data.sources`, any record shape of `quickloris.data.shapes`, streamed) or generates the embedded
task, tokenizes with response-only labels (`quickloris.data.pipeline.tokenize_stream`: --data-workers processes, a
progress bar on a terminal), drops or rejects over-long examples and checks that something is left to train
on; `PreparedData.header` is the one line a run prints about it. The embedded task also gives the held-out
problems that `quickloris.train.exact_match` scores.
`prepare_classification_data` does the same for sequence classification (`quickloris.data.classification`): the
label set comes from the training rows, and the held-out rows (the embedded task's, or an evaluation file's) must
use those labels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Literal

from quickloris.config import Config, ConfigError, at_least, comma_list, field
from quickloris.data.chat import TokenizedExample, TokenizeStats, check_max_seq_len, tool_task_template
from quickloris.data.classification import (
    CLASSIFICATION_TASKS,
    DEFAULT_CLASSIFICATION_TASK,
    ClassificationRow,
    label_names,
    read_classification_jsonl,
    tokenize_classification,
)
from quickloris.data.pipeline import tokenize_stream
from quickloris.data.records import DataFiles
from quickloris.data.shapes import column_problem, parse_columns
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


def _paths(value: Any) -> Any:
    """`convert` of --data: one path or several, as a list of strings (an empty list: none)."""
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    if isinstance(value, (list, tuple)):
        value = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value] or None
    return value


@dataclass
class DataConfig(Config):
    """Training data: data files or the embedded task, and how they are read, tokenized and batched."""

    data: list[str] | None = field(
        None,
        help="training data: one or more files (--data a.jsonl b.parquet, or --data repeated): .jsonl, .json "
        "(an array or one object per line), .jsonl.gz, .csv, .parquet, .arrow, or a datasets save_to_disk folder, "
        "whose records are OpenAI messages, prompt/completion, alpaca, sharegpt or text rows (see --data-format; "
        "with --task-type classification {'text', 'label'} rows); none: the embedded task (see --task)",
        several=True,
        convert=_paths,
    )
    data_format: Literal["auto", "messages", "prompt_completion", "alpaca", "sharegpt", "text"] = field(
        "auto",
        help="the record shape of --data: auto (detected from each record's keys: messages; conversations = "
        "sharegpt; prompt + completion; instruction + output = alpaca; else text), or one of them for every record",
    )
    data_columns: list[str] = field(
        [],
        help="read other column names as a shape's: name=column,... e.g. prompt=question,completion=answer or "
        "instruction=q,output=a or text=body (names: messages, conversations, prompt, completion, instruction, "
        "input, output, system, history, text, label)",
        convert=comma_list(),
        check=column_problem,
    )
    data_workers: int = field(
        1,
        help="processes tokenizing the data: each takes seconds to start (it imports transformers), so more than 1 "
        "pays off on large data; the examples are the same with any number",
        check=at_least(1),
        fingerprint=False,
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
    """Tokenized training examples, what was dropped, and the held-out problems of the task. `source`: a short
    name of the data; `described`: what was read (each file's type and rows per shape); `dropped_empty`: text rows
    dropped as empty; `shapes`: rows per record shape over all files."""

    examples: list[TokenizedExample]
    stats: TokenizeStats
    eval_examples: list[TaskExample | ToolExample]
    source: str
    chat_template: str | None = None  # the template used (None: the tokenizer's), for evaluation
    template_file: str | None = None  # where it came from: --chat-template, or quickloris' tool template
    notes: list[str] = dataclass_field(default_factory=list)  # for the user (e.g. which template --task tools uses)
    described: str = ""
    dropped_empty: int = 0
    shapes: dict[str, int] | None = None

    def header(self, packing: bool = False) -> str:
        """The run's one line about its data: what was read, examples used and dropped (and why), tokens."""
        st = self.stats
        dropped = [f"{st.dropped_too_long} longer than --max-seq-len"]
        if self.dropped_empty:
            dropped.append(f"{self.dropped_empty} empty")
        shapes = self.shapes or {}
        text = shapes.get("text", 0)
        trained = "every token" if text and text == sum(shapes.values()) else "response only" if not text else ""
        return (
            f"data: {self.described or self.source}: {st.kept} examples ({', '.join(dropped)} dropped), "
            f"{st.tokens} tokens, {st.trainable_tokens} trained{f' ({trained})' if trained else ''}, "
            f"longest {st.longest}" + (", packed" if packing else "")
        )


def read_chat_template(path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"chat template file {path!r} does not exist")
    return p.read_text(encoding="utf-8")


def prepare_data(
    cfg: DataConfig,
    tokenizer: Any,
    *,
    seed: int = 0,
    max_position_embeddings: int | None = None,
    progress: bool | None = None,
) -> PreparedData:
    """Examples to train on and problems to evaluate, from `cfg` (the task's splits depend on `seed`).
    `progress`: the tokenization progress bar (None: on a terminal)."""
    check_max_seq_len(cfg.max_seq_len, max_position_embeddings)
    task = get_task(task_name(DataConfig, cfg.task, "causal_lm"))
    chat_template, notes = read_chat_template(cfg.chat_template), []
    template_file = None if cfg.chat_template is None else str(Path(cfg.chat_template).resolve())
    if task is TOOLS_TASK and cfg.data is None:
        chat_template, note = tool_task_template(tokenizer, chat_template)
        if note:
            notes.append(note)
            template_file = SHIPPED_TOOL_TEMPLATE
    files = None
    if cfg.data is None:
        records = task.records("train", cfg.num_train, seed)
        source, total = f"embedded task {task.name!r}", len(records)
    else:
        files = DataFiles(cfg.data, data_format=cfg.data_format, columns=parse_columns(cfg.data_columns))
        records, source, total = files, files.name(), files.count_hint()
    examples, stats = tokenize_stream(
        tokenizer,
        records,
        max_seq_len=cfg.max_seq_len,
        overflow=cfg.overflow,
        chat_template=chat_template,
        workers=cfg.data_workers,
        progress=progress,
        total=total,
    )
    shapes: dict[str, int] = {}
    for report in files.reports if files is not None else []:
        for shape, n in report.shapes.items():
            shapes[shape] = shapes.get(shape, 0) + n
    return PreparedData(
        examples,
        stats,
        task.generate("heldout", cfg.num_eval, seed),
        source,
        chat_template=chat_template,
        template_file=template_file,
        notes=notes,
        described=files.describe() if files is not None else source,
        dropped_empty=files.dropped_empty if files is not None else 0,
        shapes=shapes if files is not None else None,
    )


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
    if cfg.data_format != "auto":
        raise ConfigError(
            DataConfig,
            "data_format",
            "is for causal LM data: classification reads {'text', 'label'} rows (other names: {data_columns})",
            ("data_columns",),
        )
    task = get_classification_task(task_name(DataConfig, cfg.task, "classification"))
    if cfg.data is None:
        rows, source = task.rows("train", cfg.num_train, seed), f"embedded classification task {task.name!r}"
    else:
        rows = read_classification_jsonl(cfg.data, parse_columns(cfg.data_columns))
        source = cfg.data[0] if len(cfg.data) == 1 else f"{cfg.data[0]} + {len(cfg.data) - 1} more"
    labels = label_names(rows)
    label2id = {name: i for i, name in enumerate(labels)}
    examples, stats = tokenize_classification(
        tokenizer, rows, label2id, max_seq_len=cfg.max_seq_len, overflow=cfg.overflow
    )
    if eval_data is not None:
        eval_rows = read_classification_jsonl(eval_data, parse_columns(cfg.data_columns))
        eval_source = f"--eval-data {eval_data}"
    elif cfg.data is None:
        eval_rows = task.rows("heldout", cfg.num_eval, seed)
        eval_source = f"{len(eval_rows)} held-out texts of task {task.name!r}"
    else:
        eval_rows, eval_source = [], "no evaluation: training on --data without --eval-data"
    label_ids(eval_rows, label2id)
    return PreparedClassification(examples, stats, labels, eval_rows, source, eval_source)
