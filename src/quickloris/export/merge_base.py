"""Which base weights the LoRA is merged into (`quickloris export gguf --merge-base`).

* ``nf4``: the weights the run trained and scored with (`quickloris.models.adapter_base`): every decoder linear
  quantized to NF4 and dequantized as the run did it (its block size, double quantization, rounding, dtype),
  every other base weight in the run's dtype, so the merged weight is

      W' = dequant_NF4(quant_NF4(W.to(dtype))) + s * B @ A          (decoder linears)

  and the exported model computes what ``quickloris train`` / ``quickloris eval --adapter`` scored. Weights that
  are 4-bit already (a ``*-bnb-4bit`` folder, a model from `prepare_model`, a PeftModel over bitsandbytes) are
  the run's base as stored.
* ``original``: the weights as stored, ``W' = W + s * B @ A``. The LoRA was trained against the NF4 base, so
  this model differs from the scored one by the NF4 quantization error ``W - dequant(quant(W))`` of every decoder
  linear. There is no such base when the linears are stored in 4 bits.
* ``as-stored`` (no choice made, no adapter folder): the weights the model object holds, NF4 or 16-bit.

NF4 quantization runs on a GPU when the run used one and one is present (the same code on the same kind of
device: the run's bytes); otherwise on the CPU with the run's rounding, where only the float32 summation order of
one mean per tensor (the double-quantization offset) can differ from a GPU run's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from quickloris.export.merge import dequantize_base_weight
from quickloris.models.adapter_base import NF4Base

MERGE_BASES = ("nf4", "original")


def is_4bit(param: Any) -> bool:
    """A weight stored in 4 bits: quickloris' NF4Tensor or a bitsandbytes Params4bit."""
    return getattr(param, "quant_state", None) is not None or (
        type(param).__name__ == "NF4Tensor" and hasattr(param, "nf4_components")
    )


def decoder_linear_weights(base: Any, params: dict[str, torch.Tensor]) -> frozenset[str]:
    """Names of the weights `prepare_model` quantizes to NF4: every linear layer of the decoder (``base.model``)."""
    from quickloris.export.merge import _plain

    names = set()
    for name, module in base.named_modules():
        plain = ".".join(p for p in _plain(name).split(".") if p != "base_layer")
        if not plain.startswith("model.") or "Linear" not in type(module).__name__:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and f"{plain}.weight" in params and len(_shape(weight)) == 2:
            names.add(f"{plain}.weight")
    return frozenset(names)


def _shape(param: Any) -> tuple[int, ...]:
    state = getattr(param, "quant_state", None)
    return tuple(state.shape) if state is not None else tuple(param.shape)


@dataclasses.dataclass(frozen=True)
class MergeBase:
    """The base weights to merge into: `kind` (nf4, original or as-stored), the run's NF4 settings, and which
    weights are decoder linears."""

    kind: str
    nf4: NF4Base | None = None
    linears: frozenset[str] = frozenset()

    def weight(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """Base weight `name` as a new float32 CPU tensor."""
        w = dequantize_base_weight(param)
        if self.kind != "nf4":
            return w
        dtype = self.nf4.torch_dtype
        if name in self.linears and not is_4bit(param):
            from quickloris.kernels.nf4_quantize import quantize_nf4  # on CUDA: bitsandbytes' CUDA bytes
            from quickloris.quant.nf4 import dequantize_nf4_reference

            device = "cuda" if self.nf4.rounding == "bnb-cuda" and torch.cuda.is_available() else "cpu"
            packed, state = quantize_nf4(
                w.to(device=device, dtype=dtype),
                blocksize=self.nf4.blocksize,
                double_quant=self.nf4.double_quant,
                rounding=self.nf4.rounding,
            )
            return dequantize_nf4_reference(packed, state, dtype=dtype).to(device="cpu", dtype=torch.float32)
        return w.to(dtype).float()

    def describe(self) -> str:
        if self.kind == "nf4":
            return f"nf4, the NF4 base the adapter was trained on ({self.nf4.describe()})"
        if self.kind == "original":
            return "original, the base weights as stored (not the NF4 base the adapter was trained on)"
        return "the weights the model holds"


def resolve_merge_base(
    kind: str | None,
    base: Any,
    params: dict[str, torch.Tensor],
    *,
    folder_adapter: bool,
    nf4: NF4Base | None,
    option: str = "merge_base",
) -> MergeBase:
    """The `MergeBase` for choice `kind` (None: nf4 with an adapter folder, else the weights as held)."""
    if kind is None:
        kind = "nf4" if folder_adapter else "as-stored"
    if kind not in (*MERGE_BASES, "as-stored"):
        raise ValueError(f"{option} must be one of {', '.join(MERGE_BASES)}, got {kind!r}")
    linears = decoder_linear_weights(base, params)
    if kind == "original":
        packed = sorted(n for n in linears if is_4bit(params[n]))
        if packed:
            raise ValueError(
                f"{option} original: the base model's linear layers are stored in 4 bits (e.g. "
                f"{packed[0]}), there are no 16-bit weights to merge into; use {option} nf4"
            )
    if kind == "nf4" and not linears:
        raise ValueError(f"{option} nf4: found no decoder linear layers to quantize")
    return MergeBase(kind, (nf4 or NF4Base()) if kind == "nf4" else None, linears)
