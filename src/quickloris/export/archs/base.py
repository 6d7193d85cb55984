"""What the GGUF export knows about one llama.cpp architecture (`GGUFArch`), and the config readers they share.

A `GGUFArch` maps a Hugging Face causal LM's parameters to llama.cpp's tensor names and layouts and its config to
the metadata keys llama.cpp's loader reads for that architecture, as llama.cpp's own converter
(convert_hf_to_gguf.py) writes them. What llama.cpp cannot compute for a config is refused in one line
(`check`); what it computes differently only beyond some context length is said in a note (`notes`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from quickloris.export.writer import GGUFValueType as V

# (key, value type, value, array element type or None)
KV = tuple[str, V, Any, "V | None"]

# Llama-layout decoder layers: HF module path inside `model.layers.<i>` -> GGUF tensor kind.
LLAMA_LAYER_MAP: Mapping[str, str] = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",  # Qwen3 / Gemma-3: RMSNorm of each query / key head
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GLOBAL_MAP: Mapping[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def kv(key: str, vtype: V, value: Any, elem: V | None = None) -> KV:
    return (key, vtype, value, elem)


def num_kv_heads(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """RoPE settings with `rope_theta` and `rope_type`, from transformers 5 (per layer type where the config has
    one dict per layer type, e.g. Gemma-3's ``sliding_attention`` / ``full_attention``) or older configs."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    nested = {k: v for k, v in params.items() if isinstance(v, dict)}
    if nested:
        params = dict(nested.get(layer_type or "full_attention") or next(iter(nested.values())))
    elif layer_type == "sliding_attention" and getattr(config, "rope_local_base_freq", None) is not None:
        params = {"rope_type": "default", "rope_theta": config.rope_local_base_freq}  # Gemma-3, transformers < 5
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    return params


def layer_types(config: Any) -> list[str]:
    """``full_attention`` / ``sliding_attention`` per layer (all full when the config names none)."""
    types = getattr(config, "layer_types", None)
    return list(types) if types else ["full_attention"] * config.num_hidden_layers


class GGUFArch:
    """One llama.cpp architecture. Subclasses set the class attributes and extend `check`, `hparams`, ...

    * `layer_map` / `global_map`: HF parameter names -> GGUF tensor names (weights and biases alike);
    * `rope_types`: the HF RoPE types the architecture's GGUF metadata can express;
    * `norm_offset`: added to every ``*_norm.weight`` (Gemma computes ``x * (1 + w)``, llama.cpp ``x * w``);
    * `separate_output`: whether llama.cpp reads an ``output.weight`` (False: token_embd is the output matrix);
    * `activations`: the ``hidden_act`` / ``hidden_activation`` values llama.cpp's graph computes.
    """

    name: str = ""
    layer_map: Mapping[str, str] = LLAMA_LAYER_MAP
    global_map: Mapping[str, str] = GLOBAL_MAP
    rope_types: tuple[str, ...] = ("default", "linear")
    norm_offset: float = 0.0
    separate_output: bool = True
    activations: tuple[str, ...] = ("silu", "swish")

    def gguf_name(self, hf_name: str) -> str:
        """GGUF tensor name of HF parameter `hf_name`; ValueError for parameters GGUF has no place for."""
        if hf_name in self.global_map:
            return self.global_map[hf_name]
        m = _LAYER_RE.match(hf_name)
        if m and m.group(2) in self.layer_map:
            return f"blk.{m.group(1)}.{self.layer_map[m.group(2)]}.{m.group(3)}"
        raise ValueError(
            f"parameter {hf_name!r} has no tensor in llama.cpp's {self.name} architecture; "
            "the export refuses to drop weights silently"
        )

    def to_gguf_layout(self, gguf_name: str, tensor: torch.Tensor, config: Any) -> torch.Tensor:
        """The merged float32 weight as llama.cpp stores it (here: Gemma's norm offset)."""
        if self.norm_offset and gguf_name.endswith("_norm.weight"):
            return tensor + self.norm_offset
        return tensor

    def activation(self, config: Any) -> str:
        return getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None) or "silu"

    def check(self, config: Any) -> None:
        """ValueError (one line) for a config llama.cpp would compute differently."""
        act = self.activation(config)
        if act not in self.activations:
            raise ValueError(
                f"llama.cpp's {self.name} models use {' / '.join(self.activations)}; this config has activation {act!r}"
            )
        self.check_rope(rope_parameters(config))

    def check_rope(self, rope: dict[str, Any], where: str = "") -> None:
        if rope["rope_type"] not in self.rope_types:
            raise ValueError(
                f"RoPE type {rope['rope_type']!r}{where} is not supported by the GGUF export of "
                f"{self.name} models ({', '.join(self.rope_types)})"
            )

    def hparams(self, config: Any) -> list[KV]:
        """(key, type, value, element type) of the hyper-parameters llama.cpp reads for this architecture."""
        return common_hparams(self.name, config, rope_parameters(config))

    def extra_tensors(self, config: Any) -> dict[str, torch.Tensor]:
        """Tensors llama.cpp needs that the model has no parameter for (RoPE factors), by GGUF name."""
        return {}

    def notes(self, config: Any) -> list[str]:
        """What the file computes differently from the HF model, and where (beyond some context length)."""
        return []

    def more_bits_for_attn_v(self, config: Any) -> bool:
        """llama-quantize's "70B" rule (attn_v Q4_K -> Q5_K) applies: llama.cpp types the model as 70B."""
        return False


def common_hparams(a: str, config: Any, rope: dict[str, Any]) -> list[KV]:
    """The keys every architecture here shares; `rope`: the RoPE settings of the full-attention layers."""
    hd = head_dim(config)
    out = [
        kv(f"{a}.context_length", V.UINT32, config.max_position_embeddings),
        kv(f"{a}.embedding_length", V.UINT32, config.hidden_size),
        kv(f"{a}.block_count", V.UINT32, config.num_hidden_layers),
        kv(f"{a}.feed_forward_length", V.UINT32, config.intermediate_size),
        kv(f"{a}.attention.head_count", V.UINT32, config.num_attention_heads),
        kv(f"{a}.attention.head_count_kv", V.UINT32, num_kv_heads(config)),
        kv(f"{a}.attention.key_length", V.UINT32, hd),
        kv(f"{a}.attention.value_length", V.UINT32, hd),
        kv(f"{a}.attention.layer_norm_rms_epsilon", V.FLOAT32, config.rms_norm_eps),
        kv(f"{a}.rope.dimension_count", V.UINT32, int(hd * float(rope.get("partial_rotary_factor", 1.0)))),
        kv(f"{a}.rope.freq_base", V.FLOAT32, float(rope["rope_theta"])),
        kv(f"{a}.vocab_size", V.UINT32, config.vocab_size),
    ]
    if rope["rope_type"] == "linear":
        out += [
            kv(f"{a}.rope.scaling.type", V.STRING, "linear"),
            kv(f"{a}.rope.scaling.factor", V.FLOAT32, float(rope["factor"])),
        ]
    return out


def sliding_window_note(a: str, config: Any, window: int | None) -> list[str]:
    """A note when HF limits attention to `window` tokens below the model's context and llama.cpp's `a` does not."""
    if window and window < config.max_position_embeddings:
        return [
            (
                f"llama.cpp's {a} attends over the whole context, the HF model over the last {window} tokens "
                f"(sliding_window): their outputs differ from position {window} on"
            )
        ]
    return []
