"""Tokenizing a record stream: worker processes give exactly the examples, order, statistics and first error of one
process; records are pulled one at a time; the progress bar shows only when asked (or on a terminal)."""

from __future__ import annotations

import random

import pytest

from quickloris.data.chat import tokenize_records
from quickloris.data.errors import DataFormatError
from quickloris.data.jsonl import Record
from quickloris.data.pipeline import CHUNK, tokenize_stream
from tests.data.conftest import CHATML


def _records(n, rng):
    out = []
    for i in range(n):
        a, b = rng.randrange(1000), rng.randrange(1000)
        kind = i % 3
        if kind == 0:
            msgs = ({"role": "user", "content": f"{a} + {b}"}, {"role": "assistant", "content": str(a + b)})
            out.append(Record(messages=msgs, source=f"f:{i}"))
        elif kind == 1:
            out.append(Record(prompt=f"{a} + {b} =", completion=f" {a + b}", source=f"f:{i}"))
        else:
            out.append(Record(text=f"The answer is {a * b}. " * rng.randrange(1, 4), source=f"f:{i}"))
    return out


def test_workers_give_the_examples_of_one_process(tiny_tokenizer, seed):
    rng = random.Random(seed)
    records = _records(3 * CHUNK + 17, rng)  # several chunks in flight, the last one short
    one, st1 = tokenize_stream(tiny_tokenizer, records, max_seq_len=30, workers=1)
    two, st2 = tokenize_stream(tiny_tokenizer, iter(records), max_seq_len=30, workers=2)
    assert st1.dropped_too_long > 0 and st1.kept > 0  # some of the long text rows are dropped
    assert one == two and st1 == st2
    # the same as the list API of quickloris.data.chat
    ref, st_ref = tokenize_records(tiny_tokenizer, records, max_seq_len=30)
    assert ref == one
    assert (st_ref.kept, st_ref.tokens, st_ref.trainable_tokens) == (st1.kept, st1.tokens, st1.trainable_tokens)
    bad = records[: 2 * CHUNK] + [Record(text="x " * 200, source="long:1")] + records[2 * CHUNK :]
    with pytest.raises(DataFormatError, match=r"long:1: \d+ tokens, longer than --max-seq-len 64"):
        tokenize_stream(tiny_tokenizer, bad, max_seq_len=64, overflow="error")
    # an error met in a worker is raised in the parent, the first in record order (a later chunk may fail first)
    first, later = (Record(messages=({"role": "assistant", "content": "x"},), source=f"tpl:{i}") for i in (1, 2))
    template = "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('no') }}{% endif %}" + CHATML
    bad = records[: CHUNK + 200] + [first] + records[CHUNK + 200 : 2 * CHUNK] + [later]
    with pytest.raises(DataFormatError, match="tpl:1: the chat template failed"):
        tokenize_stream(tiny_tokenizer, bad, max_seq_len=64, workers=2, chat_template=template)


class _Watching:
    """A tokenizer that checks, when it tokenizes row i, that the stream has handed out rows 0..i only."""

    def __init__(self, tokenizer, pulled):
        self._tok, self._pulled = tokenizer, pulled

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, text, **kw):
        if text.startswith("row "):
            assert self._pulled[0] == int(text.split()[1]) + 1, "records were read ahead of tokenization"
        return self._tok(text, **kw)


def test_records_are_pulled_one_at_a_time(tiny_tokenizer):
    pulled = [0]

    def stream():
        for i in range(50):
            pulled[0] = i + 1
            yield Record(text=f"row {i} of many", source=f"f:{i}")

    examples, stats = tokenize_stream(_Watching(tiny_tokenizer, pulled), stream(), max_seq_len=64)
    assert stats.records == stats.kept == 50 and pulled[0] == 50
    # text records: every token is a label, the tokenizer's BOS before, EOS appended (TRL's convention)
    ids = examples[0].input_ids
    assert examples[0].labels == ids and ids[-1] == tiny_tokenizer.eos_token_id and ids.count(ids[-1]) == 1
    assert ids[0] == tiny_tokenizer.convert_tokens_to_ids("<|bos|>")
    assert tiny_tokenizer.decode(ids[1:-1]) == "row 0 of many"


def test_progress_bar_only_when_asked(tiny_tokenizer, capsys):
    records = [Record(text="The answer is 42.", source=f"f:{i}") for i in range(5)]
    tokenize_stream(tiny_tokenizer, records, max_seq_len=64)  # stderr is not a terminal under pytest
    tokenize_stream(tiny_tokenizer, records, max_seq_len=64, progress=False)
    assert capsys.readouterr().err == ""
    tokenize_stream(tiny_tokenizer, records, max_seq_len=64, progress=True, total=5)
    err = capsys.readouterr().err
    assert "tokenize" in err and "5/5" in err


def test_bad_arguments_and_nothing_to_train(tiny_tokenizer):
    rec = [Record(text="abc")]
    with pytest.raises(ValueError, match="workers must be a positive int"):
        tokenize_stream(tiny_tokenizer, rec, max_seq_len=8, workers=0)
    with pytest.raises(ValueError, match="overflow must be"):
        tokenize_stream(tiny_tokenizer, rec, max_seq_len=8, overflow="cut")
    with pytest.raises(DataFormatError, match="no records to tokenize"):
        tokenize_stream(tiny_tokenizer, [], max_seq_len=8)
    with pytest.raises(DataFormatError, match=r"no example fits --max-seq-len 2 \(the longest has"):
        tokenize_stream(tiny_tokenizer, rec, max_seq_len=2)


class _Unpicklable:
    def __init__(self, tokenizer):
        self._tok, self._hook = tokenizer, lambda: None  # a lambda does not pickle

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, text, **kw):
        return self._tok(text, **kw)


def test_a_tokenizer_that_cannot_reach_the_workers_is_one_line(tiny_tokenizer):
    with pytest.raises(ValueError, match="--data-workers 2: the tokenizer cannot be sent to another process"):
        tokenize_stream(_Unpicklable(tiny_tokenizer), [Record(text="abc")] * 3, max_seq_len=64, workers=2)
