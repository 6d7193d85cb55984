"""`LoRALinear`: a frozen 16-bit linear layer with one LoRA adapter (a vision tower's layers with --train-vision).

    y = x @ W^T (+ bias) + s * dropout(x) @ A^T @ B^T,    s = alpha / r   (use_rslora: alpha / sqrt(r))

The base ``weight`` / ``bias`` stay in the dtype they were loaded in (bf16 on a GPU), frozen; ``lora_A`` / ``lora_B``
are laid out and initialised as in `quickloris.nn.qlora_linear.QLoRALinear` (PEFT's names, so the adapter files
are PEFT's), and the LoRA math runs in the input's dtype. Autograd saves x and the small [T, r] product; W is a
parameter already, so nothing of size [out, in] is added.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quickloris.nn.qlora_linear import QLoRALinear, lora_scaling


class LoRALinear(nn.Module):
    """A frozen dense linear layer plus a LoRA adapter (see the module docstring)."""

    def __init__(
        self,
        linear: nn.Linear,
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
        if type(linear) is not nn.Linear:
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(linear).__name__}")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self.out_features, self.in_features = linear.out_features, linear.in_features
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = (
            r,
            float(lora_alpha),
            float(lora_dropout),
            use_rslora,
        )
        self.scaling = lora_scaling(r, self.lora_alpha, use_rslora)
        self.adapter_name = adapter_name
        kw = dict(bias=False, device=linear.weight.device, dtype=lora_dtype)
        self.lora_A = nn.ModuleDict({adapter_name: nn.Linear(self.in_features, r, **kw)})
        self.lora_B = nn.ModuleDict({adapter_name: nn.Linear(r, self.out_features, **kw)})
        self.reset_lora_parameters(init_lora_weights)

    reset_lora_parameters = QLoRALinear.reset_lora_parameters
    lora_weights = QLoRALinear.lora_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.lora_weights
        lora_in = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        out = F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return out + self.scaling * F.linear(F.linear(lora_in, A.to(x.dtype)), B.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}, base dtype={self.weight.dtype}"
        )
