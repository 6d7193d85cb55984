"""What quickloris knows about a model family: `FamilySpec` (one per ``families/<name>.py``) and `Attention`.

A spec is data: class and module names as strings and the names of the config attributes that switch a feature on,
so reading it imports neither transformers nor torch. The few methods only read a config or walk a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

# The decoder linears of Llama-style families, in PEFT's target names (also quickloris' default --target-modules).
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

SlidingKind = Literal["none", "model", "per_layer"]
NormKind = Literal["rms", "rms_one_plus_fp32"]
RopeKind = Literal["rotate_half", "rotate_half_partial", "rotate_half_per_layer_type", "unknown"]


@dataclasses.dataclass(frozen=True)
class Attention:
    """The attention features of a family.

    * ``sliding_window``: ``none``; ``model`` - ``config.sliding_window`` (when set) limits every layer to
      ``q - k < window``; ``per_layer`` - ``config.layer_types[i]`` is ``full_attention`` or ``sliding_attention``
      and only the latter use the window (Gemma-2/3 alternate them; Qwen2/3 with ``use_sliding_window``). The
      decoder then takes one mask per layer type (a dict keyed by layer type).
    * ``logit_softcap``: the config attribute whose value ``cap`` bounds each attention score ``s`` (already
      scaled) to ``cap * tanh(s / cap)`` before the softmax - as the family's own attention does it (Gemma-2:
      ``attn_logit_softcapping``; Gemma-3's config has the attribute but its attention ignores it: None here).
    * ``sinks``: per-head learned sink logits in the softmax denominator (none of the registered families).
    * ``qk_norm``: an RMSNorm over each query / key head before RoPE (Qwen3, Gemma-3).
    * ``rope``: rotary embedding layout - ``rotate_half`` (HF's NeoX layout: component i pairs with i + d/2),
      ``rotate_half_partial`` (only the first ``partial_rotary_factor`` of each head rotates: Phi-3/4),
      ``rotate_half_per_layer_type`` (another base frequency for sliding and full layers: Gemma-3).
    """

    sliding_window: SlidingKind = "none"
    logit_softcap: str | None = None
    sinks: bool = False
    qk_norm: bool = False
    rope: RopeKind = "rotate_half"


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """One model family (see the package docstring for how specs are found and used).

    Model classes are named, not imported: ``causal_lm`` and ``sequence_classification`` are transformers class
    names (a model is of the family when one of them is in its class's MRO, so FSDP2's renamed ``FSDP<Class>``
    and user subclasses count). ``layers`` is the attribute path of the decoder-layer ``ModuleList`` inside the
    base model (``model.<base_model_prefix>``), whose items are ``decoder_layer`` modules.

    ``linears``: the names of the decoder's linear layers (children of a decoder layer), which are also PEFT's
    LoRA target names. ``fused``: a fused layer's name -> the unfused names it computes in one matmul (Phi-3:
    ``qkv_proj`` holds q, k and v stacked on the output dimension). LoRA on a fused layer adapts the fused weight
    (one A, one B), as PEFT does when it targets ``qkv_proj``.
    """

    name: str
    causal_lm: str
    sequence_classification: str
    model_types: tuple[str, ...]
    decoder_layer: str
    layers: str = "layers"
    linears: tuple[str, ...] = LLAMA_LINEARS
    fused: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    attention: Attention = Attention()
    # rms: w * (x / rms(x)) (Llama; fp32 statistics, cast before the weight); rms_one_plus_fp32:
    # ((x / rms(x)) * (1 + w)) in fp32, then cast (Gemma: the stored w is zero-centred).
    norm: NormKind = "rms"
    tied_embeddings: bool = False  # the family's default; the model's own is config.tie_word_embeddings
    embedding_scale: Literal["none", "sqrt_hidden"] = "none"  # Gemma: embeddings * sqrt(hidden_size)
    final_logit_softcap: str | None = None  # config attribute: logits = cap * tanh(logits / cap) (Gemma-2)
    gguf_arch: str | None = None  # llama.cpp's architecture name for the family (None: not known to llama.cpp)
    fast_path: bool = True  # regional compile, quickloris' flex attention, the compiled loss
    registered: bool = True  # False for the generic path's specs, built from one model

    @property
    def classes(self) -> tuple[str, str]:
        return self.causal_lm, self.sequence_classification

    def default_targets(self) -> tuple[str, ...]:
        """Every decoder linear, by the names this family's modules have (fused ones by their fused name)."""
        return self.linears

    def unfused(self) -> dict[str, str]:
        """unfused name -> the fused layer computing it (``{"q_proj": "qkv_proj", ...}``)."""
        return {part: fused for fused, parts in self.fused.items() for part in parts}

    def decoder(self, model: Any) -> Any:
        """The base model (``model.<base_model_prefix>``): embeddings, decoder layers, final norm."""
        prefix = getattr(model, "base_model_prefix", None)
        base = getattr(model, prefix, None) if isinstance(prefix, str) else None
        if base is None:
            raise TypeError(f"{type(model).__name__} has no base model at model.{prefix}")
        return base

    def layers_path(self, model: Any) -> str:
        """The decoder layers' module path from the root model (``model.layers``)."""
        return f"{model.base_model_prefix}.{self.layers}"

    def layers_of(self, model: Any) -> Any:
        """The decoder-layer ``ModuleList`` of `model` (TypeError if it is missing or empty)."""
        from torch import nn

        try:
            layers = self.decoder(model).get_submodule(self.layers)
        except AttributeError:
            layers = None
        if not isinstance(layers, nn.ModuleList) or not len(layers):
            raise TypeError(f"{type(model).__name__} has no decoder layers at model.{self.layers_path(model)}")
        return layers

    # ---- what a config switches on -----------------------------------------------------------------------

    def windows(self, config: Any) -> dict[str | None, int | None]:
        """The sliding window of each attention mask the decoder takes: ``{layer type: window or None}`` for a
        family with per-layer types (one mask per type present), else ``{None: window or None}`` (one mask)."""
        window = getattr(config, "sliding_window", None)
        window = int(window) if window is not None else None
        kind = self.attention.sliding_window
        if kind == "per_layer":
            types = list(dict.fromkeys(getattr(config, "layer_types", None) or ["full_attention"]))
            unknown = [t for t in types if t not in ("full_attention", "sliding_attention")]
            if unknown:
                raise ValueError(f"{self.causal_lm}: layer types {unknown} are not full_attention / sliding_attention")
            if "sliding_attention" in types and window is None:
                raise ValueError(
                    f"{self.causal_lm}: config.layer_types has sliding_attention layers but "
                    "config.sliding_window is None"
                )
            return {t: (window if t == "sliding_attention" else None) for t in types}
        return {None: window if kind == "model" else None}

    def attention_softcap(self, config: Any) -> float | None:
        """The cap of the attention scores this model applies (None: none)."""
        value = getattr(config, self.attention.logit_softcap, None) if self.attention.logit_softcap else None
        return float(value) if value is not None else None

    def logit_softcap(self, config: Any) -> float | None:
        """The cap of the output logits (None: none)."""
        value = getattr(config, self.final_logit_softcap, None) if self.final_logit_softcap else None
        return float(value) if value is not None else None

    def describe(self) -> str:
        a = self.attention
        feats = [f"sliding window: {a.sliding_window}"] + [
            name
            for name, on in (
                ("attention softcap", a.logit_softcap),
                ("sinks", a.sinks),
                ("q/k norm", a.qk_norm),
                ("fused " + "/".join(self.fused), self.fused),
                ("(1 + w) norm", self.norm == "rms_one_plus_fp32"),
                ("scaled embeddings", self.embedding_scale != "none"),
                ("final softcap", self.final_logit_softcap),
            )
            if on
        ]
        return f"{self.name} ({self.causal_lm}): " + ", ".join(feats)
