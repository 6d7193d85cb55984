"""GGUF ``gemma2`` and ``gemma3`` (Gemma-3 text: ``Gemma3ForCausalLM``, model_type ``gemma3_text``).

What differs from Llama, and how the file says it (as llama.cpp's converter writes Gemma files):

* RMSNorm: HF computes ``x_hat * (1 + w)`` with the stored, zero-centred w; llama.cpp computes ``x_hat * w``, so
  every norm weight (attention / FFN pre- and post-norms, the final norm, Gemma-3's per-head q/k norms) is stored
  as ``1 + w``, added in float32 after the LoRA merge, exactly the factor HF forms.
* Norm names: ``post_attention_layernorm`` is the attention's *post*-norm (``post_attention_norm``, not Llama's
  ``ffn_norm``), ``pre_feedforward_layernorm`` -> ``ffn_norm``, ``post_feedforward_layernorm`` -> ``post_ffw_norm``.
* Embeddings are multiplied by sqrt(hidden_size) in both (llama.cpp does it itself: the file stores them unscaled).
* Attention scale: llama.cpp multiplies queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B shapes
  (46 layers Gemma-2, 62 layers Gemma-3); HF by ``query_pre_attn_scalar ** -0.5``. Any other scalar is refused.
* Softcapping: Gemma-2 caps attention scores and final logits (``cap * tanh(s / cap)``) with the caps written as
  ``attn_logit_softcapping`` / ``final_logit_softcapping`` (llama.cpp's Gemma-2 always caps: a config without caps
  is refused). Gemma-3's attention ignores ``attn_logit_softcapping`` in HF and llama.cpp alike; its final cap is
  written when set.
* Sliding window: ``sliding_window`` (HF and llama.cpp both let position q see k when q - k < window) for the
  layers ``layer_types`` marks ``sliding_attention``. llama.cpp assumes Gemma-2's pattern (even layers slide) and
  Gemma-3's (five of each six slide); another pattern is written per layer as ``attention.sliding_window_pattern``
  (an array of bools, which llama.cpp reads in place of the default).
* RoPE (NeoX mode, HF's layout): Gemma-3's sliding layers use ``rope.freq_base_swa`` (local base, unscaled), the
  full layers ``rope.freq_base`` and the linear scaling of ``rope_parameters["full_attention"]``.
* Gemma-2's llama.cpp graph has no ``output.weight``: the (tied) embedding is the output matrix, so a model whose
  head differs from its embedding (untied, or an adapter on only one of them) is refused. Gemma-3 reads an
  optional ``output.weight``.
"""

from __future__ import annotations

from typing import Any

from quickloris.export.archs.base import (
    LLAMA_LAYER_MAP,
    GGUFArch,
    common_hparams,
    head_dim,
    kv,
    layer_types,
    rope_parameters,
)
from quickloris.export.writer import GGUFValueType as V

GEMMA_LAYER_MAP = {
    **{k: v for k, v in LLAMA_LAYER_MAP.items() if not k.endswith("layernorm")},
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


class Gemma2(GGUFArch):
    name = "gemma2"
    layer_map = {k: v for k, v in GEMMA_LAYER_MAP.items() if k not in ("self_attn.q_norm", "self_attn.k_norm")}
    norm_offset = 1.0
    separate_output = False
    activations = ("gelu_pytorch_tanh", "gelu_new")  # tanh-approximated GELU, as ggml's
    default_swa_period = 2  # llama.cpp: layer i slides when i % period < period - 1
    large_shape_layers = 46  # the 27B shape, whose queries llama.cpp scales by 1/sqrt(hidden / heads)
    attn_softcap = True
    always_swa = True

    def check(self, config: Any) -> None:
        super().check(config)
        a = self.name
        if getattr(config, "attention_bias", False):
            raise ValueError(f"llama.cpp's {a} has no attention biases; this config sets attention_bias")
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError(f"llama.cpp's {a} attention is causal; this config sets use_bidirectional_attention")
        expected = self.query_scalar(config)
        scalar = getattr(config, "query_pre_attn_scalar", None)
        if scalar is None or float(scalar) != float(expected):
            raise ValueError(
                f"llama.cpp's {a} scales queries by 1/sqrt({expected}) for this shape; this config has "
                f"query_pre_attn_scalar={scalar}"
            )
        if self.attn_softcap and not getattr(config, "attn_logit_softcapping", None):
            raise ValueError(f"llama.cpp's {a} always caps attention scores; this config has no attn_logit_softcapping")
        if self.attn_softcap and not getattr(config, "final_logit_softcapping", None):
            raise ValueError(f"llama.cpp's {a} always caps the logits; this config has no final_logit_softcapping")

    def query_scalar(self, config: Any) -> int:
        if config.num_hidden_layers == self.large_shape_layers:
            return config.hidden_size // config.num_attention_heads
        return head_dim(config)

    def sliding(self, config: Any) -> list[bool]:
        return [t == "sliding_attention" for t in layer_types(config)]

    def swa_keys(self, config: Any) -> list:
        """sliding_window, and the per-layer pattern where it is not llama.cpp's default one."""
        window = getattr(config, "sliding_window", None)
        sliding = [bool(window) and s for s in self.sliding(config)]
        p = self.default_swa_period
        out = [kv(f"{self.name}.attention.sliding_window", V.UINT32, window)] if any(sliding) else []
        # Gemma-2's llama.cpp graph always has sliding layers (its default pattern); Gemma-3's only with a window
        if sliding != [i % p < p - 1 for i in range(len(sliding))] and (any(sliding) or self.always_swa):
            out.append(kv(f"{self.name}.attention.sliding_window_pattern", V.ARRAY, sliding, V.BOOL))
        return out

    def hparams(self, config: Any) -> list:
        a = self.name
        return (
            common_hparams(a, config, rope_parameters(config))
            + self.swa_keys(config)
            + [
                kv(f"{a}.attn_logit_softcapping", V.FLOAT32, float(config.attn_logit_softcapping)),
                kv(f"{a}.final_logit_softcapping", V.FLOAT32, float(config.final_logit_softcapping)),
            ]
        )


class Gemma3(Gemma2):
    name = "gemma3"
    layer_map = GEMMA_LAYER_MAP
    separate_output = True
    default_swa_period = 6
    large_shape_layers = 62
    always_swa = False
    attn_softcap = False  # the config may carry attn_logit_softcapping; HF's Gemma-3 attention ignores it

    def check(self, config: Any) -> None:
        super().check(config)  # the RoPE of the full-attention layers among it
        local = rope_parameters(config, "sliding_attention")
        if local["rope_type"] != "default":
            raise ValueError(
                f"llama.cpp's {self.name} runs the sliding layers' RoPE unscaled; this config scales "
                f"it ({local['rope_type']!r})"
            )

    def hparams(self, config: Any) -> list:
        a = self.name
        out = common_hparams(a, config, rope_parameters(config, "full_attention")) + self.swa_keys(config)
        if any(self.sliding(config)):
            local = float(rope_parameters(config, "sliding_attention")["rope_theta"])
            out.append(kv(f"{a}.rope.freq_base_swa", V.FLOAT32, local))
        if getattr(config, "final_logit_softcapping", None):
            out.append(kv(f"{a}.final_logit_softcapping", V.FLOAT32, float(config.final_logit_softcapping)))
        return out
