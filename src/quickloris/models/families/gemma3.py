"""Gemma-3 text (``Gemma3ForCausalLM``, ``model_type`` ``gemma3_text``: the 1B model, or the text tower of the
larger ones): Gemma-2's layout with q/k norms instead of attention softcapping (the config carries
``attn_logit_softcapping`` but the attention ignores it; ``final_logit_softcapping`` is None on released
checkpoints, honoured if set), five sliding layers per global one, and another RoPE base for each layer type.
The multimodal ``Gemma3ForConditionalGeneration`` is not this family."""

from quickloris.models.families._spec import Attention, FamilySpec

SPEC = FamilySpec(
    name="gemma3",
    causal_lm="Gemma3ForCausalLM",
    sequence_classification="Gemma3TextForSequenceClassification",
    model_types=("gemma3_text",),
    decoder_layer="Gemma3DecoderLayer",
    attention=Attention(sliding_window="per_layer", qk_norm=True, rope="rotate_half_per_layer_type"),
    norm="rms_one_plus_fp32",
    tied_embeddings=True,
    embedding_scale="sqrt_hidden",
    final_logit_softcap="final_logit_softcapping",
    gguf_arch="gemma3",
)
