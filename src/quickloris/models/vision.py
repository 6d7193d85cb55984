"""Vision-language models: what `prepare_model` does beyond a text model, and loading one from a folder.

A VLM (`quickloris.models.families._vision.VisionFamilySpec`: Qwen2-VL, Qwen2.5-VL, Llava 1.5 / NeXT, Pixtral,
Mllama) is prepared like a text model - its language model's linears become NF4 + LoRA, the chunked loss runs on
the language model's hidden states, the attention backend is set on the language model only - and then
`prepare_vision`:

* leaves the vision tower and projector frozen in the dtype they were loaded in (bf16 on a GPU); with
  ``train_vision`` (``--train-vision``) every ``nn.Linear`` of theirs gets a LoRA adapter over its frozen 16-bit
  weight (`quickloris.nn.lora_linear.LoRALinear`; saved in the same PEFT adapter folder);
* for Mllama, whose images enter through cross-attention and whose HF forward runs the vision tower on every row of
  the batch (padding images for rows without one), installs a forward pre-hook on the multimodal base model that
  takes the collator's ``image_rows`` (the rows that have images) and ``pixel_values`` of those rows only: the tower
  runs on them and the projected states of the other rows are zeros. A zero row is exactly "no image": its keys and
  values are zero (the cross-attention projections have no bias), its tokens' cross-attention mask is all-masked,
  so the gated attention and MLP of the cross-attention layer add 0 - the row computes what HF computes for a
  text-only batch, where those layers are skipped.

Every change is recorded in ``model.quickloris_edits`` (`quickloris.models.surgery`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quickloris.models import surgery

STEP = "vision"


def is_vision_model(model_or_config: Any) -> bool:
    from quickloris.models.families import family_of
    from quickloris.models.families._vision import VisionFamilySpec

    try:
        return isinstance(family_of(model_or_config), VisionFamilySpec)
    except (TypeError, ValueError):
        return False


def _vision_lora(model: nn.Module, spec: Any, cfg: Any, lora_dtype: torch.dtype, init: bool | str) -> int:
    """LoRA on every nn.Linear of the vision tower and projector (their 16-bit weights stay, frozen)."""
    from quickloris.nn.lora_linear import LoRALinear

    lora = dict(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        use_rslora=cfg.use_rslora,
        lora_dtype=lora_dtype,
        init_lora_weights=init,
    )
    base = surgery.unwrap(model).get_submodule(model.base_model_prefix)
    roots = [(base, name) for name in spec.vision_modules if getattr(base, name, None) is not None]
    plan = [(b, name, getattr(b, name)) for b, name in roots if type(getattr(b, name)) is nn.Linear]  # Mllama's
    plan += [
        (parent, name, child)
        for b, root in roots
        for parent in getattr(b, root).modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    for parent, name, child in plan:
        setattr(parent, name, LoRALinear(child, **lora))
    return len(plan)


def _image_rows_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Mllama base-model pre-hook: the vision tower on the rows that have images only (module docstring)."""
    rows = kwargs.pop("image_rows", None)
    if rows is None:
        return None  # HF's own inputs (a pixel row per text row): its forward as is
    pixel_values = kwargs.pop("pixel_values", None)
    ratio_ids, ratio_mask = kwargs.pop("aspect_ratio_ids", None), kwargs.pop("aspect_ratio_mask", None)
    if pixel_values is None:
        return args, kwargs
    ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if ref is None:
        ref = args[0]
    states = module.vision_model(
        pixel_values=pixel_values, aspect_ratio_ids=ratio_ids, aspect_ratio_mask=ratio_mask
    ).last_hidden_state  # [image rows, images, tiles, patches, vision dim]
    states = module.multi_modal_projector(states)
    full = states.new_zeros((ref.shape[0],) + tuple(states.shape[1:]))
    full = full.index_copy(0, rows.to(full.device), states)
    kwargs["cross_attention_states"] = full.reshape(-1, states.shape[-2], states.shape[-1])
    return args, kwargs


def prepare_vision(
    model: nn.Module, spec: Any, cfg: Any, *, lora_dtype: torch.dtype = torch.float32, init: bool | str = True
) -> None:
    """The VLM part of `prepare_model` (module docstring); called before the parameters are frozen. `cfg`: the
    `QLoRAConfig`; `lora_dtype` / `init`: its LoRA dtype and initialisation, resolved."""
    parts = spec.vision_parts(model)
    dtypes = sorted({str(p.dtype).replace("torch.", "") for m in parts.values() for p in m.parameters()})
    if getattr(cfg, "train_vision", False):
        n = _vision_lora(model, spec, cfg, lora_dtype, init)
        if not n:
            raise ValueError(f"{type(model).__name__}: --train-vision found no nn.Linear in {', '.join(parts)}")
        surgery.record(
            model,
            STEP,
            ", ".join(f"model.{p}" for p in parts),
            f"{n} vision linears -> LoRALinear (frozen {'/'.join(dtypes)} base, LoRA r={cfg.r})",
        )
    else:
        surgery.record(model, STEP, ", ".join(f"model.{p}" for p in parts), f"frozen in {'/'.join(dtypes)}")
    if spec.cross_attention:
        base = surgery.unwrap(model).get_submodule(model.base_model_prefix)
        handle = base.register_forward_pre_hook(_image_rows_hook, with_kwargs=True)
        surgery.record(
            model,
            STEP,
            f"model.{model.base_model_prefix} (forward pre-hook)",
            "vision tower on the rows with images only (image_rows); zero cross-attention states elsewhere",
            undo_fn=lambda m: handle.remove(),
        )
    surgery.set_state(model, STEP, {"train_vision": bool(getattr(cfg, "train_vision", False))})


def vision_trainable(model: nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters inside the vision tower and projector (empty unless --train-vision)."""
    from quickloris.models.families import family_of

    spec = family_of(model)
    parts = getattr(spec, "vision_parts", None)
    if parts is None:
        return []
    return [p for m in parts(surgery.unwrap(model)).values() for p in m.parameters() if p.requires_grad]


def vision_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    """Every parameter of the vision tower and projector (FSDP2 leaves them whole on every rank: `reduce_vision_grads`
    keeps their LoRA in step)."""
    from quickloris.models.families import family_of

    parts = getattr(family_of(model), "vision_parts", None)
    return [] if parts is None else [p for m in parts(surgery.unwrap(model)).values() for p in m.parameters()]


def reduce_vision_grads(model: nn.Module, world_size: int, group: Any = None) -> int:
    """Average the vision LoRA gradients over the ranks of a sharded run: ``g = (1 / world) * sum_r g_r``, FSDP2's
    reduction of the sharded parameters (each rank backpropagates ``world x`` its share of the loss). Every rank
    reduces every trainable vision parameter in the same order, with a zero gradient where its rows had no image
    (the tower did not run there): the collectives match whatever images each rank drew. Returns the count."""
    import torch.distributed as dist

    params = vision_trainable(model)
    for p in params:
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=group)
        p.grad = g.div_(world_size)
    return len(params)


__all__ = [
    "STEP",
    "is_vision_model",
    "prepare_vision",
    "reduce_vision_grads",
    "vision_parameters",
    "vision_trainable",
]
