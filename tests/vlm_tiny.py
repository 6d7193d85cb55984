"""Tiny random-init vision-language models of each VLM family, their tokenizer, image processor and chat template.

`VLM_ROWS`: qwen2_vl, qwen2_5_vl, llava (1.5: CLIP + Llama), llava_next (CLIP any-resolution + Mistral), pixtral
(Llava + the Pixtral encoder + Mistral), mllama (cross-attention). `vlm_model(row)` builds the
``*ForConditionalGeneration`` from its config (eager attention, weights drawn by `tests.tiny.randomize`), in eval
mode; `vlm_processing(row)` the `quickloris.models.vision_processing.VisionProcessing` over a ChatML byte-level BPE
with the family's image tokens and the family's (PIL) image processor at tiny sizes; `draw(seed)` a PIL image of
random shapes; `hf_inputs` a generation prompt's inputs built by transformers alone (the reference for quickloris'
own). Everything builds in well under a second.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from tests.tiny import randomize

IMAGE_TOKENS = [
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<image>",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
    "<|image|>",
]
PLACEHOLDERS = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "llava": "<image>",
    "llava_next": "<image>",
    "pixtral": "[IMG]",
    "mllama": "<|image|>",
}
VLM_ROWS = list(PLACEHOLDERS)
TEXT = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def chat_template(row: str) -> str:
    """ChatML whose contents may be lists of parts; an image part renders as the family's placeholder."""
    image = PLACEHOLDERS[row]
    return (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
        "{% if p['type'] == 'image' %}{{ '" + image + "' }}{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
        "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


def vlm_tokenizer(row: str = "qwen2_vl"):
    from tests.tiny import chat_tokenizer

    tok = chat_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    tok.chat_template = chat_template(row)
    assert len(tok) <= TEXT["vocab_size"]
    return tok


def _ids(tok) -> dict[str, int]:
    return {t: tok.convert_tokens_to_ids(t) for t in IMAGE_TOKENS}


def vlm_config(row: str, tok=None):
    import transformers

    ids = _ids(tok or vlm_tokenizer(row))
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if row in ("qwen2_vl", "qwen2_5_vl"):
        text = dict(TEXT, rope_parameters={**rope, "mrope_section": [2, 3, 3]})
        vision = dict(depth=2, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        if row == "qwen2_vl":
            vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
            cls = transformers.Qwen2VLConfig
        else:
            vision.update(
                hidden_size=32, out_hidden_size=64, intermediate_size=48, window_size=56, fullatt_block_indexes=[1]
            )
            cls = transformers.Qwen2_5_VLConfig
        return cls(
            text_config=text,
            vision_config=vision,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
    clip = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        projection_dim=32,
    )
    if row == "llava":
        return transformers.LlavaConfig(
            text_config=transformers.LlamaConfig(**TEXT),
            vision_config=transformers.CLIPVisionConfig(**clip),
            image_token_id=ids["<image>"],
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    if row == "llava_next":
        return transformers.LlavaNextConfig(
            text_config=transformers.MistralConfig(**TEXT, sliding_window=None),
            vision_config=transformers.CLIPVisionConfig(**clip),
            image_token_id=ids["<image>"],
            image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    if row == "pixtral":
        return transformers.LlavaConfig(
            text_config=transformers.MistralConfig(**TEXT, sliding_window=None),
            vision_config=transformers.PixtralVisionConfig(
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=64,
                patch_size=8,
                head_dim=8,
            ),
            image_token_id=ids["[IMG]"],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            multimodal_projector_bias=True,
        )
    if row == "mllama":
        return transformers.MllamaConfig(
            text_config=dict(TEXT, num_hidden_layers=3, cross_attention_layers=[1], rope_parameters=rope),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_global_layers=1,
                attention_heads=4,
                image_size=28,
                patch_size=14,
                max_num_tiles=2,
                supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
                intermediate_layers_indices=[0],
                vision_output_dim=64,
            ),
            image_token_index=ids["<|image|>"],
        )
    raise ValueError(row)


CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "pixtral": "LlavaForConditionalGeneration",
    "mllama": "MllamaForConditionalGeneration",
}


def vlm_model(row: str, tok=None, dtype=torch.float32, std: float = 0.08):
    """A random-init tiny VLM of `row` (eager attention everywhere: the reference), in eval mode."""
    import transformers

    cfg = vlm_config(row, tok)
    cfg._attn_implementation = "eager"
    for sub in ("text_config", "vision_config"):
        getattr(cfg, sub)._attn_implementation = "eager"
    model = getattr(transformers, CLASSES[row])(cfg)
    return randomize(model, std).to(dtype).eval()


def image_processor(row: str):
    if row in ("qwen2_vl", "qwen2_5_vl"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=28 * 28 * 12)
    if row == "llava":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    if row == "llava_next":
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        return LlavaNextImageProcessorPil(
            size={"shortest_edge": 28},
            crop_size={"height": 28, "width": 28},
            image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
        )
    if row == "pixtral":
        from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

        return PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size=8)
    if row == "mllama":
        from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

        return MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=2)
    raise ValueError(row)


def vlm_processing(row: str, tok=None, config=None) -> Any:
    from quickloris.models.vision_processing import vision_processing

    tok = tok or vlm_tokenizer(row)
    return vision_processing(config or vlm_config(row, tok), tok, image_processor(row))


def draw(seed: int, size: tuple[int, int] | None = None):
    """A PIL image (random size 20-90 px a side unless given) of a background and a few random shapes."""
    from PIL import Image, ImageDraw

    rnd = random.Random(seed)
    w, h = size or (rnd.randint(20, 90), rnd.randint(20, 90))
    img = Image.new("RGB", (w, h), tuple(rnd.randint(0, 255) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(rnd.randint(1, 4)):
        x0, y0 = rnd.randint(0, w - 1), rnd.randint(0, h - 1)
        box = (x0, y0, min(w - 1, x0 + rnd.randint(2, 30)), min(h - 1, y0 + rnd.randint(2, 30)))
        d.ellipse(box, fill=tuple(rnd.randint(0, 255) for _ in range(3)))
    return img


def hf_inputs(row: str, tok, messages: list[dict], images: list) -> dict:
    """transformers' inputs to generate a reply to `messages` (image parts in order: `images`, files or PIL images),
    without quickloris: the chat template's text with the generation prompt, the images through the family's image
    processor. Qwen: each ``<|image_pad|>`` repeated grid / merge² times and ``mm_token_type_ids`` (1 on image
    tokens), as Qwen2VLProcessor makes them (its video processor needs torchvision, so it is not built here); Llava:
    LlavaProcessor itself."""
    import transformers
    from PIL import Image

    pictures = [Image.open(p).convert("RGB") if not isinstance(p, Image.Image) else p.convert("RGB") for p in images]
    plain = [  # image parts without their file names: the template renders the placeholder
        {**m, "content": [{k: v for k, v in p.items() if k != "image"} for p in m["content"]]}
        if isinstance(m["content"], list)
        else m
        for m in messages
    ]
    text = tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    if row == "llava":
        proc = transformers.LlavaProcessor(
            image_processor=image_processor(row),
            tokenizer=tok,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
        )
        return dict(proc(text=[text], images=pictures or None, return_tensors="pt"))
    if row not in ("qwen2_vl", "qwen2_5_vl"):
        raise ValueError(row)
    pixels = dict(image_processor(row)(images=pictures, return_tensors="pt")) if pictures else {}
    for grid in pixels.get("image_grid_thw", []):
        text = text.replace("<|image_pad|>", "\0" * (int(grid.prod()) // 4), 1)
    ids = tok(text.replace("\0", "<|image_pad|>"), return_tensors="pt", add_special_tokens=False)["input_ids"]
    image = ids == tok.convert_tokens_to_ids("<|image_pad|>")
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": image.long(), **pixels}
