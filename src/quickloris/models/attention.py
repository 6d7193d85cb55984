"""Attention backends for training: SDPA (transformers' own), SDPA with cuDNN first, and quickloris'
FlexAttention with document masks.

`set_attention(model, "flex")` registers ``quickloris_flex`` in transformers' attention registry
(``AttentionInterface``; its mask registry gets transformers' own flex mask builder, used only for cached
generation) and selects it with ``model.set_attn_implementation`` - no transformers class is modified. For
training it adds a forward pre-hook to that model's decoder which turns the batch's 2-D ``attention_mask`` and
``position_ids`` into one `BlockMask`, passed down as the 4-D mask (transformers returns a ready 4-D mask as is).

The mask is causal within documents::

    allowed(b, q, k) = k <= q  and  doc[b, q] == doc[b, k]

with ``doc`` numbering the documents of each row: a new document starts wherever ``position_ids`` does not
continue by +1 (packed sequences, as transformers' own packed-sequence detection does), and padding tokens
(``attention_mask == 0``) form document -1, which real tokens never attend to. A plain batch is one document.
A sliding window adds ``q - k < window``: model-wide (Mistral, Phi-3: ``config.sliding_window``) in the one mask,
or per layer (Gemma-2/3, Qwen2/3 with ``use_sliding_window``: ``config.layer_types``), where the pre-hook builds
one `BlockMask` per layer type and passes ``{"full_attention": ..., "sliding_attention": ...}``, the mapping these
decoders take as a prepared mask (each layer picks its type's). What the model has is read from its family spec
(`quickloris.models.families`); models on the generic path have no flex.

Attention logit softcapping (Gemma-2: ``attn_logit_softcapping``, passed by the attention module as ``softcap``)
is a ``score_mod``: ``s -> cap * tanh(s / cap)`` on the scaled score, before the mask and the softmax, as the
model's eager attention computes it. SDPA has no such hook, so `set_attention` refuses SDPA for a model with a cap.

The `BlockMask` is built in eager PyTorch, block by block (128 x 128), with no `create_block_mask` compile and no
dense [S, S] mask: per block the min and max document id give "empty" (no overlap or above the diagonal),
"full" (below the diagonal, one same document on both sides: no mask_mod evaluated) or "partial" (mask_mod
evaluated per element). Sequence lengths vary freely: the tensors only change shape, the `mask_mod` code is
always the same function, so a compiled decoder layer (`torch.compile(dynamic=True)`) does not recompile per
length. Inside a compiled region ``flex_attention`` is traced (the fused Triton kernel); called eagerly on a
GPU it goes through one shared ``torch.compile(flex_attention, dynamic=True)``. CPU training (no fused CPU
backward) runs PyTorch's FlexAttention operator itself, its reference forward and backward evaluating the same
mask_mod / score_mod; a compiled CPU graph (inductor lowers CPU flex for inference only) the same math densely.

SDPA (``set_attention(model, "sdpa")``) is transformers' implementation: ``is_causal`` fast path for plain
batches, a boolean mask (built by transformers) for padding and packed sequences.

``"sdpa_cudnn"`` is the same call (transformers' SDPA function and masks, registered as ``quickloris_sdpa_cudnn``)
inside ``sdpa_kernel([cuDNN, flash, memory-efficient, math], set_priority=True)``: PyTorch tries cuDNN's fused
attention first and falls back down the list where cuDNN refuses an input (CPU, fp32, some masks). On an H100
cuDNN's kernel runs causal GQA forward + backward 1.4x (1 x 2048, head 64) to 1.8x (1 x 8192, head 128) faster
than the flash backend PyTorch picks by default (``benchmarks/results/train/probe_speed-*``). The priority is
read when the call is traced, so a compiled layer keeps the choice in its graph.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from quickloris.models import surgery

FLEX = "quickloris_flex"
# PyTorch's fused flex kernels (Triton, forward and backward) take head dimensions from 16 up.
MIN_GPU_HEAD_DIM = 16
_HEAD_DIM_MESSAGE = (
    "flex attention on a GPU needs head_dim >= 16 (PyTorch's fused FlexAttention kernels); this model's is {}: use "
    "attention='sdpa'"
)
CUDNN = "quickloris_sdpa_cudnn"
BLOCK = 128
STEP = "attention"


def _flex_fn():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


@functools.cache
def _compiled_flex():
    return torch.compile(_flex_fn(), dynamic=True, fullgraph=True)


def softcap_score_mod(cap: torch.Tensor):
    """The score_mod of a logit softcap: ``s -> cap * tanh(s / cap)``. `cap` is a 0-d tensor on the scores'
    device: a Python float would reach a compiled flex_attention as a symbolic float (dynamo does not specialise
    floats), which its score_mod buffers cannot hold; a tensor is a buffer like any other."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap

    return score_mod


@functools.cache
def _eager_softcap_mod(cap: float, device: str):
    return softcap_score_mod(torch.full((), cap, dtype=torch.float32, device=device))


def flex_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q [B, Hq, S, D], k/v [B, Hkv, S, D] -> ([B, S, Hq, D], None).

    `softcap`: the attention logit cap the module passes (Gemma-2), applied as a score_mod."""
    from torch.nn.attention.flex_attention import BlockMask

    if dropout:
        raise ValueError(
            f"flex attention has no attention dropout; got dropout={dropout} (set the config's "
            "attention_dropout to 0 or use attention='sdpa')"
        )
    if not isinstance(attention_mask, BlockMask):
        raise ValueError(
            "quickloris flex attention needs the BlockMask built by set_attention(model, 'flex'); got "
            f"{type(attention_mask).__name__}"
        )
    if query.is_cuda and query.shape[-1] < MIN_GPU_HEAD_DIM:
        raise ValueError(_HEAD_DIM_MESSAGE.format(query.shape[-1]))
    gqa = query.shape[1] != key.shape[1]
    if not query.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        if torch.compiler.is_compiling():  # inductor has no CPU flex backward: the same math, densely
            out = _dense_fallback(query, key, value, attention_mask, scaling, gqa, softcap)
        else:
            out = _flex_operator(query, key, value, attention_mask, scaling, softcap)
    else:
        # Traced by the enclosing compile; eager on GPU: one shared compiled flex; eager on CPU: the reference.
        fn = _flex_fn() if torch.compiler.is_compiling() or not query.is_cuda else _compiled_flex()
        if softcap is None:
            score_mod = None
        elif torch.compiler.is_compiling():  # traced: a fresh closure is just graph code
            score_mod = softcap_score_mod(torch.full((), softcap, dtype=torch.float32, device=query.device))
        else:  # eager: one function per cap and device, so the shared compiled flex is not re-guarded per call
            score_mod = _eager_softcap_mod(float(softcap), str(query.device))
        out = fn(query, key, value, score_mod=score_mod, block_mask=attention_mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def sdpa_cudnn_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kwargs: Any,
):
    """transformers' SDPA attention with PyTorch's SDPA backends tried in the order cuDNN, flash, efficient, math."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _dense_fallback(query, key, value, block_mask, scaling, gqa, softcap=None):
    """Compiled CPU training (inductor lowers FlexAttention on the CPU for inference only): the same mask_mod,
    evaluated densely by broadcasting, applied through SDPA, or with a softcap (which SDPA lacks) through the
    explicit math ``softmax(mask(cap * tanh(scale * q k^T / cap))) v`` (softmax in fp32, as HF's eager attention).
    Exact, O(S^2) memory: for tests and CPU runs, never taken on a GPU."""
    B, S, K = query.shape[0], query.shape[2], key.shape[2]
    dev = query.device
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=dev)
    allowed = block_mask.mask_mod(
        b, h, torch.arange(S, device=dev).view(1, 1, S, 1), torch.arange(K, device=dev).view(1, 1, 1, K)
    )
    if softcap is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling, enable_gqa=gqa)
    if gqa:  # query head j reads key / value head j // (Hq / Hkv), as repeat_kv does
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.tanh(torch.matmul(query, key.transpose(-1, -2)) * scale / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), value)


def _flex_operator(query, key, value, block_mask, scaling, softcap=None):
    """CPU training: PyTorch's FlexAttention operator itself, forward and backward. The public `flex_attention`
    refuses gradients on the CPU, the operator under it (what it calls, and what a compiled graph holds) has them:
    its reference implementation evaluates mask_mod on every (q, k) and differentiates the softmax densely, the
    same math the fused GPU kernels tile, a softcap as its score_mod. O(S^2) memory: for tests and CPU runs, never
    taken on a GPU."""
    from torch._higher_order_ops.flex_attention import flex_attention as flex_op

    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # The options the public API fills in (its defaults), with the logsumexp kept: the backward reads it.
    options = {
        "BACKEND": "AUTO",
        "PRESCALE_QK": False,
        "ROWS_GUARANTEED_SAFE": False,
        "BLOCKS_ARE_CONTIGUOUS": False,
        "WRITE_DQ": True,
        "OUTPUT_LOGSUMEXP": True,
        "OUTPUT_MAX": False,
    }
    score_mod = _no_score_mod if softcap is None else _eager_softcap_mod(float(softcap), str(query.device))
    out, _, _ = flex_op(
        query.contiguous(), key.contiguous(), value.contiguous(), score_mod, block_mask.as_tuple(), scale, options
    )
    return out


def _no_score_mod(score, b, h, q_idx, kv_idx):
    return score


def document_ids(
    batch: int, seq: int, device, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """int32 [B, S] document number of each token (see the module docstring); -1 for padding."""
    doc = torch.zeros(batch, seq, dtype=torch.int32, device=device)
    if position_ids is not None:
        if position_ids.dim() != 2 or position_ids.shape[-1] != seq:
            raise ValueError(f"position_ids must be [batch, {seq}], got {tuple(position_ids.shape)}")
        pos = position_ids.to(device).expand(batch, seq)
        starts = torch.diff(pos, dim=-1, prepend=pos[:, :1] - 1) != 1
        doc = starts.cumsum(-1).to(torch.int32)
    if attention_mask is not None:
        if attention_mask.shape != (batch, seq):
            raise ValueError(
                f"attention_mask must be [batch, seq] = [{batch}, {seq}], got {tuple(attention_mask.shape)}"
            )
        doc = torch.where(attention_mask.to(device).bool(), doc, torch.full_like(doc, -1))
    return doc


def _doc_causal(doc: torch.Tensor, window: int | None):
    if window is None:

        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])
    else:

        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window) & (doc[b, q_idx] == doc[b, kv_idx])

    return mask_mod


def build_block_mask(doc: torch.Tensor, block: int = BLOCK, window: int | None = None):
    """The causal-within-document `BlockMask` of `doc` [B, S] (int), built blockwise in eager PyTorch.

    window: a sliding window (Mistral): token q also needs ``q - k < window``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if doc.dim() != 2:
        raise ValueError(f"doc must be [batch, seq], got {tuple(doc.shape)}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    B, S = doc.shape
    real = -(-S // block)
    # At least 2 blocks: a 1-block mask would make torch.compile specialise on size 1 (one more graph for every
    # length <= 128); the extra block is beyond the sequence, empty, and never visited.
    nb = max(real, 2)
    # Pad to whole blocks with the last real id: block min/max are unchanged and mask_mod may index the tail.
    padded = torch.cat([doc, doc[:, -1:].expand(B, nb * block - S)], dim=1).contiguous()
    blocks = padded.view(B, nb, block)
    lo, hi = blocks.amin(-1), blocks.amax(-1)  # [B, nb]
    q = torch.arange(nb, device=doc.device)
    inside = (q < real)[None, :] & (q < real)[:, None]
    below = (q[None, :] < q[:, None]) & inside  # [q block, kv block]: kv block strictly before q block
    causal = below | ((q[None, :] == q[:, None]) & inside)
    overlap = (lo[:, None, :] <= hi[:, :, None]) & (lo[:, :, None] <= hi[:, None, :])
    uniform = lo == hi
    full = below & uniform[:, :, None] & uniform[:, None, :] & (lo[:, :, None] == lo[:, None, :])
    if window is not None:
        # q block i, kv block j: the distances q - k span gap - block + 1 .. gap + block - 1
        gap = (q[:, None] - q[None, :]) * block
        causal = causal & (gap - block + 1 < window)
        full = full & (gap + block - 1 < window)
    partial = causal & overlap & ~full

    def ordered(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = sel.sum(-1, dtype=torch.int32)
        idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return count[:, None].contiguous(), idx[:, None].contiguous()

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=_doc_causal(padded, window), seq_lengths=(S, S)
    )


_DECODER_ARGS = ("input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds")


def _flex_mask_hook(windows, module, args, kwargs):
    """Decoder forward pre-hook: replace the 2-D mask / position ids by the batch's BlockMask(s) (training path).

    `windows`: the family's `FamilySpec.windows` of this config - ``{None: window}`` (one mask) or
    ``{layer type: window}`` (a mask per layer type, passed as the mapping the decoder takes)."""
    if getattr(module.config, "_attn_implementation", None) != FLEX:
        return None
    bound = dict(zip(_DECODER_ARGS, args))
    get = lambda name: kwargs.get(name, bound.get(name))  # noqa: E731
    mask, cache = get("attention_mask"), get("past_key_values")
    if cache is not None or isinstance(mask, dict) or (mask is not None and mask.dim() != 2):
        return None  # cached generation / a prepared 4-D mask or mapping: transformers' own mask path
    ids, embeds = get("input_ids"), get("inputs_embeds")
    ref = ids if ids is not None else embeds
    if ref is None:
        return None
    batch, seq = ref.shape[0], ref.shape[1]
    pos = get("position_ids")
    if pos is not None and pos.dim() == 3:  # multimodal RoPE [3 or 4, B, S]: of four rows the first is the text's
        pos = pos[0] if pos.shape[0] == 4 else None  # three: no packing to read (documents from the mask alone)
    doc = document_ids(batch, seq, ref.device, mask, pos)
    masks = {kind: build_block_mask(doc, window=window) for kind, window in windows.items()}
    block_mask = masks[None] if None in masks else masks
    args = list(args)
    if len(args) > 1:
        args[1] = block_mask
    else:
        kwargs["attention_mask"] = block_mask
    return tuple(args), kwargs


def register_flex() -> None:
    """Register ``quickloris_flex`` in transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flex_attention_mask

    AttentionInterface.register(FLEX, flex_attention_forward)
    AttentionMaskInterface.register(FLEX, flex_attention_mask)


def register_sdpa_cudnn() -> None:
    """Register ``quickloris_sdpa_cudnn`` in transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CUDNN, sdpa_cudnn_attention_forward)
    AttentionMaskInterface.register(CUDNN, sdpa_mask)


NAMES = {"sdpa": "sdpa", "sdpa_cudnn": CUDNN, "flex": FLEX, "eager": "eager"}


def set_attention(model: torch.nn.Module, implementation: str) -> torch.nn.Module:
    """Select the attention of `model`: ``"sdpa"``, ``"sdpa_cudnn"`` (SDPA, cuDNN first), ``"flex"`` (quickloris'
    FlexAttention) or ``"eager"``.

    flex needs a registered family (its spec says where windows apply); SDPA is refused for a model whose
    attention caps its scores (Gemma-2), since it would run without the cap."""
    from quickloris.models.families import family_of

    names = NAMES
    if implementation not in names:
        raise ValueError(f"attention must be one of {sorted(names)}, got {implementation!r}")
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"{type(model).__name__} is not a transformers model (no set_attn_implementation)")
    spec = family_of(model)
    # A vision-language model: the language model's own config holds its attention settings, and only it is switched
    # (the vision tower keeps its attention: quickloris' flex masks are the decoder's).
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if implementation == "flex":
        if not spec.fast_path or not getattr(spec, "flex", True):
            raise ValueError(
                f"flex attention needs a registered model family whose attention it can express; "
                f"{type(model).__name__} is {'on the generic path' if not spec.fast_path else spec.name}: use "
                "attention='sdpa' or 'eager'"
            )
        windows = spec.windows(model.config)
        if getattr(config, "attention_dropout", 0.0):
            raise ValueError(
                f"flex attention has no attention dropout, but the config sets attention_dropout="
                f"{config.attention_dropout}"
            )
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError(
                f"flex attention builds causal masks, but {type(model).__name__}'s config sets "
                "use_bidirectional_attention; use attention='sdpa'"
            )
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if head_dim < MIN_GPU_HEAD_DIM and any(p.is_cuda for p in model.parameters()):
            raise ValueError(_HEAD_DIM_MESSAGE.format(head_dim))
        register_flex()
    cap = spec.attention_softcap(model.config)
    if cap is not None and implementation in ("sdpa", "sdpa_cudnn"):
        raise ValueError(
            f"{type(model).__name__} caps attention scores ({spec.attention.logit_softcap}={cap:g}) "
            f"and SDPA cannot: use attention='flex' or 'eager'"
        )
    if implementation == "sdpa_cudnn":
        register_sdpa_cudnn()
    surgery.undo(model, STEP)  # a second call replaces the first (its hook removed, its backend restored)
    previous = config._attn_implementation
    text_only = (lambda name: {"text_config": name}) if config is not model.config else (lambda name: name)
    model.set_attn_implementation(text_only(names[implementation]))
    surgery.record(
        model,
        STEP,
        f"model.config.{'text_config.' if config is not model.config else ''}_attn_implementation",
        f"attention: {implementation}",
        undo_fn=lambda m: m.set_attn_implementation(text_only(previous)),
    )
    if implementation == "flex":
        hook = functools.partial(_flex_mask_hook, windows)
        handle = spec.decoder(model).register_forward_pre_hook(hook, with_kwargs=True)
        what = "2-D mask + position ids -> one BlockMask" + (
            "" if None in windows else f" per layer type ({', '.join(f'{k}: window {v}' for k, v in windows.items())})"
        )
        surgery.record(
            model, STEP, f"model.{model.base_model_prefix} (forward pre-hook)", what, undo_fn=lambda m: handle.remove()
        )
    return model


def attention_of(model: torch.nn.Module) -> str:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    impl = config._attn_implementation
    return {v: k for k, v in NAMES.items()}.get(impl, impl)


__all__ = [
    "FLEX",
    "CUDNN",
    "set_attention",
    "register_flex",
    "register_sdpa_cudnn",
    "sdpa_cudnn_attention_forward",
    "build_block_mask",
    "document_ids",
    "flex_attention_forward",
    "softcap_score_mod",
    "attention_of",
]
