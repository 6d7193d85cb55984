"""Qwen3 (dense): Qwen2's layout without q/k/v biases, with an RMSNorm over each query / key head, an explicit
``head_dim``, and per-layer sliding windows as Qwen2 (``config.layer_types``)."""

from quickloris.models.families._spec import Attention, FamilySpec

SPEC = FamilySpec(
    name="qwen3",
    causal_lm="Qwen3ForCausalLM",
    sequence_classification="Qwen3ForSequenceClassification",
    model_types=("qwen3",),
    decoder_layer="Qwen3DecoderLayer",
    attention=Attention(sliding_window="per_layer", qk_norm=True),
    gguf_arch="qwen3",
)
