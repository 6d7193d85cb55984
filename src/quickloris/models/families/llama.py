"""Llama (1-3.x, and every Llama-architecture checkpoint: SmolLM2, TinyLlama, ...): the reference layout."""

from quickloris.models.families._spec import FamilySpec

SPEC = FamilySpec(
    name="llama",
    causal_lm="LlamaForCausalLM",
    sequence_classification="LlamaForSequenceClassification",
    model_types=("llama",),
    decoder_layer="LlamaDecoderLayer",
    gguf_arch="llama",
)
