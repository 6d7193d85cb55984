"""Export of fine-tuned models to GGUF (llama.cpp / Ollama / LM Studio) through the C++ core in csrc/.

    from quickloris.export import export_gguf
    export_gguf(peft_model, "model.gguf", tokenizer=tok, quant="q4_k_m")

Names resolve lazily so `import quickloris.export` does not import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "export_gguf": "quickloris.export.gguf_export:export_gguf",
    "export_from_config": "quickloris.export.gguf_export:export_from_config",
    "GGUFExportConfig": "quickloris.export.gguf_export:GGUFExportConfig",
    "GGUFWriter": "quickloris.export.writer:GGUFWriter",
    "GGMLType": "quickloris.export.quants:GGMLType",
    "quantize": "quickloris.export.quants:quantize",
    "dequantize": "quickloris.export.quants:dequantize",
    "PRESETS": "quickloris.export.quants:PRESETS",
    "SUPPORTED_ARCHITECTURES": "quickloris.export.arch:SUPPORTED_ARCHITECTURES",
    "ARCHITECTURES": "quickloris.export.archs:ARCHITECTURES",
    "gguf_arch_for": "quickloris.export.archs:gguf_arch_for",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'quickloris.export' has no attribute {name!r}")
    module_name, attr = target.split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value
