"""GGUF ``phi3``: Phi-3, Phi-3.5 and Phi-4 (``Phi3ForCausalLM``), as llama.cpp's converter writes them.

* Fused projections stay fused: ``qkv_proj`` (rows q, k, v) -> ``attn_qkv``, which llama.cpp splits in the same
  order, and ``gate_up_proj`` (rows gate, up) -> ``ffn_up``, which llama.cpp's SwiGLU splits in halves as
  silu(first) * second: HF's ``gate, up = chunk(2)``, ``up * silu(gate)``. A LoRA on a fused layer (PEFT targets
  ``qkv_proj`` / ``gate_up_proj``) is merged into the fused weight like any other.
* RoPE in NeoX mode (HF's layout, rows kept), over the first ``partial_rotary_factor`` of each head (Phi-4-mini).
* LongRoPE (``rope_type`` longrope / su: Phi-3-*-128k, Phi-3.5, Phi-4-mini): ``long_factor`` / ``short_factor``
  become the tensors ``rope_factors_long`` / ``rope_factors_short`` (theta_i = pos * base^(-2i/d) / f_i, as HF's
  inv_freq), the cos/sin scale as ``rope.scaling.attn_factor`` (HF's ``attention_factor``, by default
  sqrt(1 + ln(s) / ln(L)) with s = max_position_embeddings / L, L = original_max_position_embeddings) and L as
  ``rope.scaling.original_context_length``. HF uses the long factors when the sequence is longer than L,
  llama.cpp when its context (n_ctx, a multiple of 256) is: a note says so.
* ``sliding_window`` is written (0 when None) as the converter does; llama.cpp's phi3 graph ignores it: a note
  says from where the outputs differ when the window is shorter than the context.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from quickloris.export.archs.base import GGUFArch, common_hparams, head_dim, kv, rope_parameters, sliding_window_note
from quickloris.export.writer import GGUFValueType as V

LONGROPE = ("longrope", "su")


def rotary_dim(config: Any) -> int:
    return int(head_dim(config) * float(rope_parameters(config).get("partial_rotary_factor", 1.0)))


def original_context(config: Any) -> int | None:
    rope = rope_parameters(config)
    return rope.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)


def longrope_attention_factor(config: Any) -> float:
    """HF's LongRoPE cos/sin scale: ``attention_factor`` if set, else sqrt(1 + ln(s) / ln(L)) for s > 1, else 1."""
    rope = rope_parameters(config)
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    orig = original_context(config)
    scale = float(rope.get("factor") or config.max_position_embeddings / orig)
    return math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0


class Phi3(GGUFArch):
    name = "phi3"
    layer_map = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.qkv_proj": "attn_qkv",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    rope_types = ("default", "linear", *LONGROPE)

    def check(self, config: Any) -> None:
        super().check(config)
        if head_dim(config) * config.num_attention_heads != config.hidden_size:
            raise ValueError(
                f"llama.cpp's {self.name} needs heads x head_dim = hidden_size; this config has "
                f"{config.num_attention_heads} x {head_dim(config)} != {config.hidden_size}"
            )
        rope = rope_parameters(config)
        if rope["rope_type"] in LONGROPE:
            if not original_context(config):
                raise ValueError("a LongRoPE config needs original_max_position_embeddings")
            half = rotary_dim(config) // 2
            for key in ("long_factor", "short_factor"):
                if len(rope.get(key) or []) != half:
                    raise ValueError(
                        f"LongRoPE {key} needs {half} values (one per rotary frequency), got {len(rope.get(key) or [])}"
                    )

    def hparams(self, config: Any) -> list:
        a = self.name
        out = common_hparams(a, config, rope_parameters(config))
        if original_context(config):
            out.append(kv(f"{a}.rope.scaling.original_context_length", V.UINT32, original_context(config)))
        out.append(kv(f"{a}.attention.sliding_window", V.UINT32, getattr(config, "sliding_window", None) or 0))
        if rope_parameters(config)["rope_type"] in LONGROPE:
            out.append(kv(f"{a}.rope.scaling.attn_factor", V.FLOAT32, longrope_attention_factor(config)))
        return out

    def extra_tensors(self, config: Any) -> dict[str, torch.Tensor]:
        rope = rope_parameters(config)
        if rope["rope_type"] not in LONGROPE:
            return {}
        return {
            f"rope_factors_{kind}.weight": torch.tensor(rope[f"{kind}_factor"], dtype=torch.float32)
            for kind in ("long", "short")
        }

    def notes(self, config: Any) -> list[str]:
        out = sliding_window_note(self.name, config, getattr(config, "sliding_window", None))
        if rope_parameters(config)["rope_type"] in LONGROPE:
            out.append(
                f"LongRoPE: llama.cpp uses the long factors when its context (n_ctx) exceeds "
                f"{original_context(config)} tokens, HF when the sequence does"
            )
        return out
