"""The mmproj of Llava 1.5 and Llava-NeXT (``model_type`` llava / llava_next): a CLIP ViT and a two-layer GELU MLP.

Written as llama.cpp's Llava route writes Hugging Face Llava checkpoints (llava_surgery_v2.py, then
convert_image_encoder_to_gguf.py with the vision config; docs/multimodal/llava.md), read by libmtmd's ``mlp``
projector:

* HF Llava feeds the projector ``hidden_states[vision_feature_layer]`` of the CLIP tower (default -2: the output of
  all but the last block), without its CLS token (strategy ``default``) and without ``post_layernorm``. The file
  holds the blocks up to that layer (``block_count``), lists the layer as ``clip.vision.feature_layer`` (made
  non-negative: n_layers + 1 + layer) and leaves ``post_layernorm`` and the later blocks out. (Without
  ``feature_layer`` llama.cpp would run one block fewer than ``block_count``.)
* CLIP's MLP ``fc1`` (embedding -> intermediate) is stored as ``ffn_down`` and ``fc2`` as ``ffn_up``: the names the
  converter has always written, which llama.cpp's loader recognises by shape and swaps back (a file with the names
  the other way round would be swapped wrongly when intermediate == embedding size).
* Projector ``linear_1`` / ``linear_2`` -> ``mm.0`` / ``mm.2``; Llava-NeXT's ``image_newline`` ->
  ``model.image_newline``, its ``image_grid_pinpoints`` flattened as written in config.json, with
  ``mm_patch_merge_type`` ``spatial_unpad``.
* Types: an f16 file has every matrix and the patch convolution in F16 and vectors in F32, as the converter writes
  it; f32 is F32 throughout (the converter keeps the projector and the patch convolution in F16 even then; llama.cpp
  reads F32 for both). bf16 / q8_0 (which that converter does not write) follow convert_hf_to_gguf.py's mmproj rule.

What llama.cpp computes differently from transformers: its GELU / quick-GELU go through a table of fp16 values; for
Llava-NeXT it arranges the image's tiles its own way (the overview image resized to one tile, placed after the
tiles, no unpadding, no ``image_newline`` rows), so the language model sees other image tokens than in transformers
(a note says so).
"""

from __future__ import annotations

import re
from typing import Any

from quickloris.export.quants import GGMLType
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

_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out",
    "layer_norm1": "ln1",
    "layer_norm2": "ln2",
    "mlp.fc1": "ffn_down",  # llama.cpp's legacy names (see the module docstring)
    "mlp.fc2": "ffn_up",
}
_GLOBAL = {
    "vision_tower.embeddings.class_embedding": "v.class_embd",
    "vision_tower.embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "vision_tower.embeddings.position_embedding.weight": "v.position_embd.weight",
    "vision_tower.pre_layrnorm.weight": "v.pre_ln.weight",
    "vision_tower.pre_layrnorm.bias": "v.pre_ln.bias",
    "multi_modal_projector.linear_1.weight": "mm.0.weight",
    "multi_modal_projector.linear_1.bias": "mm.0.bias",
    "multi_modal_projector.linear_2.weight": "mm.2.weight",
    "multi_modal_projector.linear_2.bias": "mm.2.bias",
    "image_newline": "model.image_newline",
}
_LAYER_RE = re.compile(r"^vision_tower\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def feature_layers(config: Any) -> list[int]:
    """``vision_feature_layer`` (an int or a list) as llama.cpp's non-negative indices into the hidden states."""
    layers = cfg_get(config, "vision_feature_layer", -2)
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    n = config.vision_config.num_hidden_layers
    return [int(x) if x >= 0 else n + 1 + int(x) for x in layers]


class Llava(VisionArch):
    name = "llava"
    model_types = ("llava", "llava_next")
    prefixes = ("vision_tower.", "multi_modal_projector.", "image_newline")

    def canonical(self, hf_name: str) -> str:
        # transformers < 5 kept CLIPVisionModel's `vision_model` level in the names
        return super().canonical(hf_name).replace("vision_tower.vision_model.", "vision_tower.")

    def check(self, config: Any) -> None:
        vc = config.vision_config
        if vc.model_type != "clip_vision_model":
            raise ValueError(
                f"GGUF vision export of {config.model_type} supports a CLIP vision tower (Llava 1.5 / NeXT); this "
                f"model's is {vc.model_type!r} (Pixtral, SigLIP and others: not supported)"
            )
        strategy = cfg_get(config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy {strategy!r}: llama.cpp's Llava drops the CLS token ('default')"
            )
        act = cfg_get(config, "projector_hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"projector_hidden_act {act!r}: llama.cpp's Llava projector computes GELU")
        if not cfg_get(config, "multimodal_projector_bias", True):
            raise ValueError("multimodal_projector_bias False: llama.cpp's Llava projector needs its biases")
        if vc.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"vision_config.hidden_act {vc.hidden_act!r}: llama.cpp's CLIP has quick_gelu or gelu")
        layers = feature_layers(config)
        if any(not 0 < x <= vc.num_hidden_layers for x in layers):
            raise ValueError(
                f"vision_feature_layer {cfg_get(config, 'vision_feature_layer')!r} is outside the vision tower's "
                f"{vc.num_hidden_layers} layers"
            )
        if layers != sorted(set(layers)):  # llama.cpp stacks several feature layers from the lowest up
            raise ValueError(
                f"vision_feature_layer {cfg_get(config, 'vision_feature_layer')!r}: llama.cpp concatenates the "
                "layers' hidden states in ascending order, HF in the listed one"
            )

    def check_processor(self, config: Any, processor: ProcessorConfig) -> None:
        mean_std(processor)
        size = config.vision_config.image_size
        crop = processor.get("crop_size")
        if isinstance(crop, dict):
            check_equal(
                processor,
                "crop_size",
                (crop.get("height"), crop.get("width")),
                "vision_config.image_size",
                (size, size),
            )
        elif crop is not None:
            check_equal(processor, "crop_size", crop, "vision_config.image_size", size)
        shortest = (
            (processor.get("size") or {}).get("shortest_edge") if isinstance(processor.get("size"), dict) else None
        )
        check_equal(processor, "size.shortest_edge", shortest, "vision_config.image_size", size)
        pinpoints = processor.get("image_grid_pinpoints")
        if pinpoints is not None and cfg_get(config, "image_grid_pinpoints") is not None:
            check_equal(
                processor,
                "image_grid_pinpoints",
                [list(p) for p in pinpoints],
                "image_grid_pinpoints",
                [list(p) for p in config.image_grid_pinpoints],
            )

    def plan(self, config: Any, shapes: dict[str, tuple[int, ...]], quant: str):
        blocks = max(feature_layers(config))
        out, dropped = [], set()
        for name, shape in shapes.items():
            m = _LAYER_RE.match(name)
            if m and m.group(2) in _LAYER:
                if int(m.group(1)) >= blocks:
                    dropped.add(name)
                    continue
                gguf = f"v.blk.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
            elif name in _GLOBAL:
                gguf = _GLOBAL[name]
            elif name.startswith("vision_tower.post_layernorm."):
                dropped.add(name)  # unused by HF Llava too (it reads the hidden states before it)
                continue
            else:
                raise ValueError(f"vision parameter {name!r} has no tensor in llama.cpp's Llava mmproj")
            out.append(VisionTensor(gguf, name, tuple(shape), qtype=self.tensor_type(gguf, tuple(shape), quant)))
        return out, dropped

    def tensor_type(self, gguf_name: str, shape: tuple[int, ...], quant: str) -> GGMLType:
        if quant == "f32":
            return GGMLType.F32
        if quant == "f16":  # convert_image_encoder_to_gguf.py: matrices and the 4-D convolution in F16
            return (
                GGMLType.F16 if len(shape) == 4 or (len(shape) == 2 and gguf_name.endswith(".weight")) else GGMLType.F32
            )
        return modern_type(gguf_name, shape, quant)

    def hparams(self, config: Any, processor: ProcessorConfig, quant: str, name: str):
        vc = config.vision_config
        mean, std = mean_std(processor)
        out = [
            _kv("clip.has_text_encoder", V.BOOL, False),
            _kv("clip.has_vision_encoder", V.BOOL, True),
            _kv("clip.has_llava_projector", V.BOOL, True),
            _kv("general.file_type", V.UINT32, MMPROJ_TYPES[quant][1]),
            _kv("general.name", V.STRING, name),
            _kv("general.description", V.STRING, "image encoder for LLaVA"),
            _kv("clip.projector_type", V.STRING, "mlp"),
            _kv("clip.vision.image_size", V.UINT32, vc.image_size),
            _kv("clip.vision.patch_size", V.UINT32, vc.patch_size),
            _kv("clip.vision.embedding_length", V.UINT32, vc.hidden_size),
            _kv("clip.vision.feed_forward_length", V.UINT32, vc.intermediate_size),
            _kv("clip.vision.projection_dim", V.UINT32, vc.projection_dim),
            _kv("clip.vision.attention.head_count", V.UINT32, vc.num_attention_heads),
            _kv("clip.vision.attention.layer_norm_epsilon", V.FLOAT32, vc.layer_norm_eps),
            _kv("clip.vision.block_count", V.UINT32, max(feature_layers(config))),
        ]
        pinpoints = cfg_get(config, "image_grid_pinpoints")
        if config.model_type == "llava_next" and pinpoints:
            out.append(
                _kv("clip.vision.image_grid_pinpoints", V.ARRAY, [int(v) for p in pinpoints for v in p], V.INT32)
            )
            out.append(_kv("clip.vision.mm_patch_merge_type", V.STRING, "spatial_unpad"))
        out += [
            _kv("clip.vision.feature_layer", V.ARRAY, feature_layers(config), V.INT32),
            _kv("clip.vision.image_mean", V.ARRAY, mean, V.FLOAT32),
            _kv("clip.vision.image_std", V.ARRAY, std, V.FLOAT32),
            _kv("clip.use_gelu", V.BOOL, vc.hidden_act == "gelu"),
        ]
        if quant in ("bf16", "q8_0"):
            out.append(_kv("general.quantization_version", V.UINT32, 2))
        return out

    def notes(self, config: Any, processor: ProcessorConfig) -> list[str]:
        if config.model_type != "llava_next":
            return []
        return [
            "llama.cpp arranges Llava-NeXT's image tiles its own way (overview resized to one tile and placed after "
            "the tiles, no unpadding, no image_newline rows): its image tokens differ from transformers' for the "
            "same image, each tile's embedding is the same"
        ]
