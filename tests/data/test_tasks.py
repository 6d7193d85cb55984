"""Embedded tasks: deterministic, correct answers, train / held-out disjoint for every seed."""

from __future__ import annotations

import pytest

from quickloris.data.jsonl import load_jsonl
from quickloris.data.tasks import DEFAULT_TASK, TASKS, exact_match, extract_answer, get_task, write_jsonl


def test_deterministic_per_seed_and_split():
    task = get_task(DEFAULT_TASK)
    a = task.generate("train", 50, seed=3)
    assert a == task.generate("train", 50, seed=3)
    assert a[:20] == task.generate("train", 20, seed=3)  # a longer run extends a shorter one
    assert a != task.generate("train", 50, seed=4)
    assert len({ex.question for ex in a}) == 50


def test_addition_answers_and_format():
    for ex in get_task("addition").generate("heldout", 100, seed=0):
        left, right = ex.question.split(" + ")
        assert 100 <= int(left) <= 999 and 100 <= int(right) <= 999
        assert ex.answer == str(int(left) + int(right))
        assert ex.instruction == "Add the two numbers."


def test_reverse_answers():
    for ex in get_task("reverse").generate("train", 100, seed=1):
        assert ex.answer == ex.question[::-1] and ex.question.isdigit() and 5 <= len(ex.question) <= 7


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_disjoint_for_any_seeds(name, seed):
    """Held-out problems never appear in training, whatever seeds the two splits were drawn with (for addition
    not even with the operands swapped)."""
    task = get_task(name)
    s1, s2 = seed % 1000, (seed // 1000) % 1000
    train = task.generate("train", 2000, seed=s1)
    held = task.generate("heldout", 300, seed=s2)

    def key(ex):
        return frozenset(ex.question.split(" + ")) if name == "addition" else ex.question

    assert not {key(e) for e in train} & {key(e) for e in held}
    if name == "addition":  # the commuted twin of a held-out problem is held out too
        twin = {f"{b} + {a}" for a, b in (e.question.split(" + ") for e in held)}
        assert not twin & {e.question for e in train}


def test_messages_and_records():
    ex = get_task("addition").generate("train", 1)[0]
    assert [m["role"] for m in ex.messages()] == ["system", "user", "assistant"]
    assert ex.prompt_messages() == ex.messages()[:2]
    rec = get_task("addition").records("train", 3)[2]
    assert rec.is_chat and rec.source == "addition:train[2]"


def test_answer_extraction_and_exact_match():
    assert extract_answer("  865\n") == "865"
    assert extract_answer("\n\n865\nbecause ...") == "865"
    assert extract_answer("") == ""
    assert exact_match("865", "865") and exact_match(" 865 \nThe sum.", "865")
    assert not exact_match("8650", "865") and not exact_match("The answer is 865", "865")
    assert not exact_match("865.", "865") and not exact_match("", "865")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown task 'nope'; choose one of addition, reverse"):
        get_task("nope")
    with pytest.raises(ValueError, match="split must be"):
        get_task("addition").generate("test", 3)
    with pytest.raises(ValueError, match="positive int"):
        get_task("addition").generate("train", 0)


def test_jsonl_round_trip(tmp_path):
    examples = get_task("reverse").generate("train", 5, seed=2)
    write_jsonl(examples, tmp_path / "reverse.jsonl")
    recs = load_jsonl(tmp_path / "reverse.jsonl")
    assert [list(r.messages) for r in recs] == [ex.messages() for ex in examples]
