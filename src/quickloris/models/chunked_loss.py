"""Training loss of a Hugging Face causal LM through `chunked_linear_loss`: no [tokens, vocab] logits.

In transformers 5.x `XForCausalLM.forward` computes `logits = lm_head(hidden)` before the loss, so replacing
`loss_function` alone still allocates the logits (and their fp32 copy). `enable_chunked_loss(model)` installs an
instance-level `forward` on that one model object (never on its class): in training mode with `labels` it runs
the decoder, then the cross-entropy of the last hidden states against the shifted labels chunk by chunk, and
returns HF's `CausalLMOutputWithPast` with `logits=None`. Without labels, or in eval mode, the model's own
forward runs unchanged (generation, evaluation with logits). `disable_chunked_loss(model)` undoes it.

The loss equals HF's `ForCausalLMLoss`: labels shifted by one (or `shift_labels` as given), `ignore_index`
skipped, sum / `num_items_in_batch` when HF `Trainer` passes it (so gradient accumulation and several ranks
normalise by the whole step's token count), else the mean over this batch's labels. Logit softcapping
(`config.final_logit_softcapping`, Gemma 2) is applied as the model would.

Works for Llama-family models (`model.<base_model_prefix>` decoder + `get_output_embeddings()` head), tied or
untied heads, inside a PEFT wrapper. A plain `nn.Linear` head goes through the functional path (weight and
bias as autograd inputs); any other head module (LoRA-wrapped, `modules_to_save`) through
`MemoryEfficientLinear`, which calls the module chunk by chunk.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quickloris.models import surgery
from quickloris.ops import linear_losses
from quickloris.ops.chunked_linear import MemoryEfficientLinear, chunked_linear_loss

STEP = "loss"


@dataclasses.dataclass
class ChunkedLossConfig:
    """How a model computes its training loss through `chunked_linear_loss`."""

    chunk_size: int | None = dataclasses.field(
        default=None, metadata={"help": "rows (tokens) per chunk of the lm_head + loss; none = from --memory-budget"}
    )
    memory_budget: int | None = dataclasses.field(
        default=None,
        metadata={"help": "bytes of transient memory per chunk (default 1 GiB); used when chunk_size is none"},
    )
    grad_in_forward: bool = dataclasses.field(
        default=False,
        metadata={"help": "compute the loss gradient during forward (no recompute in backward: one matmul fewer)"},
    )
    check_labels: bool = dataclasses.field(
        default=True,
        metadata={"help": "raise on labels outside [0, vocab) (one host sync per step; skipped under torch.compile)"},
    )

    def __post_init__(self):
        if self.chunk_size is not None and self.memory_budget is not None:
            raise ValueError("ChunkedLossConfig: set chunk_size or memory_budget, not both")
        for name in ("chunk_size", "memory_budget"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"ChunkedLossConfig.{name} must be a positive int or None, got {v!r}")


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder, output head) of a causal LM: ``model.<base_model_prefix>`` and ``get_output_embeddings()``."""
    prefix = getattr(model, "base_model_prefix", None)
    decoder = getattr(model, prefix, None) if isinstance(prefix, str) else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Module):
        raise TypeError(
            f"{type(model).__name__} is not a causal LM with a decoder (`model.{prefix}`) and an "
            "output head (`get_output_embeddings()`)"
        )
    return decoder, head


def shift_for_causal_lm(t: torch.Tensor, fill: Any) -> torch.Tensor:
    """Position i is scored against entry i + 1: drop the first entry, pad the end with `fill`."""
    return F.pad(t[:, 1:], (0, 1) if t.dim() == 2 else (0, 0) * (t.dim() - 2) + (0, 1), value=fill)


def chunked_head_loss(
    hidden: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor | None,
    *,
    loss: str = "cross_entropy",
    reduction: str = "mean",
    num_items=None,
    config: ChunkedLossConfig | None = None,
    **options: Any,
) -> torch.Tensor:
    """`loss(head(hidden), labels)` chunk by chunk; `head` a plain nn.Linear or any module (the slower path)."""
    cfg = config or ChunkedLossConfig()
    if type(head) is nn.Linear:
        return chunked_linear_loss(
            hidden,
            head.weight,
            labels,
            bias=head.bias,
            loss=loss,
            reduction=reduction,
            num_items=num_items,
            chunk_size=cfg.chunk_size,
            memory_budget=cfg.memory_budget,
            grad_in_forward=cfg.grad_in_forward,
            check_labels=cfg.check_labels,
            **options,
        )
    if loss != "cross_entropy" or reduction == "none" or set(options) - {"ignore_index", "softcap"}:
        raise ValueError(
            f"a {type(head).__name__} head supports loss='cross_entropy' with reduction sum/mean "
            "only; use a plain nn.Linear head for other losses"
        )
    ignore_index = options.get("ignore_index", -100)
    fn = linear_losses.cross_entropy
    out = MemoryEfficientLinear.apply(
        hidden,
        head,
        labels,
        lambda xc, module, yc: fn(xc, module, None, yc, **options).sum(),
        cfg.chunk_size,
        memory_budget=cfg.memory_budget,
        grad_in_forward=cfg.grad_in_forward,
    )
    if reduction == "sum":
        return out
    count = (labels != ignore_index).sum() if num_items is None else torch.as_tensor(num_items, device=out.device)
    return out / count.clamp_min(1)


def eager_head_loss(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    num_items,
    ignore_index: int,
    softcap: float | None,
    config: ChunkedLossConfig,
) -> torch.Tensor:
    """The default per-model head loss: `chunked_head_loss` in eager PyTorch (any head module)."""
    options: dict[str, Any] = {"ignore_index": ignore_index}
    if softcap is not None:
        options["softcap"] = softcap
    return chunked_head_loss(hidden, head, targets, num_items=num_items, config=config, **options)


def _loss_forward(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    logits_to_keep=0,
    **kwargs,
):
    """A causal LM's forward whose training loss is the recorded head loss over the decoder's hidden states: no
    logits tensor. Without labels, or in eval mode, the model's own forward runs."""
    loss_state = surgery.state(self, STEP)
    if labels is None or not self.training:
        return loss_state["original"](
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    decoder, head = causal_lm_parts(self)
    outputs = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        **kwargs,
    )
    hidden = outputs[0]
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    hidden = hidden[:, keep, :]
    targets = shift_for_causal_lm(labels, ignore_index) if shift_labels is None else shift_labels
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels give targets of shape {tuple(targets.shape)} but the model kept hidden states "
            f"of shape {tuple(hidden.shape[:-1])} (logits_to_keep={logits_to_keep!r})"
        )
    softcap = getattr(self.config, "final_logit_softcapping", None)
    loss = loss_state["head_loss"](
        hidden,
        head,
        targets.to(hidden.device),
        num_items,
        ignore_index,
        None if softcap is None else float(softcap),
        loss_state["config"],
    )
    out = CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=outputs.past_key_values,
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
    )
    return out if return_dict else out.to_tuple()


def enable_chunked_loss(model: nn.Module, config: ChunkedLossConfig | None = None, **overrides: Any) -> nn.Module:
    """Make `model` (or the transformers model inside a PEFT wrapper) compute its training loss chunked.

    Installs the loss once: an instance ``forward`` on that one object (`quickloris.models.surgery` records it and
    the forward it shadows). Calling it again only replaces the config. Keyword overrides set `ChunkedLossConfig`
    fields. Returns `model`.
    """
    cfg = dataclasses.replace(config or ChunkedLossConfig(), **overrides)
    target = surgery.unwrap(model)
    causal_lm_parts(target)
    if not hasattr(target, "config") or not hasattr(type(target), "forward"):
        raise TypeError(f"{type(target).__name__} is not a transformers model")
    current = surgery.state(target, STEP)
    if current is not None:
        current["config"] = cfg
        return model
    saved = target.__dict__.get("forward")  # an instance forward someone installed before us
    original = saved if saved is not None else types.MethodType(type(target).forward, target)
    surgery.set_state(target, STEP, {"config": cfg, "original": original, "head_loss": eager_head_loss})
    # generate() checks its keyword arguments against forward's signature (a VLM's pixel_values, image_grid_thw...):
    # the installed forward is a copy of _loss_forward that shows the model class's own signature.
    fn = types.FunctionType(_loss_forward.__code__, _loss_forward.__globals__, "forward", _loss_forward.__defaults__)
    fn.__kwdefaults__, fn.__doc__ = _loss_forward.__kwdefaults__, _loss_forward.__doc__
    fn.__signature__ = inspect.signature(type(target).forward)
    surgery.set_attribute(
        target,
        STEP,
        target,
        "forward",
        types.MethodType(fn, target),
        "training loss: lm_head + cross-entropy chunk by chunk (no [tokens, vocab] logits)",
        path="model",
    )
    return model


def set_head_loss(model: nn.Module, head_loss, step: str, what: str) -> None:
    """Let the installed loss forward compute its head loss with `head_loss` (same signature as `eager_head_loss`),
    recorded as `step`'s edit (undo puts the eager one back). The forward itself is not touched."""
    loss_state = surgery.state(model, STEP)
    if loss_state is None:
        raise ValueError("the chunked loss is not enabled on this model (enable_chunked_loss first)")
    loss_state["head_loss"] = head_loss

    def restore(m: nn.Module) -> None:
        surgery.state(m, STEP)["head_loss"] = eager_head_loss

    surgery.record(model, step, "model.forward (head loss)", what, undo_fn=restore)


def disable_chunked_loss(model: nn.Module) -> nn.Module:
    """Undo `enable_chunked_loss` (restores the instance forward that was there before, if any)."""
    surgery.undo(model, STEP)
    return model


def chunked_loss_config(model: nn.Module) -> ChunkedLossConfig | None:
    loss_state = surgery.state(model, STEP)
    return None if loss_state is None else loss_state["config"]


def is_chunked_loss_enabled(model: nn.Module) -> bool:
    return surgery.state(model, STEP) is not None
