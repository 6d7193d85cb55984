"""Tiny random-init vision-language models of the families the GGUF vision export writes, their tokenizers,
processors and test images (drawn with PIL), and model folders saved as `save_pretrained` writes them.

Sizes: a vision tower of width 32 (4 heads of 8), 3 layers (Qwen2.5-VL: 4, full attention in layers 1 and 3,
windowed in 0 and 2) and a 2-layer language model of width 64 (4 heads over 2 KV heads). Llava: a CLIP tower with an
MLP of 48 (its up and down matrices differ in shape), 4-pixel patches on 16 x 16 images (16 patches + CLS);
Llava-NeXT: tiles of 16 over the grid pinpoints 16x32 / 32x16 / 32x32. Qwen2-VL / 2.5-VL: the patch of 14 pixels,
merges of 2 x 2 and (2.5) windows of 112 pixels that llama.cpp fixes, MLPs of 64 / 48; the tests' images have sides
that are multiples of 28 (nothing is resized), e.g. 168 x 140 -> 12 x 10 patches -> 6 x 5 merged tokens, more than
one 4 x 4 window (partial windows). Weights are drawn larger than HF's init (`tests.tiny.randomize`) so mapping
errors show.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LLAVA_SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>", "<image>")
QWEN_SPECIALS = (
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# CLIP's normalisation (Llava) and Qwen's (the same numbers in their processors)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PINPOINTS = [[16, 32], [32, 16], [32, 32]]


def tokenizer(family: str):
    """A byte-level BPE (GPT-2 pre-tokenizer, 400 tokens) with the family's image specials; Llava's adds a bos."""
    from tests.tiny import bpe_tokenizer

    llava = family.startswith("llava")
    return bpe_tokenizer("gpt-2", 400, specials=LLAVA_SPECIALS if llava else QWEN_SPECIALS, add_bos=llava)


def spm_tokenizer(folder):
    """A SentencePiece BPE as Llava-1.5's (Vicuna's, Llama-2's): <unk> <s> </s>, bos added, HF's added <image> and
    <pad> after the SentencePiece pieces (tests/tiny_spm.py), kept in `folder` (its tokenizer.model is read by the
    export)."""
    from tests.tiny_spm import spm_tokenizer as make

    return make(folder, legacy=False)


def config(family: str, tok, **over):
    """The transformers config of a tiny `family` model (llava, llava_next, qwen2_vl, qwen2_5_vl) for `tok`."""
    import transformers

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        **ids,
    )
    if family in ("llava", "llava_next"):
        vision = transformers.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
            projection_dim=24,
            hidden_act="quick_gelu",
        )
        kw = dict(
            vision_config=vision.to_dict(),
            text_config={"model_type": "llama", **text},
            image_token_index=tok.convert_tokens_to_ids("<image>"),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            image_seq_length=16,
            tie_word_embeddings=False,
        )
        if family == "llava":
            cls = transformers.LlavaConfig
        else:
            cls = transformers.LlavaNextConfig
            kw["image_grid_pinpoints"] = PINPOINTS
        arch = "LlavaForConditionalGeneration" if family == "llava" else "LlavaNextForConditionalGeneration"
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        common_v = dict(depth=3, num_heads=4, in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        if family == "qwen2_vl":
            vision = dict(embed_dim=32, mlp_ratio=2, hidden_size=64, hidden_act="quick_gelu", **common_v)
            cls = transformers.Qwen2VLConfig
            arch = "Qwen2VLForConditionalGeneration"
        else:
            common_v["depth"] = 4
            vision = dict(
                hidden_size=32,
                intermediate_size=48,
                out_hidden_size=64,
                hidden_act="silu",
                window_size=112,
                fullatt_block_indexes=[1, 3],
                tokens_per_second=2,
                **common_v,
            )
            cls = transformers.Qwen2_5_VLConfig
            arch = "Qwen2_5_VLForConditionalGeneration"
        kw = dict(
            vision_config=vision,
            text_config={**text, "rope_parameters": rope, "tie_word_embeddings": False},
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
            tie_word_embeddings=False,
        )
    else:
        raise ValueError(family)
    kw.update(over)
    cfg = cls(**kw)
    cfg.architectures = [arch]
    return cfg


def model(family: str, tok, **over):
    """A random-init tiny `family` model (fp32, eval mode, eager attention) with weights drawn larger than HF's."""
    import transformers

    from tests.tiny import randomize

    cfg = config(family, tok, **over)
    cfg._attn_implementation = "eager"
    for sub in ("text_config", "vision_config"):
        getattr(cfg, sub)._attn_implementation = "eager"
    m = getattr(transformers, cfg.architectures[0])(cfg)
    return randomize(m).eval()


def processor_config(family: str, model_config) -> dict:
    """The preprocessor_config.json of `family` (what the Hub's processors hold), sized for the tiny model."""
    v = model_config.vision_config
    if family in ("llava", "llava_next"):
        out = {
            "image_processor_type": "CLIPImageProcessor" if family == "llava" else "LlavaNextImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": v.image_size},
            "do_center_crop": True,
            "crop_size": {"height": v.image_size, "width": v.image_size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "do_convert_rgb": True,
            "resample": 3,
        }
        if family == "llava_next":
            out.update(image_grid_pinpoints=model_config.image_grid_pinpoints, do_pad=True)
        return out
    factor = v.patch_size * v.spatial_merge_size
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "do_convert_rgb": True,
        "min_pixels": 4 * factor * factor,
        "max_pixels": 4096 * factor * factor,
        "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size,
        "merge_size": v.spatial_merge_size,
        "resample": 3,
    }


def save(folder, family: str, m, tok) -> Path:
    """`m`, `tok` and the family's preprocessor_config.json in `folder` (as a Hub checkpoint is laid out)."""
    folder = Path(folder)
    m.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor_config(family, m.config), indent=2))
    return folder


def image(width: int, height: int, seed: int = 0):
    """A PIL RGB image of shapes and gradients (no two patches alike), drawn from `seed`."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) * 127 / (width + height)])
    arr = (base.transpose(1, 2, 0) + rng.integers(-40, 40, (height, width, 3))).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width - 4)), int(rng.integers(0, height - 4))
        x1, y1 = x0 + int(rng.integers(3, width // 2 + 4)), y0 + int(rng.integers(3, height // 2 + 4))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=color)
    return img
