"""Sequence-classification data: ``{"text": ..., "label": ...}`` rows (of any file `quickloris.data.sources` reads;
``--data-columns text=...,label=...`` for other names), their label set, tokenization and batches, and an embedded
task (``sentiment``) with a disjoint held-out split.

Labels are strings or integers (one kind per file; JSON ``true`` / ``1.5`` / ``""`` are refused; a CSV cell that is
an integer is read as one). The label set is
read from the training data: class ids follow the sorted labels (integers numerically, so labels 0..C-1 keep their
ids; strings in code-point order), and a class's name is its label as a string (``id2label``). A label of the
evaluation data outside that set is an error naming ``file:line``.

A tokenized row is a `quickloris.data.chat.TokenizedExample` whose ``labels`` are -100 but at the last token, which
carries the class id: the token the classifier pools on (`quickloris.models.classification`), so the example's
data fingerprint covers its class. The text is tokenized as the tokenizer does by default (special tokens
included, as transformers' text-classification pipeline does); trailing pad tokens are dropped, since transformers'
classifiers pool on the last token that is *not* the pad token (for SmolLM2, pad = EOS = ``<|im_end|>``).

`collate_classification` batches them as `quickloris.data.packing.collate` does (right-padded rows, or one packed
row with position ids restarting per text) with ``labels`` = one class id per text, in row-major order: the order
in which the classifier pools.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from quickloris.data.chat import IGNORE_INDEX, TokenizedExample, TokenizeStats, check_max_seq_len
from quickloris.data.jsonl import DataFormatError
from quickloris.data.packing import collate
from quickloris.data.shapes import rename
from quickloris.data.sources import open_source
from quickloris.data.tasks import Split, draw_split, split_of

_INT = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class ClassificationRow:
    """One text and its label (a string or an int, as in the file); `source` is ``file:line`` for messages."""

    text: str
    label: str | int
    source: str = "<memory>"

    @property
    def name(self) -> str:
        """The label as a class name (``id2label`` value)."""
        return str(self.label)


def parse_row(obj: Any, where: str = "<memory>") -> ClassificationRow:
    """Validate one decoded JSON value as a ``{"text": str, "label": str | int}`` row (errors name `where`)."""
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object with 'text' and 'label', got {type(obj).__name__}")
    missing = [k for k in ("text", "label") if k not in obj]
    if missing:
        shape = " (a chat record: classification needs {'text': ..., 'label': ...})" if "messages" in obj else ""
        raise DataFormatError(f"{where}: missing {', '.join(map(repr, missing))}{shape}")
    text, label = obj["text"], obj["label"]
    if not isinstance(text, str) or not text.strip():
        raise DataFormatError(f"{where}: 'text' must be a non-empty string, got {text!r:.60}")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
        raise DataFormatError(f"{where}: 'label' must be a non-empty string or an integer, got {label!r:.60}")
    return ClassificationRow(text, label, where)


def read_classification_jsonl(
    paths: str | Path | Sequence[str | Path], columns: Mapping[str, str] | None = None
) -> list[ClassificationRow]:
    """The rows of one or more classification data files (any file `quickloris.data.sources` reads; the name is
    historical); `columns`: ``--data-columns`` renaming (``text`` / ``label`` -> the file's columns). Every problem
    names ``file:line`` (``file:row N``)."""
    rows = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        start, source = len(rows), open_source(path)
        for obj, where in source.rows():
            obj = rename(obj, columns or {}, where)
            if source.kind == "csv" and isinstance(obj.get("label"), str) and _INT.fullmatch(obj["label"]):
                obj["label"] = int(obj["label"])  # CSV cells are strings: integer labels keep their numeric order
            rows.append(parse_row(obj, where))
        if len(rows) == start:
            raise DataFormatError(f"data file {str(path)!r} contains no rows (empty or blank lines only)")
    return rows


def label_names(rows: Sequence[ClassificationRow]) -> list[str]:
    """The sorted class names of `rows` (module docstring); at least two, labels of one kind."""
    if not rows:
        raise DataFormatError("no rows to read labels from")
    kind = type(rows[0].label)
    for r in rows:
        if type(r.label) is not kind:
            raise DataFormatError(
                f"{r.source}: label {r.label!r} is {'an int' if kind is str else 'a string'}, but "
                f"{rows[0].source} has {'a string' if kind is str else 'an int'} label; use one "
                "kind of label per file"
            )
    names = [str(x) for x in sorted({r.label for r in rows})]
    if len(names) < 2:
        raise DataFormatError(f"the data has one label only ({names[0]!r}): classification needs at least two")
    return names


def label_ids(
    rows: Sequence[ClassificationRow], label2id: Mapping[str, int], what: str = "the training data"
) -> list[int]:
    """The class id of each row; a label outside `label2id` raises naming the row's ``file:line``."""
    out = []
    for r in rows:
        i = label2id.get(r.name)
        if i is None:
            known = ", ".join(map(repr, label2id))
            raise DataFormatError(f"{r.source}: label {r.label!r} is not one of the labels of {what} ({known})")
        out.append(i)
    return out


def tokenize_classification(
    tokenizer: Any,
    rows: Sequence[ClassificationRow],
    label2id: Mapping[str, int],
    *,
    max_seq_len: int,
    overflow: Literal["drop", "error"] = "drop",
    what: str = "the training data",
) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize `rows` (module docstring); longer than `max_seq_len`: dropped (counted) or `DataFormatError`."""
    check_max_seq_len(max_seq_len)
    if overflow not in ("drop", "error"):
        raise ValueError(f"overflow must be 'drop' or 'error', got {overflow!r}")
    ids_of = label_ids(rows, label2id, what)
    pad = getattr(tokenizer, "pad_token_id", None)
    stats = TokenizeStats(records=len(rows))
    out = []
    for r, y in zip(rows, ids_of):
        ids = list(tokenizer(r.text)["input_ids"])
        while ids and pad is not None and ids[-1] == pad:
            ids.pop()
        if not ids:
            raise DataFormatError(f"{r.source}: the text tokenizes to nothing but padding")
        stats.longest = max(stats.longest, len(ids))
        if len(ids) > max_seq_len:
            if overflow == "error":
                raise DataFormatError(
                    f"{r.source}: {len(ids)} tokens, longer than max_seq_len={max_seq_len} "
                    "(raise max_seq_len or use overflow='drop')"
                )
            stats.dropped_too_long += 1
            stats.dropped_sources.append(r.source)
            continue
        out.append(TokenizedExample(ids, [IGNORE_INDEX] * (len(ids) - 1) + [y], r.source))
    stats.kept = stats.trainable_tokens = len(out)
    stats.tokens = sum(map(len, out))
    if not out:
        raise DataFormatError(f"no text fits max_seq_len={max_seq_len} (the longest has {stats.longest} tokens)")
    return out, stats


def class_of(example: TokenizedExample) -> int:
    """The class id a tokenized classification example carries (at its last token)."""
    return example.labels[-1]


def collate_classification(
    examples: Sequence[TokenizedExample],
    batch: Sequence[Sequence[int]],
    *,
    packing: bool,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """One entry of `quickloris.data.packing.epoch_batches` as a classifier's inputs (module docstring)."""
    out = collate(examples, batch, packing=packing, pad_token_id=pad_token_id)
    out["labels"] = torch.tensor([class_of(examples[i]) for row in batch for i in row], dtype=torch.long)
    return out


# ------------------------------------------------------------------------------------------------ embedded task


@dataclass(frozen=True)
class ClassificationTask:
    """A generated classification task: `sample(rng) -> (text, label)`; the text decides the split."""

    name: str
    labels: tuple[str, ...]
    sample: Callable[[random.Random], tuple[str, str]]
    description: str

    def split_of(self, text: str) -> Split:
        return split_of(self.name, text)

    def rows(self, split: Split, n: int, seed: int = 0) -> list[ClassificationRow]:
        """`n` distinct texts of `split`, the same list for the same (split, n, seed) on any machine."""
        draws = draw_split(self.name, split, n, seed, self.sample, distinct=lambda d: d[0], key=lambda d: d[0])
        return [ClassificationRow(text, label, f"{self.name}:{split}[{i}]") for i, (text, label) in enumerate(draws)]


_SUBJECTS = (
    "The movie",
    "The food",
    "This phone",
    "The hotel",
    "Our waiter",
    "The concert",
    "This book",
    "The update",
    "The weather",
    "My flight",
    "The coffee",
    "The game",
    "The show",
    "The service",
    "This laptop",
    "The lecture",
    "The trip",
    "The museum",
    "The camera",
    "The ending",
)
_VERBS = ("was", "is", "felt", "seemed")
_GOOD = (
    "wonderful",
    "great",
    "delightful",
    "excellent",
    "amazing",
    "pleasant",
    "superb",
    "fantastic",
    "lovely",
    "brilliant",
    "charming",
    "enjoyable",
)
_BAD = (
    "terrible",
    "awful",
    "disappointing",
    "horrible",
    "dreadful",
    "boring",
    "miserable",
    "poor",
    "annoying",
    "bad",
    "dull",
    "frustrating",
)
_ADVERBS = ("", "really ", "truly ", "quite ", "absolutely ", "rather ", "very ")
_ENDINGS = (".", "!", ", honestly.", ", to be fair.", " overall.")


def _sentiment(rng: random.Random) -> tuple[str, str]:
    good = rng.random() < 0.5
    negated = rng.random() < 0.25
    text = (
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)}{' not' if negated else ''} {rng.choice(_ADVERBS)}"
        f"{rng.choice(_GOOD if good else _BAD)}{rng.choice(_ENDINGS)}"
    )
    return text, "positive" if good != negated else "negative"


CLASSIFICATION_TASKS: dict[str, ClassificationTask] = {
    "sentiment": ClassificationTask(
        "sentiment",
        ("negative", "positive"),
        _sentiment,
        "sentiment of a generated review sentence, a quarter of them negated, e.g. "
        "'The coffee was not really great!' -> negative",
    ),
}
DEFAULT_CLASSIFICATION_TASK = "sentiment"


def get_classification_task(name: str) -> ClassificationTask:
    try:
        return CLASSIFICATION_TASKS[name]
    except KeyError:
        raise ValueError(
            f"unknown classification task {name!r}; choose one of {', '.join(sorted(CLASSIFICATION_TASKS))}"
        ) from None


def write_classification_jsonl(rows: Sequence[ClassificationRow], path: str | Path) -> None:
    """Write `rows` as ``{"text", "label"}`` lines (the format `read_classification_jsonl` reads), atomically."""
    from quickloris.utils.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps({"text": r.text, "label": r.label}) + "\n" for r in rows))
