"""Gemma-2: sliding-window and global layers alternating (``config.layer_types``), attention scores capped at
``attn_logit_softcapping`` (50), output logits at ``final_logit_softcapping`` (30), RMSNorms computing
``(x / rms(x)) * (1 + w)`` in fp32 (four per layer: before and after attention and MLP), embeddings scaled by
sqrt(hidden_size), tied head, attention scale ``query_pre_attn_scalar ** -0.5``."""

from quickloris.models.families._spec import Attention, FamilySpec

SPEC = FamilySpec(
    name="gemma2",
    causal_lm="Gemma2ForCausalLM",
    sequence_classification="Gemma2ForSequenceClassification",
    model_types=("gemma2",),
    decoder_layer="Gemma2DecoderLayer",
    attention=Attention(sliding_window="per_layer", logit_softcap="attn_logit_softcapping"),
    norm="rms_one_plus_fp32",
    tied_embeddings=True,
    embedding_scale="sqrt_hidden",
    final_logit_softcap="final_logit_softcapping",
    gguf_arch="gemma2",
)
