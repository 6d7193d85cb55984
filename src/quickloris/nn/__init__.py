"""Modules: the NF4 weight tensor subclass and the QLoRA linear layer (no transformers import)."""

from quickloris.tensor.nf4_tensor import NF4Tensor
from quickloris.nn.qlora_linear import QLoRALinear

__all__ = ["NF4Tensor", "QLoRALinear"]
