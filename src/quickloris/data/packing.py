"""Batches: padding-free packing and plain right padding, plus a deterministic, resumable batch plan.

Packing (padding-free). Examples are concatenated into one row ``[1, N]`` with ``position_ids`` restarting
at 0 for each example. That is the Hugging Face convention: with ``attention_mask=None``, transformers'
mask builders see the restarts and make the causal mask block-diagonal (eager / SDPA / flex) -- provided
no KV cache is passed, hence ``use_cache=False`` in the batch -- and the flash-attention paths take
``cu_seq_lens_q/k`` + ``max_length_q/k`` (returned too, HF's names).
Labels never cross examples: the loss predicts ``labels[t + 1]`` from position ``t`` (HF shifts inside the
loss), so the first label of every example is set to -100; otherwise example k's first token would be
trained as a continuation of example k-1. Cost: no FLOPs on padding; the mask is block-diagonal, so
attention cost is sum(L_i^2), not N^2, on the varlen paths.

Padding. Rows padded on the right to the longest example (optionally to a multiple of
``pad_to_multiple_of``); ``attention_mask`` is 0 and ``labels`` -100 on padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from quickloris.data.chat import IGNORE_INDEX, TokenizedExample


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def pack_greedy(lengths: Sequence[int], max_seq_len: int) -> list[list[int]]:
    """Group example indices, in order, into rows of at most `max_seq_len` tokens (next-fit).

    Order is kept (so a seeded shuffle upstream fully decides the batches); an example longer than
    `max_seq_len` raises, since it cannot be split without cutting a sequence in two.
    """
    _check_positive_int(max_seq_len, "max_seq_len")
    rows: list[list[int]] = []
    used = max_seq_len + 1
    for i, n in enumerate(lengths):
        if n > max_seq_len:
            raise ValueError(f"example {i} has {n} tokens, more than max_seq_len={max_seq_len}")
        if n == 0:
            raise ValueError(f"example {i} is empty")
        if used + n > max_seq_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def collate_packed(examples: Sequence[TokenizedExample]) -> dict[str, Any]:
    """Concatenate `examples` into one padding-free row.

    Returns ``input_ids``, ``labels``, ``position_ids`` (int64, ``[1, N]``), ``cu_seq_lens_q`` /
    ``cu_seq_lens_k`` (int32 ``[n + 1]``, cumulative lengths starting at 0), ``max_length_q`` /
    ``max_length_k`` (Python ints) and ``use_cache=False``: all HF causal-LM ``forward`` arguments, so
    ``model(**batch)`` is right. ``use_cache`` matters: transformers only detects packed sequences from
    ``position_ids`` when there is no KV cache, and an eval-mode model makes one by default, silently
    attending across examples.
    """
    if not examples:
        raise ValueError("collate_packed needs at least one example")
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    cu = [0]
    for ex in examples:
        if len(ex) == 0:
            raise ValueError(f"{ex.source}: empty example")
        ids += ex.input_ids
        labels += [IGNORE_INDEX] + ex.labels[1:]  # never predicted from the previous example's last token
        pos += range(len(ex))
        cu.append(cu[-1] + len(ex))
    longest = max(map(len, examples))
    cu_t = torch.tensor(cu, dtype=torch.int32)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "cu_seq_lens_q": cu_t,
        "cu_seq_lens_k": cu_t.clone(),
        "max_length_q": longest,
        "max_length_k": longest,
        # With a KV cache HF skips its packed-sequence detection and attends across examples.
        "use_cache": False,
    }


def seq_lens(cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """Lengths of the packed examples from cumulative lengths (``cu[1:] - cu[:-1]``)."""
    return cu_seq_lens[1:] - cu_seq_lens[:-1]


def block_causal_mask(cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """Boolean ``[1, 1, N, N]`` mask (True = may attend): causal within each packed example, nothing across.

    For attention code that takes an explicit mask; HF models build the same mask themselves from
    ``position_ids`` when ``attention_mask`` is None.
    """
    lens = seq_lens(cu_seq_lens.long())
    seg = torch.repeat_interleave(torch.arange(len(lens)), lens)
    n = int(lens.sum())
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return (causal & (seg[:, None] == seg[None, :]))[None, None]


def collate_padded(
    examples: Sequence[TokenizedExample], pad_token_id: int, *, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad `examples` to one ``[B, L]`` batch: ``input_ids``, ``attention_mask``, ``labels``."""
    if not examples:
        raise ValueError("collate_padded needs at least one example")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise TypeError(f"pad_token_id must be an int (the tokenizer's pad or eos id), got {pad_token_id!r}")
    longest = max(map(len, examples))
    if pad_to_multiple_of is not None:
        m = _check_positive_int(pad_to_multiple_of, "pad_to_multiple_of")
        longest = -(-longest // m) * m
    ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex)
        if n == 0:
            raise ValueError(f"{ex.source}: empty example")
        ids[b, :n] = torch.tensor(ex.input_ids)
        labels[b, :n] = torch.tensor(ex.labels)
        mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def epoch_batches(
    lengths: Sequence[int],
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    packing: bool = False,
    max_seq_len: int | None = None,
) -> list[list[list[int]]]:
    """The batches of one epoch as example indices: ``batches[step][row] -> [example indices]``.

    A pure function of its arguments (the shuffle uses a generator seeded with ``(seed, epoch)``), so a
    resumed run rebuilds exactly the batches an uninterrupted run would have seen and skips the ones
    already done. Without packing each row holds one example and a batch `batch_size` rows; with packing
    the shuffled examples are packed into rows of <= `max_seq_len` tokens and a batch is `batch_size`
    rows. The last batch may be smaller.
    """
    _check_positive_int(batch_size, "batch_size")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
    if not lengths:
        raise ValueError("no examples to batch")
    order = list(range(len(lengths)))
    if shuffle:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
        order = torch.randperm(len(lengths), generator=g).tolist()
    if packing:
        if max_seq_len is None:
            raise ValueError("packing needs max_seq_len")
        rows = [[order[j] for j in row] for row in pack_greedy([lengths[i] for i in order], max_seq_len)]
    else:
        rows = [[i] for i in order]
    return [rows[k : k + batch_size] for k in range(0, len(rows), batch_size)]


def collate(
    examples: Sequence[TokenizedExample],
    batch: Sequence[Sequence[int]],
    *,
    packing: bool,
    pad_token_id: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Any]:
    """Collate one entry of `epoch_batches`: packed rows are flattened into a single padding-free row."""
    chosen = [examples[i] for row in batch for i in row]
    if packing:
        return collate_packed(chosen)
    return collate_padded(chosen, pad_token_id, pad_to_multiple_of=pad_to_multiple_of)  # type: ignore[arg-type]
