"""quickloris: fast, memory-lean QLoRA fine-tuning of Hugging Face LLMs.

`import quickloris` is light: it imports neither transformers nor Triton and initialises no CUDA
context. The public names below resolve lazily on first access.

Layers import one way only (see docs/architecture.md):
    quant (format) / kernels -> ops (autograd) -> nn (modules) -> models (HF model preparation)
    -> parallel (FSDP2, compile, checkpointing) -> hf (Trainer integration) -> cli
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> "module:attribute"
_LAZY = {
    "dequantize_nf4": "quickloris.kernels.nf4_dequant:dequantize_nf4",
    "quantize_nf4": "quickloris.kernels.nf4_quantize:quantize_nf4",
    "NF4State": "quickloris.quant.nf4:NF4State",
    "MemoryEfficientLinear": "quickloris.ops.chunked_linear:MemoryEfficientLinear",
    "chunked_linear_loss": "quickloris.ops.chunked_linear:chunked_linear_loss",
    "NF4Tensor": "quickloris.tensor.nf4_tensor:NF4Tensor",
    "QLoRALinear": "quickloris.nn.qlora_linear:QLoRALinear",
    "QLoRAConfig": "quickloris.models.prepare:QLoRAConfig",
    "prepare_model": "quickloris.models.prepare:prepare_model",
    "build_training_model": "quickloris.parallel.compose:build_training_model",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'quickloris' has no attribute {name!r}")
    module_name, attr = target.split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
