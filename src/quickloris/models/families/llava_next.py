"""LLaVA-NeXT (1.6): Llava with "any resolution" images - a base view plus a grid of tiles chosen from
``image_grid_pinpoints`` for the image's aspect, unpadded and closed row by row with a learned newline vector
(``image_newline``, part of the projector side: frozen). The decoder is any registered text family."""

from quickloris.models.families._vision import VisionFamilySpec

SPEC = VisionFamilySpec(
    name="llava_next",
    causal_lm="LlavaNextForConditionalGeneration",
    sequence_classification="",
    model_types=("llava_next",),
    decoder_layer="LlamaDecoderLayer / MistralDecoderLayer (the text family's)",
    vision_modules=("vision_tower", "multi_modal_projector"),
    text_family="auto",
)
