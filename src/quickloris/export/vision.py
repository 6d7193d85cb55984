"""The vision half of a vision-language model as llama.cpp's multimodal projector file (``*.mmproj.gguf``).

llama.cpp runs a VLM from two files: the language model (an ordinary GGUF model) and an "mmproj" file of
architecture ``clip`` holding the vision encoder and the projector into the language model's embedding space, read
by its multimodal library (libmtmd). A `VisionArch` (one per family: `archs.llava`, `archs.qwen2vl`) says, as
llama.cpp's own converter writes that family:

* which parameters are the vision tower's and the projector's, and the mmproj tensor(s) each becomes, with the
  layout transform (Qwen's fused qkv split in three, its 3-D patch convolution split in two 2-D ones);
* the ``clip.*`` metadata, from ``config.json`` and the image processor's config (mean / std);
* the ggml type of every tensor for the file's type (f32 / f16 / bf16 / q8_0);
* what llama.cpp cannot compute for a config (refused in one line: `check`) and what it computes differently from
  transformers (a note: `notes`).

`write_mmproj` merges LoRA deltas on vision weights (W + s B A, in float32, before the layout transform), quantizes
in C++ and writes the file atomically through `GGUFWriter`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from quickloris.export.quants import GGMLType
from quickloris.export.writer import GGUFValueType as V
from quickloris.export.writer import GGUFWriter

KV = tuple[str, V, Any, "V | None"]  # (key, value type, value, array element type), as `archs.base.KV`

MMPROJ_TYPES: dict[str, tuple[GGMLType, int]] = {  # --mmproj-quant -> (type of 2-D weights, general.file_type)
    "f32": (GGMLType.F32, 0),
    "f16": (GGMLType.F16, 1),
    "bf16": (GGMLType.BF16, 32),
    "q8_0": (GGMLType.Q8_0, 7),
}


@dataclass
class VisionTensor:
    """One mmproj tensor: made by `make` from the merged float32 weight of HF parameter `source`."""

    gguf_name: str
    source: str
    shape: tuple[int, ...]
    make: Callable[[torch.Tensor], torch.Tensor] = lambda w: w
    qtype: GGMLType = GGMLType.F32


@dataclass
class ProcessorConfig:
    """An image processor's settings (preprocessor_config.json, or processor_config.json's ``image_processor``)."""

    values: dict[str, Any] = field(default_factory=dict)
    where: str = "the image processor config"

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


def read_processor_config(source: Any) -> ProcessorConfig | None:
    """The image processor settings from a folder (preprocessor_config.json, then processor_config.json), an HF
    processor / image processor object, or a dict; None if a folder has neither file."""
    if source is None:
        return None
    if isinstance(source, ProcessorConfig):
        return source
    if isinstance(source, Mapping):
        return ProcessorConfig(dict(source), "the processor config")
    if isinstance(source, (str, os.PathLike)):
        folder = os.fspath(source)
        values: dict[str, Any] = {}
        found = []
        for name in ("preprocessor_config.json", "processor_config.json"):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                try:
                    with open(path, encoding="utf-8") as f:
                        cfg = json.load(f)
                except (OSError, json.JSONDecodeError) as e:
                    raise ValueError(f"{path}: not a readable JSON file ({e})") from None
                if not isinstance(cfg, dict):
                    raise ValueError(f"{path}: expected a JSON object")
                # processor_config.json nests the image processor's settings
                values.update(cfg["image_processor"] if isinstance(cfg.get("image_processor"), dict) else cfg)
                found.append(path)
        return ProcessorConfig(values, " + ".join(found)) if found else None
    image_processor = getattr(source, "image_processor", source)
    if hasattr(image_processor, "to_dict"):
        return ProcessorConfig(image_processor.to_dict(), f"the {type(image_processor).__name__}")
    raise TypeError(f"processor must be a folder, a dict or an HF image processor, got {type(source).__name__}")


def mean_std(processor: ProcessorConfig) -> tuple[list[float], list[float]]:
    out = []
    for key in ("image_mean", "image_std"):
        value = processor.get(key)
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 3
            or not all(isinstance(v, (int, float)) for v in value)
        ):
            raise ValueError(f"{processor.where}: {key} must be 3 numbers (one per RGB channel), got {value!r}")
        if key == "image_std" and any(v <= 0 for v in value):
            raise ValueError(f"{processor.where}: image_std must be positive, got {value!r}")
        out.append([float(v) for v in value])
    return out[0], out[1]


def check_equal(processor: ProcessorConfig, key: str, value: Any, model_key: str, expected: Any) -> None:
    """One line when the processor's `key` (if set) contradicts the model config's `model_key`."""
    if value is not None and value != expected:
        raise ValueError(
            f"{processor.where}: {key} {value!r} does not match config.json {model_key} {expected!r}; "
            "the processor and the model come from different checkpoints"
        )


def cfg_get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


class VisionArch:
    """One family's mmproj layout. Subclasses set `name`, `model_types` and the methods below."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    # prefixes of the vision tower's and the projector's parameter names, as the loaded model names them
    prefixes: tuple[str, ...] = ()

    def canonical(self, hf_name: str) -> str:
        """`hf_name` without the prefixes transformers versions differ in (``model.``)."""
        return re.sub(r"^model\.", "", hf_name)

    def owns(self, hf_name: str) -> bool:
        return self.canonical(hf_name).startswith(self.prefixes)

    def check(self, config: Any) -> None:
        """ValueError (one line) for a config llama.cpp's runtime would compute differently."""

    def check_processor(self, config: Any, processor: ProcessorConfig) -> None:
        mean_std(processor)

    def plan(self, config: Any, shapes: dict[str, tuple[int, ...]], quant: str) -> tuple[list[VisionTensor], set[str]]:
        """The mmproj tensors from the vision parameters (`shapes`: canonical name -> shape), and the canonical
        names deliberately left out (unused by the HF model's image path too, e.g. layers past the feature layer);
        ValueError for a vision parameter with no place."""
        raise NotImplementedError

    def hparams(self, config: Any, processor: ProcessorConfig, quant: str, name: str) -> list[KV]:
        """The mmproj's metadata after ``general.architecture`` (``clip``), in the converter's order; `name` is
        ``general.name``."""
        raise NotImplementedError

    def notes(self, config: Any, processor: ProcessorConfig) -> list[str]:
        """What llama.cpp computes differently from transformers for this config (printed as ``note:`` lines)."""
        return []


def _kv(key: str, vtype: V, value: Any, elem: V | None = None) -> KV:
    return (key, vtype, value, elem)


def modern_type(gguf_name: str, shape: tuple[int, ...], quant: str) -> GGMLType:
    """llama.cpp's convert_hf_to_gguf.py rule for mmproj tensors: vectors (and norms) in F32; the patch embedding
    F16 in an f16 file, else F32; position embeddings F32; other ``*.weight`` matrices in the file's type, F16 where
    a row does not split into Q8_0 blocks of 32."""
    target = MMPROJ_TYPES[quant][0]
    if ".patch_embd.weight" in gguf_name:
        return GGMLType.F16 if quant == "f16" else GGMLType.F32
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return GGMLType.F32
    if ".position_embd." in gguf_name:
        return GGMLType.F32
    if shape[-1] % target.block_size:
        return GGMLType.F16
    return target


def write_mmproj(
    path: str | os.PathLike,
    arch: VisionArch,
    config: Any,
    tensors: list[VisionTensor],
    processor: ProcessorConfig,
    *,
    quant: str,
    name: str,
    weight: Callable[[str], torch.Tensor],
    threads: int = 0,
    overwrite: bool = False,
    log: Any = None,
) -> dict[str, str]:
    """Write the mmproj file; `weight(hf_name)` gives a vision parameter merged with its LoRA deltas (float32).
    Returns each tensor's ggml type by name."""
    types: dict[str, str] = {}
    with GGUFWriter(path, threads=threads, overwrite=overwrite) as w:
        w.add_string("general.architecture", "clip")
        for key, vtype, value, elem in arch.hparams(config, processor, quant, name):
            w.add(key, vtype, value, elem)
        indices = [w.add_tensor(t.gguf_name, t.shape, t.qtype) for t in tensors]
        w.begin()
        cached: tuple[str, torch.Tensor] | None = None
        with torch.no_grad():
            for t, index in zip(tensors, indices):
                if cached is None or cached[0] != t.source:  # qkv / conv splits read one source several times
                    cached = (t.source, weight(t.source))
                data = t.make(cached[1])
                if tuple(data.shape) != t.shape:
                    raise AssertionError(f"{t.gguf_name}: made shape {tuple(data.shape)}, planned {t.shape}")
                w.write_tensor(index, data)
                types[t.gguf_name] = t.qtype.name
                if log:
                    log(f"{t.gguf_name:32s} {t.qtype.name:5s} {t.shape}")
    return types


def mmproj_path(out: str | os.PathLike) -> str:
    """``model.gguf`` -> ``model.mmproj.gguf`` (the projector file beside the language model)."""
    out = os.fspath(out)
    stem = out[: -len(".gguf")] if out.lower().endswith(".gguf") else out
    return stem + ".mmproj.gguf"
