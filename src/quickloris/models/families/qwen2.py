"""Qwen2 and Qwen2.5 (same architecture): Llama's layout with q/k/v biases; with ``use_sliding_window`` the layers
from ``max_window_layers`` on use a sliding window (``config.layer_types``)."""

from quickloris.models.families._spec import Attention, FamilySpec

SPEC = FamilySpec(
    name="qwen2",
    causal_lm="Qwen2ForCausalLM",
    sequence_classification="Qwen2ForSequenceClassification",
    model_types=("qwen2",),
    decoder_layer="Qwen2DecoderLayer",
    attention=Attention(sliding_window="per_layer"),
    gguf_arch="qwen2",
)
