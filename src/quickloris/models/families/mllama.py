"""Llama-3.2-Vision (Mllama): a tiled ViT whose projected states enter the decoder through gated cross-attention
layers (``config.text_config.cross_attention_layers``) placed between the self-attention layers; an image is one
``<|image|>`` token of the text. Both kinds of decoder layer are in ``language_model.layers`` (their q/k/v/o and MLP
linears are quantized and adapted alike). No flex attention (the cross-attention layers take a dense image mask
through the same attention function) and no packing (a text token before its row's first image attends uniformly
to all of the row's images)."""

from quickloris.models.families._vision import VisionFamilySpec

SPEC = VisionFamilySpec(
    name="mllama",
    causal_lm="MllamaForConditionalGeneration",
    sequence_classification="",
    model_types=("mllama",),
    decoder_layer="MllamaSelfAttentionDecoderLayer / MllamaCrossAttentionDecoderLayer",
    vision_modules=("vision_model", "multi_modal_projector"),
    flex=False,
    packing=False,
    cross_attention=True,
)
