"""GGUF ``qwen2`` (Qwen2, Qwen2.5: q/k/v biases, often tied embeddings) and ``qwen3`` (per-head q/k RMSNorm).

Both use llama.cpp's NeoX RoPE mode, HF's rotate-half layout: the q/k rows are kept as stored. HF's optional
sliding window (``use_sliding_window``: the layers from ``max_window_layers`` on) has no llama.cpp counterpart:
a note says from where the outputs differ.
"""

from __future__ import annotations

from typing import Any

from quickloris.export.archs.base import GGUFArch, layer_types, sliding_window_note


class Qwen2(GGUFArch):
    name = "qwen2"

    def notes(self, config: Any) -> list[str]:
        if "sliding_attention" not in layer_types(config):
            return []
        return sliding_window_note(self.name, config, getattr(config, "sliding_window", None))

    def more_bits_for_attn_v(self, config: Any) -> bool:
        return config.num_hidden_layers == 80  # llama.cpp types an 80-layer qwen2 as 70B


class Qwen3(Qwen2):
    name = "qwen3"

    def more_bits_for_attn_v(self, config: Any) -> bool:
        return False
