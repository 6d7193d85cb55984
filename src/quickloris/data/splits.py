"""Train / held-out splits of generated problems, stable on any machine (the embedded LM tasks, the tool-calling
task and the classification tasks share them)."""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from typing import Literal

Split = Literal["train", "heldout"]
_HELDOUT_MOD = 8  # 1 problem in 8 is held out


def split_of(task: str, key: str) -> Split:
    """The split of a generated item: held out iff crc32("task:key") % 8 == 0 (stable on any machine)."""
    return "heldout" if zlib.crc32(f"{task}:{key}".encode()) % _HELDOUT_MOD == 0 else "train"


def draw_split(
    task: str,
    split: Split,
    n: int,
    seed: int,
    sample: Callable[[random.Random], tuple],
    *,
    distinct: Callable[[tuple], str],
    key: Callable[[tuple], str],
) -> list[tuple]:
    """`n` draws of `sample` whose `key` lies in `split` and whose `distinct` value is new, from an RNG seeded by
    (task, split, seed): the same list for the same arguments on any machine (shared by the embedded LM tasks and
    the classification tasks)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    rng = random.Random(f"quickloris:{task}:{split}:{int(seed)}")  # str seeds hash stably (sha512)
    out: list[tuple] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 10_000:
            raise ValueError(f"task {task!r} cannot produce {n} distinct {split} examples")
        draw = sample(rng)
        if distinct(draw) in seen or split_of(task, key(draw)) != split:
            continue
        seen.add(distinct(draw))
        out.append(draw)
    return out
