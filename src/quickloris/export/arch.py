"""Llama-family architectures in GGUF: tensor names, hyper-parameters, and the q/k row permutation.

Hugging Face Llama checkpoints apply RoPE in the "rotate-half" layout: within each head of
dimension h, component i rotates together with component i + h/2. GGUF's `llama` architecture
(llama.cpp's normal RoPE mode) rotates adjacent pairs (2i, 2i + 1). Both compute the same
attention if the rows of W_q and W_k (and their biases) are reordered per head:

    new row 2i + a  =  old row a * h/2 + i      (a in {0, 1}, i < h/2)

which is `view(n_head, 2, h/2, ...) -> transpose(1, 2)`. Because q and k are permuted the same
way, q.k is unchanged. Qwen2 / Qwen3 GGUF files use the NeoX (rotate-half) mode and keep HF's layout.

llama3-style RoPE scaling (Llama 3.1+) is written as the `rope_freqs.weight` tensor: one divisor
per frequency, theta_i = pos * base^(-2i/d) / f_i, with
    f_i = 1                                  if wavelen_i < L / high_freq_factor
    f_i = factor                             if wavelen_i > L / low_freq_factor
    f_i = 1 / ((1 - s) / factor + s),   s = (L / wavelen_i - low) / (high - low)   otherwise
(L = original_max_position_embeddings, wavelen_i = 2 pi base^(2i/d)), matching HF's inv_freq.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from quickloris.export.writer import GGUFValueType as V

# Hugging Face class -> GGUF architecture name. llama.cpp runs Mistral checkpoints as `llama`.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

_LAYER_MAP = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",  # Qwen3: RMSNorm of each query / key head
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_MAP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


@dataclass(frozen=True)
class Architecture:
    hf_class: str
    gguf_arch: str
    permute_qk: bool

    def gguf_name(self, hf_name: str) -> str:
        """GGUF tensor name of HF parameter `hf_name`; ValueError for parameters GGUF has no place for."""
        if hf_name in _GLOBAL_MAP:
            return _GLOBAL_MAP[hf_name]
        m = _LAYER_RE.match(hf_name)
        if m and m.group(2) in _LAYER_MAP:
            return f"blk.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"
        raise ValueError(f"parameter {hf_name!r} of {self.hf_class} has no GGUF tensor name; "
                         "the export refuses to drop weights silently")

    def to_gguf_layout(self, gguf_name: str, tensor: torch.Tensor, config: Any) -> torch.Tensor:
        """Reorder q/k rows from HF's rotate-half layout to GGUF's interleaved one (llama only)."""
        if not self.permute_qk:
            return tensor
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


def architecture_of(model_or_class: Any) -> Architecture:
    """The supported architecture of a model (or class name); ValueError listing the supported ones."""
    name = model_or_class if isinstance(model_or_class, str) else type(model_or_class).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF export supports {', '.join(SUPPORTED_ARCHITECTURES)}; got {name}")
    gguf_arch = SUPPORTED_ARCHITECTURES[name]
    return Architecture(name, gguf_arch, permute_qk=gguf_arch == "llama")


def num_kv_heads(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config: Any) -> dict[str, Any]:
    """RoPE settings with `rope_theta` and `rope_type`, from transformers 5 or older configs."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    return params


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


def hparams_metadata(arch: Architecture, config: Any) -> list[tuple[str, V, Any]]:
    """(key, type, value) of the model hyper-parameters llama.cpp reads for `arch`."""
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"GGUF {arch.gguf_arch} models use SiLU; this config has hidden_act={act!r}")
    a = arch.gguf_arch
    p = rope_parameters(config)
    hd = head_dim(config)
    kv: list[tuple[str, V, Any]] = [
        (f"{a}.context_length", V.UINT32, config.max_position_embeddings),
        (f"{a}.embedding_length", V.UINT32, config.hidden_size),
        (f"{a}.block_count", V.UINT32, config.num_hidden_layers),
        (f"{a}.feed_forward_length", V.UINT32, config.intermediate_size),
        (f"{a}.attention.head_count", V.UINT32, config.num_attention_heads),
        (f"{a}.attention.head_count_kv", V.UINT32, num_kv_heads(config)),
        (f"{a}.attention.key_length", V.UINT32, hd),
        (f"{a}.attention.value_length", V.UINT32, hd),
        (f"{a}.attention.layer_norm_rms_epsilon", V.FLOAT32, config.rms_norm_eps),
        (f"{a}.rope.dimension_count", V.UINT32, int(hd * float(p.get("partial_rotary_factor", 1.0)))),
        (f"{a}.rope.freq_base", V.FLOAT32, float(p["rope_theta"])),
        (f"{a}.vocab_size", V.UINT32, config.vocab_size),
    ]
    rope_type = p["rope_type"]
    if rope_type == "linear":
        kv += [(f"{a}.rope.scaling.type", V.STRING, "linear"), (f"{a}.rope.scaling.factor", V.FLOAT32, float(p["factor"]))]
    elif rope_type == "llama3":
        if arch.gguf_arch != "llama":
            raise ValueError(f"llama3 RoPE scaling is only supported for llama models, not {arch.hf_class}")
    elif rope_type != "default":
        raise ValueError(f"RoPE type {rope_type!r} is not supported by the GGUF export (default, linear, llama3)")
    return kv
