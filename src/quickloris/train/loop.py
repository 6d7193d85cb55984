"""The training loop: AdamW on the LoRA matrices, exact token-normalised gradient accumulation, resumable.

One optimizer step ``s`` consumes micro-batches ``k = s·A … s·A + A - 1`` (``A`` = `grad_accum`) of an endless
stream of epochs; epoch ``e``'s batches are `quickloris.data.packing.epoch_batches(..., seed, epoch=e)`, a pure
function of the seed, so the data position of a run is just ``k`` and a resumed run sees exactly the batches an
uninterrupted one would.

Loss of a step. With ``N`` = the trained-token count of all A micro-batches (labels != -100 after the one-token
shift) and ``ℓ_t`` the cross-entropy of token t, each micro-batch contributes ``Σ_{t ∈ micro-batch} ℓ_t / N``
(the model is called with ``num_items_in_batch = N``), so the accumulated gradient is exactly the gradient of
``(1/N) Σ_{t ∈ step} ℓ_t``: one large batch's mean, however the tokens fall into micro-batches (a per-micro-batch
mean would over-weight micro-batches with few trained tokens).

Only labelled positions reach the head: the union ``P`` of positions whose next-token label is set (in any row)
is passed as ``logits_to_keep=P`` with ``shift_labels`` = the shifted labels at ``P``. The decoder still runs on
every position (attention needs them); the [tokens, vocab] projection and loss run on |P| positions only: for the
embedded chat tasks ~5 of ~33 positions, ~20 % of a CPU step for SmolLM2 (docs/demo-design.md).

Learning rate at step s (0-based) with warm-up W over T steps: ``lr·(s+1)/(W+1)`` for s < W, then
``lr·f(p)`` with ``p = (s-W)/(T-W)``: cosine ``f = (1+cos πp)/2``, linear ``f = 1-p``, constant ``f = 1``. It is
a function of s alone, so the schedule's whole state is the step counter.

The objective (`CausalLM`: the loss above; `quickloris.train.classify.Classification`: one class per text, ``N`` =
the step's labelled texts) collates the micro-batches, counts what a step's loss is normalised by, and computes a
micro-batch's share of it.

Divergence: a step whose loss or gradient norm is not finite (with trained tokens) raises `TrainingDiverged` before
the optimizer steps, so the weights stay those of the step before; its record (non-finite values) is kept. Under
FSDP both numbers are the all-reduced ones, the same on every rank, so all ranks stop at the same step.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from quickloris.config import ConfigError
from quickloris.data.chat import IGNORE_INDEX, TokenizedExample
from quickloris.data.packing import collate, epoch_batches
from quickloris.models.chunked_loss import shift_for_causal_lm
from quickloris.train.config import TrainConfig


class TrainingDiverged(RuntimeError):
    """Training stopped at `step` because `what` (the loss, the gradient norm, a weight) was `value`."""

    exit_code = 1  # `quickloris train`: one line, no traceback, exit status 1
    reported_elsewhere = False  # True on FSDP ranks other than 0: rank 0 prints the line

    def __init__(self, step: int, what: str, value: float, checkpoint: str | None = None):
        super().__init__(step, what, value, checkpoint)
        self.step, self.what, self.value, self.checkpoint = step, what, value, checkpoint

    def __str__(self) -> str:
        last = f"last good checkpoint {self.checkpoint}" if self.checkpoint else "no checkpoint was saved"
        return (
            f"training diverged at step {self.step}: {self.what} is {self.value}; {last}; try a lower --lr "
            "(or --max-grad-norm) in a new run"
        )


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: where it stopped and the checkpoint to continue from."""

    def __init__(self, step: int, checkpoint: str | None):
        super().__init__(step, checkpoint)
        self.step, self.checkpoint = step, checkpoint

    def __str__(self) -> str:
        if self.checkpoint is None:
            return f"interrupted at step {self.step}; no checkpoint was saved yet, so a new run starts over"
        return f"interrupted at step {self.step}; last checkpoint {self.checkpoint}; continue with --resume"


def lr_at(step: int, *, lr: float, schedule: str, warmup: int, total: int) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total` (see the module docstring)."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if schedule == "constant":
        return lr
    p = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "linear":
        return lr * (1.0 - p)
    raise ValueError(f"lr_schedule must be cosine, linear or constant, got {schedule!r}")


class BatchStream:
    """Micro-batch ``k`` of the endless sequence of epochs (one epoch's plan kept at a time)."""

    def __init__(
        self,
        examples: Sequence[TokenizedExample],
        *,
        batch_size: int,
        seed: int,
        packing: bool,
        max_seq_len: int | None,
    ):
        self.examples = examples
        self.lengths = [len(e) for e in examples]
        self.kw = dict(batch_size=batch_size, seed=seed, packing=packing, max_seq_len=max_seq_len)
        self._epoch, self._plan = 0, epoch_batches(self.lengths, epoch=0, **self.kw)
        # With packing, how many rows (so batches) an epoch has depends on its shuffle: counted per epoch.
        self._starts = [0, len(self._plan)]

    def _plan_of(self, epoch: int) -> list:
        if epoch != self._epoch:
            self._epoch, self._plan = epoch, epoch_batches(self.lengths, epoch=epoch, **self.kw)
        return self._plan

    def epoch_start(self, epoch: int) -> int:
        """Index of the first micro-batch of `epoch`."""
        while len(self._starts) <= epoch:
            n = len(epoch_batches(self.lengths, epoch=len(self._starts) - 1, **self.kw))
            self._starts.append(self._starts[-1] + n)
        return self._starts[epoch]

    def locate(self, k: int) -> tuple[int, int]:
        """(epoch, index within the epoch) of micro-batch `k`."""
        epoch = 0
        while self.epoch_start(epoch + 1) <= k:
            epoch += 1
        return epoch, k - self.epoch_start(epoch)

    def get(self, k: int) -> list[list[int]]:
        epoch, i = self.locate(k)
        return self._plan_of(epoch)[i]


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """``labels[:, t + 1]`` at position t (-100 at the end): what the logits at t are scored against."""
    return shift_for_causal_lm(labels, IGNORE_INDEX)


def micro_batch_loss(
    model: torch.nn.Module, batch: dict[str, Any], num_items: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``Σ ℓ_t / num_items`` over this micro-batch's trained tokens (None if it has none), head on labelled
    positions only (`keep`: those positions, when the caller computed them over a larger batch)."""
    targets = shifted_labels(batch["labels"])
    if keep is None:
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    if keep.numel() == 0:
        return None
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(
        **inputs,
        labels=batch["labels"],
        logits_to_keep=keep,
        shift_labels=targets[:, keep].contiguous(),
        num_items_in_batch=num_items,
    )
    return out.loss


class CausalLM:
    """Next-token cross-entropy on the labelled (response) tokens: the module docstring's loss."""

    name = "causal_lm"

    def collate(
        self, examples: Sequence[TokenizedExample], batch: Any, *, packing: bool, pad_token_id: int
    ) -> dict[str, Any]:
        return collate(examples, batch, packing=packing, pad_token_id=pad_token_id)

    def count(self, batch: dict[str, Any]) -> int:
        """What the step's loss is normalised by: the micro-batch's trained tokens."""
        return int((shifted_labels(batch["labels"]) != IGNORE_INDEX).sum())

    def keep(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The positions every rank scores (computed over the whole micro-batch before its rows are split)."""
        return (shifted_labels(batch["labels"]) != IGNORE_INDEX).any(dim=0).nonzero().flatten()

    def loss(
        self, model: torch.nn.Module, batch: dict[str, Any], num_items: torch.Tensor, keep: torch.Tensor | None
    ) -> torch.Tensor | None:
        return micro_batch_loss(model, batch, num_items, keep)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_``, also over a mix of FSDP2-sharded (DTensor) gradients and plain ones that
    are the same on every rank (a VLM's vision LoRA, kept outside FSDP2): norm = sqrt(|g_sharded|^2 + |g_plain|^2),
    each group scaled by the same factor."""
    from torch.distributed.tensor import DTensor

    with_grad = [p for p in params if p.grad is not None]
    sharded = [p.grad for p in with_grad if isinstance(p.grad, DTensor)]
    plain = [p.grad for p in with_grad if not isinstance(p.grad, DTensor)]
    if not sharded or not plain:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm_s = torch.nn.utils.get_total_norm(sharded).full_tensor()
    norm_p = torch.nn.utils.get_total_norm(plain)
    total = torch.sqrt(norm_s.float() ** 2 + norm_p.to(norm_s.device).float() ** 2)
    for group in (sharded, plain):
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated by tensors on a GPU; resident memory of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):  # no /proc: the peak instead (ru_maxrss: bytes on macOS, else KiB)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@dataclass
class LoopState:
    """Where a run is: optimizer steps done, their records, training seconds so far, evaluations made."""

    step: int = 0
    total_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0
    evals: dict[str, Any] = field(default_factory=dict)


def plan_steps(stream: BatchStream, cfg: TrainConfig) -> tuple[int, int | None]:
    """(optimizer steps, micro-batch limit): --max-steps, or --epochs passes whose last step may be shorter."""
    if cfg.max_steps is not None:
        return cfg.max_steps, None
    limit = stream.epoch_start(cfg.epochs)
    return -(-limit // cfg.grad_accum), limit


def total_steps(
    examples: Sequence[TokenizedExample], cfg: TrainConfig, *, packing: bool, max_seq_len: int | None
) -> int:
    """The optimizer steps `train_loop` runs for these examples and options."""
    stream = BatchStream(examples, batch_size=cfg.batch_size, seed=cfg.seed, packing=packing, max_seq_len=max_seq_len)
    return plan_steps(stream, cfg)[0]


def train_loop(
    model: torch.nn.Module,
    examples: Sequence[TokenizedExample],
    cfg: TrainConfig,
    *,
    optimizer: torch.optim.Optimizer,
    pad_token_id: int,
    packing: bool,
    max_seq_len: int,
    state: LoopState | None = None,
    device: torch.device | None = None,
    on_step_end: Callable[[LoopState], None] | None = None,
    log: Callable[[str], None] | None = None,
    dist: Any = None,
    objective: Any = None,
) -> LoopState:
    """Run optimizer steps ``state.step … total - 1`` on `model`'s trainable parameters; returns the state.

    `on_step_end(state)` runs after every step (the caller saves checkpoints there; raising stops the run).
    `dist`: the `quickloris.parallel.fsdp.DistContext` of an FSDP2-sharded model: every rank reads the same
    micro-batches and keeps rows ``rank::world_size`` of each; the token count ``N`` and the labelled positions are
    the whole micro-batch's, each rank backpropagates ``world_size ·`` its share (FSDP2 averages over ranks), so
    gradients and the (all-reduced) loss are the one-process ones. `objective`: what is trained (default
    `CausalLM`; the records' ``trained_tokens`` count what it normalises by: labelled texts for a classifier).
    """
    from tqdm.auto import tqdm

    from quickloris.utils.progress import progress

    device = device or next(model.parameters()).device
    objective = objective or CausalLM()
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    if world > 1 and (packing or cfg.batch_size % world):
        raise ValueError(
            f"with FSDP over {world} ranks each micro-batch's rows are split between the ranks: "
            f"--batch-size ({cfg.batch_size}) must be a multiple of {world}, without --packing"
        )
    stream = BatchStream(examples, batch_size=cfg.batch_size, seed=cfg.seed, packing=packing, max_seq_len=max_seq_len)
    total, limit = plan_steps(stream, cfg)
    state = state or LoopState()
    if state.step > total:
        raise ConfigError(
            TrainConfig,
            "max_steps",
            f"gives {total} steps, fewer than the {state.step} the resumed run has done already",
        )
    state.total_steps = total
    params = [p for g in optimizer.param_groups for p in g["params"]]
    clip = cfg.max_grad_norm if cfg.max_grad_norm else math.inf
    say = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    model.train()
    bar = progress(total=total, initial=state.step, desc="train", unit="step", enabled=cfg.progress)
    try:
        while state.step < total:
            s = state.step
            t0 = time.perf_counter()
            lr = lr_at(s, lr=cfg.lr, schedule=cfg.lr_schedule, warmup=cfg.warmup_steps, total=total)
            for g in optimizer.param_groups:
                g["lr"] = lr
            ks = range(
                s * cfg.grad_accum, (s + 1) * cfg.grad_accum if limit is None else min((s + 1) * cfg.grad_accum, limit)
            )
            batches = [
                objective.collate(examples, stream.get(k), packing=packing, pad_token_id=pad_token_id) for k in ks
            ]
            trained = sum(objective.count(b) for b in batches)
            tokens = sum(
                int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches
            )
            num_items = torch.tensor(max(trained, 1), device=device)
            loss_sum = torch.zeros((), device=device)
            for b in batches:
                keep = None
                if world > 1:  # this rank's rows, the whole batch's positions: every rank runs the same calls
                    keep = objective.keep(b)
                    keep = keep.to(device) if keep is not None else None
                    split = getattr(objective, "split", None)  # an objective whose batches need more than rows
                    b = (
                        split(b, rank, world)
                        if split
                        else {k: v[rank::world] if torch.is_tensor(v) else v for k, v in b.items()}
                    )
                loss = objective.loss(model, _to(b, device), num_items, keep)
                if loss is not None:
                    (loss * world if world > 1 else loss).backward()
                    loss_sum += loss.detach().float()
            if world > 1 and hasattr(objective, "after_backward"):  # gradients kept outside FSDP2 (a VLM's vision)
                objective.after_backward(model, world)
            if world > 1:
                from quickloris.parallel.fsdp import all_reduce_sum

                loss_sum = all_reduce_sum(loss_sum)
            grad_norm = float(clip_grad_norm(params, clip)) if trained else 0.0
            loss_value = float(loss_sum) if trained else float("nan")
            bad = [
                (w, v)
                for w, v in (("the loss", loss_value), ("the gradient norm", grad_norm))
                if trained and not math.isfinite(v)
            ]
            if trained and not bad:  # a step without trained tokens has no loss: the weights (and AdamW) stay
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t0
            state.elapsed += seconds
            state.step = s + 1
            record = {
                "step": s + 1,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": tokens,
                "trained_tokens": trained,
                "seconds": round(seconds, 4),
                "tokens_per_s": round(tokens / seconds, 1),
                "memory_gib": round(memory_gib(device), 3),
                "epoch": stream.locate(ks[0])[0],
            }
            state.history.append(record)
            if bad:
                raise TrainingDiverged(s + 1, *bad[0])
            bar.set_postfix_str(
                f"loss {loss_value:.4f}  tok/s {record['tokens_per_s']:.0f}  mem {record['memory_gib']:.2f} GiB",
                refresh=False,
            )
            bar.update(1)
            if state.step % cfg.log_every == 0 or state.step == total:
                say(
                    f"step {state.step}/{total}  loss {loss_value:.4f}  lr {lr:.2e}  grad-norm {grad_norm:.3f}  "
                    f"tok/s {record['tokens_per_s']:.0f}  mem {record['memory_gib']:.2f} GiB"
                )
            if on_step_end is not None:
                on_step_end(state)
    finally:
        bar.close()
    return state
