"""Phi-3, Phi-3.5 and Phi-4 (``Phi3ForCausalLM``): fused projections - ``qkv_proj`` (q, k, v stacked on the
output rows) and ``gate_up_proj`` (gate, up) - so LoRA adapts the fused weights, under those names (what PEFT
targets for Phi-3); a model-wide sliding window when ``config.sliding_window`` is set (Phi-3-mini: 2047); partial
rotary embeddings (Phi-4-mini: ``partial_rotary_factor``)."""

from quickloris.models.families._spec import Attention, FamilySpec

SPEC = FamilySpec(
    name="phi3",
    causal_lm="Phi3ForCausalLM",
    sequence_classification="Phi3ForSequenceClassification",
    model_types=("phi3",),
    decoder_layer="Phi3DecoderLayer",
    linears=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    fused={"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")},
    attention=Attention(sliding_window="model", rope="rotate_half_partial"),
    gguf_arch="phi3",
)
