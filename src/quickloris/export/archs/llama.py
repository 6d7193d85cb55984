"""GGUF ``llama``: Llama, Mistral and Mistral-Nemo (``head_dim`` != hidden / heads: written as
``attention.key_length`` / ``value_length``).

Hugging Face Llama checkpoints apply RoPE in the "rotate-half" layout: within each head of dimension h, component
i rotates together with component i + h/2. GGUF's `llama` architecture (llama.cpp's normal RoPE mode) rotates
adjacent pairs (2i, 2i + 1). Both compute the same attention if the rows of W_q and W_k (and their biases) are
reordered per head:

    new row 2i + a  =  old row a * h/2 + i      (a in {0, 1}, i < h/2)

which is `view(n_head, 2, h/2, ...) -> transpose(1, 2)`. Because q and k are permuted the same way, q.k is
unchanged.

llama3-style RoPE scaling (Llama 3.1+) is written as the `rope_freqs.weight` tensor: one divisor per frequency,
theta_i = pos * base^(-2i/d) / f_i, with
    f_i = 1                                  if wavelen_i < L / high_freq_factor
    f_i = factor                             if wavelen_i > L / low_freq_factor
    f_i = 1 / ((1 - s) / factor + s),   s = (L / wavelen_i - low) / (high - low)   otherwise
(L = original_max_position_embeddings, wavelen_i = 2 pi base^(2i/d)), matching HF's inv_freq.

Mistral's model-wide ``sliding_window`` (7B v0.1: 4096) has no llama.cpp counterpart: a note says from where the
outputs differ.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from quickloris.export.archs.base import GGUFArch, head_dim, num_kv_heads, rope_parameters, sliding_window_note


def llama3_rope_factors(config: Any) -> torch.Tensor:
    """Per-frequency divisors f_i of llama3 RoPE scaling (see the module docstring), float32 [d/2]."""
    p = rope_parameters(config)
    dim = head_dim(config)
    base = float(p["rope_theta"])
    factor = float(p["factor"])
    low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    old_len = float(p.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


class Llama(GGUFArch):
    name = "llama"
    rope_types = ("default", "linear", "llama3")

    def to_gguf_layout(self, gguf_name: str, tensor: torch.Tensor, config: Any) -> torch.Tensor:
        """Reorder q/k rows from HF's rotate-half layout to GGUF's interleaved one."""
        kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
        if kind == "attn_q":
            n_head = config.num_attention_heads
        elif kind == "attn_k":
            n_head = num_kv_heads(config)
        else:
            return tensor
        rows = tensor.shape[0]
        if rows % (2 * n_head):
            raise ValueError(f"{gguf_name}: {rows} rows do not split into {n_head} heads of even size")
        rest = tensor.shape[1:]
        return tensor.reshape(n_head, 2, rows // n_head // 2, *rest).transpose(1, 2).reshape(rows, *rest)

    def extra_tensors(self, config: Any) -> dict[str, torch.Tensor]:
        if rope_parameters(config)["rope_type"] == "llama3":
            return {"rope_freqs.weight": llama3_rope_factors(config)}
        return {}

    def notes(self, config: Any) -> list[str]:
        return sliding_window_note(self.name, config, getattr(config, "sliding_window", None))

    def more_bits_for_attn_v(self, config: Any) -> bool:
        # llama.cpp types an 80-layer llama as 70B (GQA) or 65B (heads == kv heads)
        return config.num_hidden_layers == 80 and num_kv_heads(config) != config.num_attention_heads
