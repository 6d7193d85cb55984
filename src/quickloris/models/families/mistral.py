"""Mistral and Mistral-Nemo: Llama's layout with a model-wide sliding window (``config.sliding_window``, None on
recent checkpoints) and an explicit ``head_dim`` (Nemo: 128 with hidden 5120 / 32 heads = 160, so q/k/v have
``heads * head_dim`` rows, not ``hidden``). llama.cpp runs Mistral as ``llama``."""

from quickloris.models.families._spec import Attention, FamilySpec

SPEC = FamilySpec(
    name="mistral",
    causal_lm="MistralForCausalLM",
    sequence_classification="MistralForSequenceClassification",
    model_types=("mistral",),
    decoder_layer="MistralDecoderLayer",
    attention=Attention(sliding_window="model"),
    gguf_arch="llama",
)
