"""Tokenizing a stream of records: in this process or in worker processes, with a progress bar.

`tokenize_stream` reads the records lazily (a file is never held whole: only the tokenized examples are kept) and
applies the rules of `quickloris.data.chat.tokenize_records`: an example longer than ``max_seq_len`` is dropped and
counted, or raises with ``overflow="error"``; a dataset with nothing left, or no trained token, raises.

With ``workers > 1`` the records are tokenized in chunks by that many processes (started with ``spawn``: a forked
child would inherit the parent's threads and the Rust tokenizer's thread pool). Chunks are handed out as results
come back, at most ``2 * workers`` in flight, and their results are taken in submission order, so the examples,
their order, the statistics and the first error are those of one process.

The progress bar (tqdm, on stderr) shows records tokenized; by default only when stderr is a terminal.
"""

from __future__ import annotations

import multiprocessing
import pickle
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from typing import Any, Literal

from quickloris.data.chat import TokenizedExample, TokenizeStats, check_max_seq_len, tokenize_record
from quickloris.data.errors import DataFormatError
from quickloris.data.jsonl import Record

CHUNK = 256  # records per task handed to a worker: large enough to amortise pickling, small for an even spread
_worker: dict[str, Any] = {}


def _init_worker(tokenizer: Any, chat_template: str | None) -> None:
    _worker.update(tokenizer=tokenizer, chat_template=chat_template)


def _tokenize_chunk(records: list[Record]) -> list[TokenizedExample]:
    tok, template = _worker["tokenizer"], _worker["chat_template"]
    return [tokenize_record(tok, r, chat_template=template) for r in records]


def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    it = iter(records)
    while chunk := list(islice(it, size)):
        yield chunk


def tokenized(
    tokenizer: Any, records: Iterable[Record], *, chat_template: str | None = None, workers: int = 1
) -> Iterator[TokenizedExample]:
    """The examples of `records`, in order, tokenized here (``workers=1``) or by `workers` processes."""
    if workers == 1:
        for r in records:
            yield tokenize_record(tokenizer, r, chat_template=chat_template)
        return
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(tokenizer, chat_template),
    )
    pending: deque[Future] = deque()

    def result(future: Future) -> list[TokenizedExample]:
        try:
            return future.result()
        except BrokenProcessPool as e:  # a worker could not start (e.g. the tokenizer does not pickle) or died
            raise ValueError(
                f"--data-workers {workers}: a tokenizing process failed ({e}); use --data-workers 1"
            ) from None

    try:
        for chunk in _chunks(records, CHUNK):
            try:  # the first submit starts the workers, pickling the tokenizer for them
                pending.append(pool.submit(_tokenize_chunk, chunk))
            except (pickle.PicklingError, AttributeError, TypeError) as e:
                raise ValueError(
                    f"--data-workers {workers}: the tokenizer cannot be sent to another process ({e}); "
                    "use --data-workers 1"
                ) from None
            while len(pending) >= 2 * workers:
                yield from result(pending.popleft())
        while pending:
            yield from result(pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _show_progress(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def tokenize_stream(
    tokenizer: Any,
    records: Iterable[Record],
    *,
    max_seq_len: int,
    overflow: Literal["drop", "error"] = "drop",
    chat_template: str | None = None,
    workers: int = 1,
    progress: bool | None = None,
    total: int | None = None,
) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize `records` (module docstring). `progress`: show a bar (None: when stderr is a terminal); `total`:
    the number of records, for the bar, when known."""
    from tqdm.auto import tqdm

    check_max_seq_len(max_seq_len)
    if overflow not in ("drop", "error"):
        raise ValueError(f"overflow must be 'drop' or 'error', got {overflow!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    stats = TokenizeStats()
    out: list[TokenizedExample] = []
    bar = tqdm(
        total=total, desc="tokenize", unit="rec", disable=not _show_progress(progress), file=sys.stderr,
        dynamic_ncols=True,
    )  # fmt: skip
    with bar:
        for ex in tokenized(tokenizer, records, chat_template=chat_template, workers=workers):
            bar.update(1)
            stats.records += 1
            stats.longest = max(stats.longest, len(ex))
            if len(ex) > max_seq_len:
                if overflow == "error":
                    raise DataFormatError(
                        f"{ex.source}: {len(ex)} tokens, longer than --max-seq-len {max_seq_len} "
                        "(raise it, or drop such examples with --overflow drop)"
                    )
                stats.dropped_too_long += 1
                stats.dropped_sources.append(ex.source)
                continue
            out.append(ex)
            stats.tokens += len(ex)
            stats.trainable_tokens += ex.num_trainable
    stats.kept = len(out)
    if not out:
        raise DataFormatError(
            f"no example fits --max-seq-len {max_seq_len} (the longest has {stats.longest} tokens)"
            if stats.records
            else "no records to tokenize"
        )
    if stats.trainable_tokens == 0:
        raise DataFormatError(
            f"the dataset has no trainable tokens ({stats.kept} examples, {stats.tokens} tokens, "
            "all masked): check that the records have assistant turns / completions"
        )
    return out, stats
