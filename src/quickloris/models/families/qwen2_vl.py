"""Qwen2-VL: a ViT (14-px patches, 2 x 2 patches merged into one token by the projector ``merger``) feeding a Qwen2
decoder with multimodal RoPE (each image token's position is (temporal, row, column); text continues after the
image's largest). The vision tower ``visual`` holds the merger: tower and projector are one module."""

from quickloris.models.families._spec import Attention
from quickloris.models.families._vision import VisionFamilySpec

SPEC = VisionFamilySpec(
    name="qwen2_vl",
    causal_lm="Qwen2VLForConditionalGeneration",
    sequence_classification="",
    model_types=("qwen2_vl",),
    decoder_layer="Qwen2VLDecoderLayer",
    attention=Attention(sliding_window="per_layer"),
    vision_modules=("visual",),
    mrope=True,
)
