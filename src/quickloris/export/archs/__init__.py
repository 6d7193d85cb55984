"""The llama.cpp architectures the GGUF export writes, keyed by llama.cpp's name, and how a config picks one.

    arch = ARCHITECTURES[gguf_arch_for(model.config)]

`gguf_arch_for` reads the config (``model_type``, else ``architectures``), never the Python class: a model loaded
from any folder, wrapped or renamed, maps the same way. One module per family of GGUF layouts: `llama` (Llama,
Mistral, Mistral-Nemo), `qwen` (qwen2: Qwen2 / Qwen2.5, qwen3), `gemma` (gemma2, gemma3), `phi3` (Phi-3 / 3.5 / 4),
`qwen2vl` (the language model of Qwen2-VL / Qwen2.5-VL). Vision towers: `quickloris.export.vision`.
"""

from __future__ import annotations

from typing import Any

from quickloris.export.archs.base import GGUFArch
from quickloris.export.archs.gemma import Gemma2, Gemma3
from quickloris.export.archs.llama import Llama
from quickloris.export.archs.phi3 import Phi3
from quickloris.export.archs.qwen import Qwen2, Qwen3
from quickloris.export.archs.qwen2vl import Qwen2VL

ARCHITECTURES: dict[str, GGUFArch] = {
    a.name: a for a in (Llama(), Qwen2(), Qwen3(), Gemma2(), Gemma3(), Phi3(), Qwen2VL())
}

# config.model_type -> llama.cpp architecture (llama.cpp runs Mistral and Mistral-Nemo as `llama`)
MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    # the language models of Qwen2-VL / Qwen2.5-VL (their text_config; `quickloris.export.vlm`)
    "qwen2_vl_text": "qwen2vl",
    "qwen2_5_vl_text": "qwen2vl",
}
# the vision-language models (`quickloris.export.vlm`: their vision part needs `quickloris.export.vision`)
VLM_MODEL_TYPES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
# config.architectures[i] -> llama.cpp architecture, for configs without a model_type
HF_CLASSES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
}


def gguf_arch_for(config: Any) -> str:
    """llama.cpp's architecture name for an HF config; ValueError (one line) naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    classes = list(getattr(config, "architectures", None) or [])
    if not model_type:
        for cls in classes:
            if cls in HF_CLASSES:
                return HF_CLASSES[cls]
    got = f"model_type {model_type!r}" + (f" ({', '.join(classes)})" if classes else "")
    causal = [t for t in MODEL_TYPES if not t.endswith("_vl_text")]  # those are VLMs' text_config types
    raise ValueError(
        f"GGUF export supports the model types {', '.join(causal)} (llama.cpp's "
        f"{', '.join(sorted(set(MODEL_TYPES[t] for t in causal), key=list(ARCHITECTURES).index))}) and the "
        f"vision-language models {', '.join(VLM_MODEL_TYPES)}; got {got}"
    )


def architecture_for(config: Any) -> GGUFArch:
    return ARCHITECTURES[gguf_arch_for(config)]


__all__ = [
    "ARCHITECTURES",
    "GGUFArch",
    "HF_CLASSES",
    "MODEL_TYPES",
    "VLM_MODEL_TYPES",
    "architecture_for",
    "gguf_arch_for",
]
