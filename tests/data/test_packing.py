"""Packing: a packed row gives each example the logits and loss it gets alone (HF's own mask detection from
restarting position_ids); labels never cross examples. Padding: right-padded, masked. Batch plans repeat."""

from __future__ import annotations

import random

import pytest
import torch

from quickloris.data.chat import IGNORE_INDEX, TokenizedExample
from quickloris.data.packing import (
    block_causal_mask,
    collate,
    collate_packed,
    collate_padded,
    epoch_batches,
    pack_greedy,
    seq_lens,
)

VOCAB = 97


def _examples(rng, n, lo=1, hi=13):
    out = []
    for k in range(n):
        length = rng.randint(lo, hi)
        ids = [rng.randrange(VOCAB) for _ in range(length)]
        cut = rng.randint(0, length)  # prompt = ids[:cut]
        out.append(TokenizedExample(ids, [IGNORE_INDEX] * cut + ids[cut:], f"ex{k}"))
    return out


@pytest.fixture(scope="module")
def tiny_llama():
    from tests.tiny import tiny_model

    return tiny_model(seed=0, vocab_size=VOCAB, max_position_embeddings=128, attn_implementation="sdpa").eval()


def test_pack_greedy_properties(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 20) for _ in range(rng.randint(1, 60))]
    max_len = rng.randint(20, 50)
    rows = pack_greedy(lengths, max_len)
    assert [i for row in rows for i in row] == list(range(len(lengths)))  # every example once, in order
    assert all(sum(lengths[i] for i in row) <= max_len for row in rows)
    # next-fit: a row was closed only because the next example did not fit
    assert all(sum(lengths[i] for i in a) + lengths[b[0]] > max_len for a, b in zip(rows, rows[1:]))
    with pytest.raises(ValueError, match="example 1 has 9 tokens, more than max_seq_len=8"):
        pack_greedy([3, 9], 8)
    with pytest.raises(ValueError, match="max_seq_len must be a positive int"):
        pack_greedy([3], 0)


def test_collate_packed_layout():
    a = TokenizedExample([5, 6, 7], [IGNORE_INDEX, 6, 7])
    b = TokenizedExample([8, 9], [8, 9])  # a fully-trained example: its first label must still be dropped
    c = TokenizedExample([4], [4])
    batch = collate_packed([a, b, c])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9, IGNORE_INDEX]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 6] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 3
    assert seq_lens(batch["cu_seq_lens_k"]).tolist() == [3, 2, 1]
    assert batch["use_cache"] is False
    with pytest.raises(ValueError, match="at least one example"):
        collate_packed([])


def test_block_causal_mask_matches_naive(seed):
    rng = random.Random(seed)
    lens = [rng.randint(1, 6) for _ in range(rng.randint(1, 5))]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    seg = [k for k, n in enumerate(lens) for _ in range(n)]
    n = sum(lens)
    want = [[seg[q] == seg[k] and k <= q for k in range(n)] for q in range(n)]
    assert block_causal_mask(cu)[0, 0].tolist() == want


def test_packed_forward_equals_separate(tiny_llama, seed):
    """Logits of each example inside a packed row == its logits alone; the packed loss == the token-weighted
    mean of the per-example losses (no term predicts one example's first token from another's last)."""
    rng = random.Random(seed)
    exs = _examples(rng, rng.randint(2, 6))
    last = exs[-1]  # fully trained: without the boundary fix its first token would be a cross-example target
    exs[-1] = TokenizedExample(last.input_ids + [1], last.input_ids + [1], last.source)
    batch = collate_packed(exs)
    with torch.no_grad():
        out = tiny_llama(**batch)  # eval mode: without the batch's use_cache=False this attends across examples
        total_loss, total_n, start = 0.0, 0, 0
        for ex in exs:
            ids = torch.tensor([ex.input_ids])
            alone = tiny_llama(input_ids=ids).logits[0]
            torch.testing.assert_close(out.logits[0, start : start + len(ex)], alone, rtol=1e-4, atol=1e-5)
            targets = torch.tensor(ex.labels[1:])
            if (targets != IGNORE_INDEX).any():
                total_loss += torch.nn.functional.cross_entropy(
                    alone[:-1], targets, reduction="sum", ignore_index=IGNORE_INDEX
                ).item()
                total_n += int((targets != IGNORE_INDEX).sum())
            start += len(ex)
    # HF's loss predicts labels[t + 1] from t: exactly the per-example targets, none across a boundary
    assert int((batch["labels"][0, 1:] != IGNORE_INDEX).sum()) == total_n > 0
    assert out.loss.item() * total_n == pytest.approx(total_loss, rel=1e-5)


def test_padded_forward_equals_separate(tiny_llama, seed):
    rng = random.Random(seed)
    exs = _examples(rng, 4, lo=2)
    batch = collate_padded(exs, pad_token_id=0)
    assert batch["input_ids"].shape == (4, max(map(len, exs)))
    with torch.no_grad():
        logits = tiny_llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for b, ex in enumerate(exs):
            n = len(ex)
            assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
            assert set(batch["labels"][b, n:].tolist()) <= {IGNORE_INDEX}
            alone = tiny_llama(input_ids=torch.tensor([ex.input_ids])).logits[0]
            torch.testing.assert_close(logits[b, :n], alone, rtol=1e-4, atol=1e-5)


def test_collate_padded_options():
    exs = [TokenizedExample([1, 2, 3], [IGNORE_INDEX, 2, 3]), TokenizedExample([4], [4])]
    batch = collate_padded(exs, pad_token_id=9, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 9], [4, 9, 9, 9]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX], [4] + [IGNORE_INDEX] * 3]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    with pytest.raises(TypeError, match="pad_token_id must be an int"):
        collate_padded(exs, pad_token_id=None)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        collate_padded(exs, pad_token_id=0, pad_to_multiple_of=0)


@pytest.mark.parametrize("packing", [False, True])
def test_epoch_batches_deterministic_and_complete(packing, seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 30) for _ in range(rng.randint(5, 80))]
    kw = dict(batch_size=3, seed=seed, packing=packing, max_seq_len=40)
    e0 = epoch_batches(lengths, epoch=0, **kw)
    assert e0 == epoch_batches(lengths, epoch=0, **kw)  # a resumed run rebuilds the same batches
    flat = sorted(i for b in e0 for row in b for i in row)
    assert flat == list(range(len(lengths)))
    assert all(len(b) <= 3 for b in e0) and all(len(b) == 3 for b in e0[:-1])
    if packing:
        assert all(sum(lengths[i] for i in row) <= 40 for b in e0 for row in b)
    else:
        assert all(len(row) == 1 for b in e0 for row in b)
    if len(lengths) > 8:
        assert e0 != epoch_batches(lengths, epoch=1, **kw)  # reshuffled every epoch
    unshuffled = epoch_batches(lengths, epoch=0, shuffle=False, **kw)
    assert [i for b in unshuffled for row in b for i in row] == list(range(len(lengths)))


def test_epoch_batches_errors_and_collate():
    with pytest.raises(ValueError, match="packing needs max_seq_len"):
        epoch_batches([3], batch_size=1, seed=0, epoch=0, packing=True)
    with pytest.raises(ValueError, match="batch_size"):
        epoch_batches([3], batch_size=0, seed=0, epoch=0)
    with pytest.raises(ValueError, match="epoch"):
        epoch_batches([3], batch_size=1, seed=0, epoch=-1)
    with pytest.raises(ValueError, match="no examples"):
        epoch_batches([], batch_size=1, seed=0, epoch=0)
    exs = [TokenizedExample([1, 2], [1, 2]), TokenizedExample([3], [3]), TokenizedExample([4, 5, 6], [4, 5, 6])]
    packed = collate(exs, [[2, 0], [1]], packing=True)
    assert packed["input_ids"].tolist() == [[4, 5, 6, 1, 2, 3]]
    padded = collate(exs, [[2], [1]], packing=False, pad_token_id=0)
    assert padded["input_ids"].tolist() == [[4, 5, 6], [3, 0, 0]]
