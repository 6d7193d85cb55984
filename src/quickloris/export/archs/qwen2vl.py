"""GGUF ``qwen2vl``: the language model of Qwen2-VL and Qwen2.5-VL (``text_config`` model_type ``qwen2_vl_text`` /
``qwen2_5_vl_text``).

The layers are Qwen2's (q/k/v biases, NeoX RoPE, HF's rotate-half layout kept as stored); what differs is multimodal
RoPE (M-RoPE): every position is a triple (t, h, w) - equal for text tokens, the image grid's row and column for
image tokens - and the rotary frequencies of a head are split in sections, section s rotating with coordinate s.
``rope_parameters["mrope_section"]`` (e.g. [16, 24, 24] of head_dim / 2 = 64 frequencies) is written as
``rope.dimension_sections``, padded to four with zeros as llama.cpp reads it. For text alone the three coordinates
are equal and M-RoPE is ordinary RoPE.
"""

from __future__ import annotations

import re
from typing import Any

from quickloris.export.archs.base import GGUFArch, common_hparams, head_dim, kv, rope_parameters
from quickloris.export.archs.qwen import Qwen2
from quickloris.export.vision import (
    MMPROJ_TYPES,
    ProcessorConfig,
    VisionArch,
    VisionTensor,
    _kv,
    cfg_get,
    check_equal,
    mean_std,
    modern_type,
)
from quickloris.export.writer import GGUFValueType as V


def mrope_section(config: Any) -> list[int]:
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    return list(rope.get("mrope_section") or [])


class Qwen2VL(Qwen2):
    name = "qwen2vl"
    rope_types = ("default", "mrope")

    def check(self, config: Any) -> None:
        GGUFArch.check(self, config)
        sections = mrope_section(config)
        half = head_dim(config) // 2
        if not sections or len(sections) > 4 or sum(sections) != half:
            raise ValueError(
                f"{self.name}: rope_parameters.mrope_section {sections} must split the head's {half} rotary "
                "frequencies into at most 4 sections"
            )
        if rope_parameters(config).get("mrope_interleaved"):
            raise ValueError(f"{self.name}: interleaved M-RoPE (Qwen3-VL's) is not Qwen2-VL's layout")

    def hparams(self, config: Any) -> list:
        out = common_hparams(self.name, config, {**rope_parameters(config), "rope_type": "default"})
        sections = mrope_section(config)
        out.append(kv(f"{self.name}.rope.dimension_sections", V.ARRAY, sections + [0] * (4 - len(sections)), V.INT32))
        return out

    def more_bits_for_attn_v(self, config: Any) -> bool:
        return False


# ---- the vision tower (mmproj) ----------------------------------------------------------------------------------

_VISION_LAYER = {
    "norm1": "ln1",
    "norm2": "ln2",
    "attn.proj": "attn_out",
    "mlp.fc1": "ffn_up",  # Qwen2-VL: quick-GELU MLP
    "mlp.fc2": "ffn_down",
    "mlp.gate_proj": "ffn_gate",  # Qwen2.5-VL: SiLU-gated MLP
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_VISION_GLOBAL = {
    "visual.merger.ln_q.weight": "v.post_ln.weight",
    "visual.merger.ln_q.bias": "v.post_ln.bias",
    "visual.merger.mlp.0.weight": "mm.0.weight",
    "visual.merger.mlp.0.bias": "mm.0.bias",
    "visual.merger.mlp.2.weight": "mm.2.weight",
    "visual.merger.mlp.2.bias": "mm.2.bias",
}
_VISION_LAYER_RE = re.compile(r"^visual\.blocks\.(\d+)\.(.+)\.(weight|bias)$")
# llama.cpp's Qwen2.5-VL: windows of 112 pixels, RoPE base 10000 and merges of 2 x 2 patches, fixed in its code
_WINDOW_PIXELS, _VISION_ROPE_THETA, _MERGE = 112, 10000.0, 2


class Qwen2VLVision(VisionArch):
    """Qwen2-VL / Qwen2.5-VL vision tower and patch merger, as convert_hf_to_gguf.py writes them (projector types
    ``qwen2vl_merger`` / ``qwen2.5vl_merger``):

    * the patch embedding, a Conv3d over 2 frames x P x P pixels, becomes two Conv2d kernels (``v.patch_embd.weight``
      and ``.weight.1``, frame 0 and 1; llama.cpp adds both convolutions of a still image, which is HF's Conv3d of
      the image repeated over the two frames);
    * each block's fused ``attn.qkv`` is split in its q, k and v thirds (no reordering: the ViT's 2-D RoPE is in
      NeoX layout in both);
    * the merger's ``ln_q`` -> ``v.post_ln``, its MLP ``mlp.0`` / ``mlp.2`` -> ``mm.0`` / ``mm.2``;
    * Qwen2.5-VL: SiLU MLPs (``clip.use_silu``), RMSNorms, full attention every ``n_wa_pattern``-th block and
      windowed attention elsewhere (``fullatt_block_indexes`` must be such a pattern).

    llama.cpp fixes the ViT's RoPE base (10000), the merge size (2), the temporal patch (2) and Qwen2.5-VL's window
    (112 pixels); a config with others is refused. The norm epsilon is the HF ViT's fixed 1e-6. As the converter,
    the file says ``feed_forward_length`` = vision_config.hidden_size for Qwen2-VL (unused by llama.cpp) and
    ``image_size`` 560 (llama.cpp resizes by pixel count instead: see `notes`).
    """

    name = "qwen2vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    prefixes = ("visual.",)

    def _is25(self, config: Any) -> bool:
        return config.model_type == "qwen2_5_vl"

    def check(self, config: Any) -> None:
        vc = config.vision_config
        rope = dict(cfg_get(vc, "rope_parameters", None) or {})
        for key, value, fixed in (
            ("temporal_patch_size", vc.temporal_patch_size, 2),
            ("spatial_merge_size", vc.spatial_merge_size, _MERGE),
            ("rope_parameters.rope_theta", float(rope.get("rope_theta", _VISION_ROPE_THETA)), _VISION_ROPE_THETA),
        ):
            if value != fixed:
                raise ValueError(f"vision_config.{key} {value}: llama.cpp's {config.model_type} ViT has {fixed}")
        if self._is25(config):
            self.window_pattern(config)
            if vc.window_size != _WINDOW_PIXELS:
                raise ValueError(
                    f"vision_config.window_size {vc.window_size}: llama.cpp's Qwen2.5-VL attends in windows of "
                    f"{_WINDOW_PIXELS} pixels"
                )
            if vc.hidden_act != "silu":
                raise ValueError(f"vision_config.hidden_act {vc.hidden_act!r}: llama.cpp's Qwen2.5-VL ViT uses silu")
        elif vc.hidden_act != "quick_gelu":
            raise ValueError(f"vision_config.hidden_act {vc.hidden_act!r}: llama.cpp's Qwen2-VL ViT uses quick_gelu")

    def window_pattern(self, config: Any) -> int:
        full = list(config.vision_config.fullatt_block_indexes or [])
        n = full[0] + 1 if full else 0
        if not full or any(b != (i + 1) * n - 1 for i, b in enumerate(full)):
            raise ValueError(
                f"vision_config.fullatt_block_indexes {full}: llama.cpp's Qwen2.5-VL attends fully in every n-th "
                "block (n - 1, 2n - 1, ...) and in windows elsewhere"
            )
        return n

    def check_processor(self, config: Any, processor: ProcessorConfig) -> None:
        mean_std(processor)
        vc = config.vision_config
        for key, model_key in (
            ("patch_size", "patch_size"),
            ("merge_size", "spatial_merge_size"),
            ("temporal_patch_size", "temporal_patch_size"),
        ):
            check_equal(processor, key, processor.get(key), f"vision_config.{model_key}", getattr(vc, model_key))

    def plan(self, config: Any, shapes: dict[str, tuple[int, ...]], quant: str):
        out = []

        def add(gguf: str, source: str, shape: tuple[int, ...], make=lambda w: w) -> None:
            out.append(VisionTensor(gguf, source, shape, make, modern_type(gguf, shape, quant)))

        for name, shape in shapes.items():
            m = _VISION_LAYER_RE.match(name)
            if name == "visual.patch_embed.proj.weight":
                e, c, t, p, q = shape
                add("v.patch_embd.weight", name, (e, c, p, q), lambda w: w[:, :, 0])
                add("v.patch_embd.weight.1", name, (e, c, p, q), lambda w: w[:, :, 1])
            elif m and m.group(2) == "attn.qkv":
                third = shape[0] // 3
                for i, part in enumerate("qkv"):
                    sub = (third, *shape[1:])
                    add(
                        f"v.blk.{m.group(1)}.attn_{part}.{m.group(3)}",
                        name,
                        sub,
                        lambda w, i=i, n=third: w[i * n : (i + 1) * n],
                    )
            elif m and m.group(2) in _VISION_LAYER:
                add(f"v.blk.{m.group(1)}.{_VISION_LAYER[m.group(2)]}.{m.group(3)}", name, tuple(shape))
            elif name in _VISION_GLOBAL:
                add(_VISION_GLOBAL[name], name, tuple(shape))
            else:
                raise ValueError(f"vision parameter {name!r} has no tensor in llama.cpp's {config.model_type} mmproj")
        return out, set()

    def hparams(self, config: Any, processor: ProcessorConfig, quant: str, name: str):
        vc = config.vision_config
        mean, std = mean_std(processor)
        is25 = self._is25(config)
        width = vc.hidden_size if is25 else vc.embed_dim
        ff = vc.intermediate_size if is25 else vc.hidden_size  # the converter's Qwen2-VL value (see the docstring)
        out = [
            _kv("general.type", V.STRING, "mmproj"),
            _kv("general.name", V.STRING, name),
            _kv("general.file_type", V.UINT32, MMPROJ_TYPES[quant][1]),
            _kv("clip.has_vision_encoder", V.BOOL, True),
            _kv("clip.vision.projection_dim", V.UINT32, config.text_config.hidden_size),
            _kv("clip.vision.image_size", V.UINT32, cfg_get(vc, "image_size", 560) or 560),
            _kv("clip.vision.patch_size", V.UINT32, vc.patch_size),
            _kv("clip.vision.embedding_length", V.UINT32, width),
            _kv("clip.vision.feed_forward_length", V.UINT32, ff),
            _kv("clip.vision.block_count", V.UINT32, vc.depth),
            _kv("clip.vision.attention.head_count", V.UINT32, vc.num_heads),
            _kv("clip.vision.image_mean", V.ARRAY, mean, V.FLOAT32),
            _kv("clip.vision.image_std", V.ARRAY, std, V.FLOAT32),
            _kv("clip.projector_type", V.STRING, "qwen2.5vl_merger" if is25 else "qwen2vl_merger"),
        ]
        if is25:
            out.append(_kv("clip.use_silu", V.BOOL, True))
            out.append(_kv("clip.vision.n_wa_pattern", V.UINT32, self.window_pattern(config)))
        out.append(_kv("clip.vision.attention.layer_norm_epsilon", V.FLOAT32, 1e-6))
        out.append(_kv("general.quantization_version", V.UINT32, 2))
        return out

    def notes(self, config: Any, processor: ProcessorConfig) -> list[str]:
        factor = config.vision_config.patch_size * config.vision_config.spatial_merge_size
        lo, hi = processor.get("min_pixels"), processor.get("max_pixels")
        size = processor.get("size")
        if isinstance(size, dict):
            lo, hi = size.get("shortest_edge", lo), size.get("longest_edge", hi)
        if lo is None or hi is None:
            return []
        lo_t, hi_t = max(1, int(lo) // factor**2), int(hi) // factor**2
        if (lo_t, hi_t) == (8, 4096):
            return []
        return [
            f"llama.cpp resizes images to 8-4096 image tokens, this processor to {lo_t}-{hi_t}: run llama.cpp with "
            f"--image-min-tokens {lo_t} --image-max-tokens {hi_t} to see images at the sizes the model was tuned on"
        ]
