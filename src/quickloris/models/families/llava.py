"""Llava (1.5: a CLIP ViT, a 2-layer MLP projector, a Llama / Vicuna decoder) and Pixtral (the same
``LlavaForConditionalGeneration`` with the Pixtral vision encoder, which takes images at their own size, and a
Mistral decoder). The decoder is any registered text family (``text_family="auto"``: its spec, from the text config,
says what windows it has)."""

from quickloris.models.families._vision import VisionFamilySpec

SPEC = VisionFamilySpec(
    name="llava",
    causal_lm="LlavaForConditionalGeneration",
    sequence_classification="",
    model_types=("llava",),
    decoder_layer="LlamaDecoderLayer / MistralDecoderLayer (the text family's)",
    vision_modules=("vision_tower", "multi_modal_projector"),
    text_family="auto",
)
