"""`QLoRALinear`: an NF4 base linear layer with one LoRA adapter, in PEFT's parameter naming.

    y = x @ deq(W)^T + s * dropout(x) @ A^T @ B^T (+ bias),    s = alpha / r   (use_rslora: alpha / sqrt(r))

computed by `quickloris.ops.qlora_linear` (the dense W is never saved for backward). Parameters:

* ``weight``: an `NF4Tensor` [out, in], frozen; ``bias``: frozen, or None.
* ``lora_A.<adapter>.weight`` [r, in] and ``lora_B.<adapter>.weight`` [out, r]: the trainable adapter, laid out
  as PEFT lays out ``LoraLayer`` (``lora_A`` / ``lora_B`` ModuleDicts of bias-free ``nn.Linear``), so a module
  path plus ``.lora_A.weight`` is PEFT's saved key (`quickloris.models.adapters`). Initialised as PEFT does by
  default: A like ``nn.Linear`` (Kaiming-uniform, a = sqrt(5)), B = 0, so training starts from the base model.

With ``r == 0`` the layer is the frozen NF4 base alone (used for quantized layers that get no adapter).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from quickloris.ops.qlora_linear import qlora_linear
from quickloris.tensor.nf4_tensor import NF4Tensor


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """PEFT's LoRA scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (0 without an adapter)."""
    return (lora_alpha / (math.sqrt(r) if use_rslora else r)) if r else 0.0


class QLoRALinear(nn.Module):
    """An NF4 linear layer with a LoRA adapter (see the module docstring).

    Args:
        weight: the frozen base weight as an `NF4Tensor` [out, in].
        bias: optional frozen bias [out] (Qwen2's q/k/v projections have one).
        r: LoRA rank (0: no adapter). lora_alpha: LoRA alpha. lora_dropout: dropout probability on the LoRA input.
        use_rslora: scale by alpha / sqrt(r) instead of alpha / r.
        lora_dtype: dtype of the LoRA parameters (float32 keeps fp32 master weights, as PEFT does; the math runs
            in the input's dtype).
        init_lora_weights: True (PEFT's default: A Kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r), B zero)
            or False (A and B both random: for tests, as PEFT's `init_lora_weights=False`).
        adapter_name: the adapter's key in ``lora_A`` / ``lora_B`` ("default", as PEFT).
    """

    def __init__(
        self,
        weight: NF4Tensor,
        bias: torch.Tensor | None = None,
        *,
        r: int = 16,
        lora_alpha: float = 32.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        lora_dtype: torch.dtype = torch.float32,
        init_lora_weights: bool | str = True,
        adapter_name: str = "default",
    ):
        super().__init__()
        if not isinstance(weight, NF4Tensor):
            raise TypeError(f"weight must be an NF4Tensor, got {type(weight).__name__}")
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError(f"r must be a non-negative int, got {r!r}")
        if r > 0 and not lora_alpha > 0:
            raise ValueError(f"lora_alpha must be positive, got {lora_alpha!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if not lora_dtype.is_floating_point:
            raise TypeError(f"lora_dtype must be a float dtype, got {lora_dtype}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must have shape [{self.out_features}], got {tuple(bias.shape)}")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.r, self.lora_alpha, self.lora_dropout = r, float(lora_alpha), float(lora_dropout)
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, self.lora_alpha, use_rslora)
        self.adapter_name = adapter_name
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        if r:
            kw = dict(bias=False, device=weight.device, dtype=lora_dtype)
            self.lora_A[adapter_name] = nn.Linear(self.in_features, r, **kw)
            self.lora_B[adapter_name] = nn.Linear(r, self.out_features, **kw)
            self.reset_lora_parameters(init_lora_weights)

    @classmethod
    def from_linear(cls, linear: nn.Module, *, blocksize: int = 64, double_quant: bool = True, **lora) -> QLoRALinear:
        """From a bitsandbytes ``Linear4bit`` (its NF4 bytes, not copied) or an ``nn.Linear`` (quantized now)."""
        weight = getattr(linear, "weight", None)
        if getattr(weight, "quant_state", None) is not None:
            nf4 = NF4Tensor.from_bnb(weight)
        elif type(linear) is nn.Linear:
            nf4 = NF4Tensor.from_float(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        else:
            raise TypeError(
                f"cannot make a QLoRALinear from {type(linear).__name__}: expected nn.Linear or a "
                "bitsandbytes Linear4bit (NF4)"
            )
        bias = getattr(linear, "bias", None)
        return cls(nf4, None if bias is None else bias.detach(), **lora)

    @torch.no_grad()
    def reset_lora_parameters(self, init: bool | str = True) -> None:
        if not self.r:
            return
        A, B = self.lora_A[self.adapter_name].weight, self.lora_B[self.adapter_name].weight
        if init is True:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)
        elif init == "gaussian":
            nn.init.normal_(A, std=1.0 / self.r)
            nn.init.zeros_(B)
        elif init is False:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init!r}")

    @property
    def lora_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.r:
            return None
        return self.lora_A[self.adapter_name].weight, self.lora_B[self.adapter_name].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r:
            A, B = self.lora_A[self.adapter_name].weight, self.lora_B[self.adapter_name].weight
        else:
            A = B = None
        return qlora_linear(
            x, self.weight, self.bias, A, B, scaling=self.scaling, dropout=self.lora_dropout if self.training else 0.0
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, lora_alpha={self.lora_alpha:g}, lora_dropout={self.lora_dropout:g}, "
            f"scaling={self.scaling:g}, blocksize={self.weight.blocksize}, double_quant={self.weight.nested}"
        )
