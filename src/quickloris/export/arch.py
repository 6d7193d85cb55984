"""The GGUF architecture of a model (see `quickloris.export.archs`: one module per llama.cpp layout).

arch = architecture_of(model)        # from model.config: model_type, else architectures
arch.check(config); arch.hparams(config); arch.gguf_name(hf_name); arch.to_gguf_layout(name, w, config)
"""

from __future__ import annotations

from typing import Any

from quickloris.export.archs import ARCHITECTURES, HF_CLASSES, MODEL_TYPES, architecture_for, gguf_arch_for
from quickloris.export.archs.base import GGUFArch, head_dim, num_kv_heads, rope_parameters
from quickloris.export.archs.llama import llama3_rope_factors

# Hugging Face causal-LM class -> GGUF architecture name (what the export accepts, by config).
SUPPORTED_ARCHITECTURES: dict[str, str] = dict(HF_CLASSES)


def architecture_of(model: Any) -> GGUFArch:
    """The GGUF architecture of `model` (an HF model, or its config), from its config."""
    return architecture_for(getattr(model, "config", model))


__all__ = [
    "ARCHITECTURES",
    "MODEL_TYPES",
    "SUPPORTED_ARCHITECTURES",
    "GGUFArch",
    "architecture_for",
    "architecture_of",
    "gguf_arch_for",
    "head_dim",
    "llama3_rope_factors",
    "num_kv_heads",
    "rope_parameters",
]
