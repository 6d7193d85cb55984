"""Test helpers shared across test modules (``from tests.helpers import ...``): HF / PEFT reference twins of a
prepared model, tolerances derived from the dtype, and packed / padded batches of the same documents."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def dequantized_twin(reference: nn.Module, prepared: nn.Module) -> nn.Module:
    """A copy of the 16-bit `reference` model whose weights at each of `prepared`'s QLoRA layers are that layer's
    dequantized NF4 weight (fp32): the model transformers computes with quickloris' base weights."""
    from quickloris.nn.qlora_linear import QLoRALinear

    twin = copy.deepcopy(reference)
    for name, mod in prepared.named_modules():
        if isinstance(mod, QLoRALinear):
            with torch.no_grad():
                twin.get_submodule(name).weight.copy_(mod.weight.dequantize(torch.float32))
    return twin


def peft_twin(reference: nn.Module, prepared: nn.Module, *, r: int, lora_alpha: float, targets=None,
              use_rslora: bool = False) -> nn.Module:
    """`dequantized_twin` with PEFT LoRA layers on the same modules, holding `prepared`'s LoRA matrices."""
    import peft

    from quickloris.models.adapters import lora_layers

    layers = lora_layers(prepared)
    names = sorted({path.rsplit(".", 1)[-1] for path in layers}) if targets is None else list(targets)
    pm = peft.get_peft_model(dequantized_twin(reference, prepared), peft.LoraConfig(
        r=r, lora_alpha=lora_alpha, use_rslora=use_rslora, target_modules=names, lora_dropout=0.0))
    for name, mod in layers.items():
        theirs = pm.base_model.model.get_submodule(name)
        with torch.no_grad():
            theirs.lora_A["default"].weight.copy_(mod.lora_A.default.weight)
            theirs.lora_B["default"].weight.copy_(mod.lora_B.default.weight)
    return pm


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """{quickloris / PEFT module path + .lora_A / .lora_B: gradient} of a quickloris or PEFT model."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None and (".lora_A." in name or ".lora_B." in name):
            out[name.replace("base_model.model.", "", 1).replace(".default.weight", "")] = p.grad.detach().clone()
    return out


def reorder_tolerance(dtype: torch.dtype, reduction: int, depth: int) -> float:
    """Relative bound on the difference of two computations of the same values that differ only in the order of
    their floating-point sums (matmul blocking, fused vs unfused attention): each sum of `reduction` terms is off
    by at most ~sqrt(reduction) rounding errors of eps (random-walk bound of reordered rounding), and the errors of
    `depth` such sums in sequence add up."""
    return torch.finfo(dtype).eps * math.sqrt(reduction) * depth


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rel: float, what: str = "") -> None:
    """``|got - want|_max <= rel * |want|_max`` (an error relative to the tensor's scale, not per element: entries
    that nearly cancel carry the absolute error of their big neighbours)."""
    scale = float(want.abs().max().clamp_min(torch.finfo(want.dtype).tiny))
    err = float((got - want).abs().max())
    assert err <= rel * scale, f"{what}: max |diff| {err:.3g} > {rel:.3g} * {scale:.3g}"


def packed_and_padded(lengths: list[int], vocab: int, *, gen: torch.Generator | None = None):
    """The same documents (random ids, every token a target) as one packed row and as a right-padded batch:
    ``(packed, padded)`` dicts of model inputs (`quickloris.data.packing`'s collators)."""
    from quickloris.data.chat import TokenizedExample
    from quickloris.data.packing import collate_packed, collate_padded

    docs = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        docs.append(TokenizedExample(ids, list(ids)))
    packed = collate_packed(docs)
    padded = collate_padded(docs, pad_token_id=0)
    return packed, padded
