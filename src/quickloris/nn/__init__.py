"""Modules: the NF4 weight tensor subclass and the QLoRA linear layer (no transformers import)."""

from quickloris.nn.qlora_linear import QLoRALinear
from quickloris.tensor.nf4_tensor import NF4Tensor

__all__ = ["NF4Tensor", "QLoRALinear"]
