"""Loss functions of a linear projection, written for one chunk of rows (`quickloris.chunked_linear_loss`).

Each function is `fn(x [C, H], weight [V, H] (or the head module), bias [V] | None, labels [C] | None, *,
row tensors..., options)` and returns one fp32 value per row ([C]); rows whose label is `ignore_index` give 0
(and no gradient). They are plain PyTorch, differentiated by autograd inside `chunked_linear_loss`. The logits
are upcast to fp32 before any softmax (`logits`). Row tensors (one entry per row of x, sliced with it) are
named by the `row_args` decorator; every other option is passed through as is.

Notation: z = logits (after softcap and temperature), lse = logsumexp_v z_v, log p_v = z_v - lse.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def row_args(*names: str) -> Callable:
    """Declare which keyword arguments of a loss function hold one entry per row (sliced per chunk)."""

    def mark(fn: Callable) -> Callable:
        fn.row_args = tuple(names)
        return fn

    return mark


def logits(
    x: torch.Tensor,
    weight: torch.Tensor | torch.nn.Module,
    bias: torch.Tensor | None = None,
    *,
    softcap: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """fp32 logits `z = cap * tanh((x W^T + b) / cap) / temperature` (the matmul itself in x's dtype).

    `weight` may also be the head module itself (then `bias` must be None): z = module(x), upcast the same way.
    The divisions are in place on a fresh fp32 copy (no autograd node keeps it): one [C, V] tensor fewer.
    """
    if isinstance(weight, torch.Tensor):
        z = F.linear(x, weight, bias)
    elif bias is None and callable(weight):
        z = weight(x)
    else:
        raise TypeError("weight must be a [V, H] tensor, or a module with bias=None")
    fresh = z.dtype in (torch.float16, torch.bfloat16)  # the upcast copy is ours to modify in place
    if fresh:
        z = z.float()
    if softcap is not None:
        z, fresh = torch.tanh(z.div_(softcap) if fresh else z / softcap) * softcap, True
    if temperature != 1.0:
        z = z.div_(temperature) if fresh else z / temperature
    return z


def _valid(labels: torch.Tensor | None, rows: int, device, ignore_index: int):
    """Mask of the rows that count (all rows when there are no labels)."""
    if labels is None:
        return torch.ones(rows, dtype=torch.bool, device=device)
    return labels != ignore_index


def cross_entropy(
    x,
    weight,
    bias=None,
    labels=None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Per-row cross-entropy: `F.cross_entropy(z, y, reduction="none", label_smoothing=eps)` + z_loss * lse^2.

    loss = (1 - eps) (lse - z_y) + eps (lse - mean_v z_v) + z_loss lse^2 (z-loss as in PaLM; `softcap` as in
    Gemma 2); d loss / d z = softmax(z) (1 + 2 z_loss lse) - (1 - eps) onehot(y) - eps / V, left to autograd.
    Autograd keeps one fp32 [C, V] tensor (the log-softmax) per chunk, two with z-loss or softcap.
    """
    if labels is None:
        raise ValueError("cross_entropy needs labels")
    z = logits(x, weight, bias, softcap=softcap)
    loss = F.cross_entropy(z, labels, reduction="none", ignore_index=ignore_index, label_smoothing=label_smoothing)
    if z_loss:
        lse = torch.logsumexp(z, dim=-1)
        loss = loss + torch.where(labels != ignore_index, z_loss * lse.square(), torch.zeros_like(lse))
    return loss


def token_logprobs(
    x,
    weight,
    bias=None,
    labels=None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> torch.Tensor:
    """log p(y) = z_y / T - logsumexp(z / T) per row (0 where ignored): the log-probabilities RL losses use.

    Written as -cross_entropy, whose fused log-softmax / NLL kernels keep the fewest [C, V] tensors.
    """
    if labels is None:
        raise ValueError("token_logprobs needs labels (the chosen tokens)")
    z = logits(x, weight, bias, softcap=softcap, temperature=temperature)
    return -F.cross_entropy(z, labels, reduction="none", ignore_index=ignore_index)


def grpo_token_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
) -> torch.Tensor:
    """GRPO's per-token loss from per-token log-probs (the same formula serves the naive path).

    r = exp(logp - old), loss = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)
                                + beta (exp(ref - logp) - (ref - logp) - 1)     (k3 estimate of KL(pi || ref)).
    `old_logprobs=None` means on-policy (old = logp, detached: r = 1, gradient A d logp).
    """
    old = logp.detach() if old_logprobs is None else old_logprobs
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    if beta:
        if ref_logprobs is None:
            raise ValueError("grpo with beta != 0 needs ref_logprobs")
        d = ref_logprobs - logp
        loss = loss + beta * (torch.exp(d) - d - 1.0)
    return loss


@row_args("advantages", "old_logprobs", "ref_logprobs")
def grpo(
    x,
    weight,
    bias=None,
    labels=None,
    *,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    temperature: float = 1.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> torch.Tensor:
    """Per-token GRPO loss (`grpo_token_loss`) on `token_logprobs`; 0 on ignored (prompt / padding) tokens.

    Sequence or group normalisation (GRPO's 1/|o_i|, DAPO's 1/sum|o_i|) is the caller's: reduction "sum" with
    pre-weighted advantages, "mean" with `num_items`, or "none".
    """
    logp = token_logprobs(x, weight, bias, labels, temperature=temperature, ignore_index=ignore_index, softcap=softcap)
    valid = labels != ignore_index
    # Ignored rows may hold anything in the row tensors; keep them out of exp() so no inf * 0 reaches a gradient.
    old = None if old_logprobs is None else torch.where(valid, old_logprobs.float(), logp.detach())
    ref = None if ref_logprobs is None else torch.where(valid, ref_logprobs.float(), logp.detach())
    adv = torch.where(valid, advantages.float(), torch.zeros_like(logp))
    loss = grpo_token_loss(logp, adv, old, ref, epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta)
    return torch.where(valid, loss, torch.zeros_like(loss))


@row_args("teacher")
def kl_div(
    x,
    weight,
    bias=None,
    labels=None,
    *,
    teacher: torch.Tensor,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> torch.Tensor:
    """Distillation: KL(p_teacher || p_student) = sum_v p_t,v (log p_t,v - log p_s,v) per row, both at temperature T.

    `teacher` is either the teacher's logits ([C, V]) or, with `teacher_weight` ([V, H_t]), its hidden states
    ([C, H_t]), whose logits are then also made chunk by chunk. The teacher gets no gradient. `labels` only mask
    rows (may be None).
    """
    z = logits(x, weight, bias, softcap=softcap, temperature=temperature)
    if teacher_weight is not None:
        zt = logits(teacher.to(teacher_weight.dtype), teacher_weight, teacher_bias, temperature=temperature)
    elif teacher.shape[-1] != z.shape[-1]:
        raise ValueError(
            f"kl_div: teacher has {teacher.shape[-1]} columns but the student's vocabulary is "
            f"{z.shape[-1]}; pass teacher logits [rows, V] or hidden states with teacher_weight"
        )
    else:
        zt = teacher.float() / temperature
    log_pt = torch.log_softmax(zt.detach(), dim=-1)
    kl = (log_pt.exp() * (log_pt - torch.log_softmax(z, dim=-1))).sum(dim=-1)
    return torch.where(_valid(labels, z.shape[0], z.device, ignore_index), kl, torch.zeros_like(kl))


def entropy(
    x,
    weight,
    bias=None,
    labels=None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> torch.Tensor:
    """Entropy of the predicted distribution per row: H = -sum_v p_v log p_v. `labels` only mask (may be None)."""
    z = logits(x, weight, bias, softcap=softcap, temperature=temperature)
    logp = torch.log_softmax(z, dim=-1)
    h = -(logp.exp() * logp).sum(dim=-1)
    return torch.where(_valid(labels, z.shape[0], z.device, ignore_index), h, torch.zeros_like(h))


#: Loss functions by name, for `chunked_linear_loss(..., loss="name")`.
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "cross_entropy": cross_entropy,
    "token_logprobs": token_logprobs,
    "grpo": grpo,
    "kl_div": kl_div,
    "entropy": entropy,
}
