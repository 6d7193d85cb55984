"""Qwen2.5-VL: Qwen2-VL's layout (multimodal RoPE, 2 x 2 patch merger inside ``visual``) with a windowed-attention
vision tower (RMSNorm, SwiGLU); the decoder is the same Qwen2 decoder."""

from quickloris.models.families._spec import Attention
from quickloris.models.families._vision import VisionFamilySpec

SPEC = VisionFamilySpec(
    name="qwen2_5_vl",
    causal_lm="Qwen2_5_VLForConditionalGeneration",
    sequence_classification="",
    model_types=("qwen2_5_vl",),
    decoder_layer="Qwen2_5_VLDecoderLayer",
    attention=Attention(sliding_window="per_layer"),
    vision_modules=("visual",),
    mrope=True,
)
