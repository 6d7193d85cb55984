"""Per-family image handling of the vision-language models: the tokens an image becomes and its pixel tensors.

`quickloris.data.vision` tokenizes and collates without knowing a family; it asks a `VisionProcessing` (built here
from the model's config, its tokenizer and its image processor) two things:

* `VisionProcessing.plan(image)`: the token ids that replace the chat template's image placeholder, and the
  image's grid (Qwen's multimodal RoPE needs it). Computed by running the family's image processor on the image
  (pixels dropped) and reading what the model's vision side will make of it:

  - Qwen2-VL / 2.5-VL: ``t * h * w / merge^2`` image tokens for the processor's patch grid ``(t, h, w)`` (after
    its resize to multiples of ``patch * merge`` within ``min_pixels .. max_pixels``);
  - Llava 1.5: ``(S / patch)^2`` tokens for the fixed crop S (+1, the CLS token, with the "full" feature strategy);
  - LLaVA-NeXT: the base view ``(S / patch)^2`` (+1 with "full") plus the any-resolution grid: the best
    ``image_grid_pinpoints`` resolution's patch grid cut back to the image's aspect (padding rows or columns
    removed, as the model unpads), plus one newline token per remaining row;
  - Pixtral: rows x columns of ``[IMG]`` for the processor's image size / patch, each row closed by ``[IMG_BREAK]``,
    the last by ``[IMG_END]`` instead;
  - Mllama: one ``<|image|>`` token (the image enters through cross-attention).

* `VisionProcessing.pixels(rows)`: the model's image inputs for a batch, from the images of the rows that have
  any (in order); the vision tower sees nothing of the others. Mllama's inputs are per row: ``image_rows`` says
  which rows they belong to (`quickloris.models.vision` scatters the tower's output).

The token counts are checked against the pixel tensors when a batch is made (a mismatch raises rather than
feeding the model image features that do not line up with its image tokens).

No transformers processor object is needed (they require torchvision for their video processors): the image
processor (``AutoImageProcessor``, PIL backend), the tokenizer and the config suffice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class ImagePlan:
    """What one image becomes in the text: `tokens` (ids replacing the placeholder) and its merged patch grid
    ``(t, h, w)`` in tokens (Qwen's mRoPE), or None."""

    tokens: tuple[int, ...]
    grid: tuple[int, int, int] | None = None


def _token_id(tokenizer: Any, token: str, what: str) -> int:
    ids = tokenizer.convert_tokens_to_ids([token])
    tid = ids[0] if ids else None
    if tid is None or tid == getattr(tokenizer, "unk_token_id", None):
        raise ValueError(f"the tokenizer has no {what} token {token!r}")
    return int(tid)


class VisionProcessing:
    """Base: the tokenizer, the image processor, the placeholder the chat template renders for an image."""

    kind = ""
    snap = 1  # image sides are snapped to multiples of this (patch x merge) when --image-max-size resizes

    def __init__(self, config: Any, tokenizer: Any, image_processor: Any, placeholder: str):
        self.config, self.tokenizer, self.image_processor = config, tokenizer, image_processor
        self.placeholder = placeholder
        self.placeholder_id = _token_id(tokenizer, placeholder, "image placeholder")
        self.image_token_id = self.placeholder_id  # the id the model's image features replace

    def process(self, images: list) -> dict[str, Any]:
        return dict(self.image_processor(images=images, return_tensors="pt"))

    def plan(self, image: Any) -> ImagePlan:
        raise NotImplementedError

    def pixels(self, rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
        """The model's image inputs for the images of `rows` (rows without images give nothing)."""
        images = [img for row in rows for img in row]
        return self.process(images) if images else {}

    def count(self, batch: dict[str, Any]) -> int:
        """Image tokens the pixel inputs of `batch` produce (checked against the text's image tokens)."""
        raise NotImplementedError


class QwenVL(VisionProcessing):
    kind = "qwen2_vl"

    def __init__(self, config, tokenizer, image_processor):
        super().__init__(config, tokenizer, image_processor, "<|image_pad|>")
        self.merge = int(image_processor.merge_size)
        self.snap = int(image_processor.patch_size) * self.merge

    def plan(self, image):
        t, h, w = (int(x) for x in self.process([image])["image_grid_thw"][0])
        grid = (t, h // self.merge, w // self.merge)
        return ImagePlan((self.image_token_id,) * math.prod(grid), grid)

    def count(self, batch):
        return int(batch["image_grid_thw"].prod(-1).sum()) // self.merge**2


class Llava(VisionProcessing):
    kind = "llava"

    def __init__(self, config, tokenizer, image_processor):
        super().__init__(config, tokenizer, image_processor, "<image>")
        self.patch = int(config.vision_config.patch_size)
        self.extra = 1 if config.vision_feature_select_strategy == "full" else 0  # the CLS token kept

    def _per_image(self, height: int, width: int) -> int:
        return (height // self.patch) * (width // self.patch) + self.extra

    def plan(self, image):
        h, w = self.process([image])["pixel_values"].shape[-2:]
        return ImagePlan((self.image_token_id,) * self._per_image(h, w))

    def count(self, batch):
        pv = batch["pixel_values"]
        return pv.shape[0] * self._per_image(*pv.shape[-2:])


class LlavaNext(Llava):
    kind = "llava_next"

    def _features(self, height: int, width: int, tile_h: int, tile_w: int) -> int:
        from transformers.image_processing_utils import select_best_resolution

        best_h, best_w = select_best_resolution([height, width], self.config.image_grid_pinpoints)
        rows, cols = (best_h // tile_h) * (tile_h // self.patch), (best_w // tile_w) * (tile_w // self.patch)
        if width / height > cols / rows:  # wider than the grid: padding rows above and below are dropped
            kept = int(round(height * (cols / width), 7))
            rows -= 2 * ((rows - kept) // 2)
        else:
            kept = int(round(width * (rows / height), 7))
            cols -= 2 * ((cols - kept) // 2)
        base = (tile_h // self.patch) * (tile_w // self.patch) + self.extra
        return base + rows * cols + rows  # + one newline per row

    def plan(self, image):
        out = self.process([image])
        (h, w), (th, tw) = out["image_sizes"][0].tolist(), out["pixel_values"].shape[-2:]
        return ImagePlan((self.image_token_id,) * self._features(h, w, th, tw))

    def count(self, batch):
        th, tw = batch["pixel_values"].shape[-2:]
        return sum(self._features(h, w, th, tw) for h, w in batch["image_sizes"].tolist())


class Pixtral(VisionProcessing):
    kind = "pixtral"

    def __init__(self, config, tokenizer, image_processor):
        super().__init__(config, tokenizer, image_processor, "[IMG]")
        self.break_id = _token_id(tokenizer, "[IMG_BREAK]", "image break")
        self.end_id = _token_id(tokenizer, "[IMG_END]", "image end")
        self.patch = int(config.vision_config.patch_size) * int(getattr(config, "spatial_merge_size", 1) or 1)
        self.snap = self.patch

    def process(self, images):
        return dict(self.image_processor(images=images, patch_size=self.patch, return_tensors="pt"))

    def plan(self, image):
        h, w = self.process([image])["image_sizes"][0].tolist()
        rows, cols = h // self.patch, w // self.patch
        tokens = ([self.image_token_id] * cols + [self.break_id]) * rows
        tokens[-1] = self.end_id
        return ImagePlan(tuple(tokens))

    def count(self, batch):
        return sum((h // self.patch) * (w // self.patch) for h, w in batch["image_sizes"].tolist())


class Mllama(VisionProcessing):
    kind = "mllama"

    def __init__(self, config, tokenizer, image_processor):
        super().__init__(config, tokenizer, image_processor, "<|image|>")
        self.max_tiles = int(image_processor.max_image_tiles)

    def plan(self, image):
        return ImagePlan((self.image_token_id,))

    def tiles(self, images: list) -> list[int]:
        """Tiles each image is cut into (what its cross-attention mask covers)."""
        return [int(n[0]) for n in self.image_processor(images=[[img] for img in images])["num_tiles"]]

    def pixels(self, rows):
        image_rows = [i for i, row in enumerate(rows) if row]
        if not image_rows:
            return {}
        out = dict(self.image_processor(images=[list(rows[i]) for i in image_rows], return_tensors="pt"))
        out.pop("num_tiles", None)
        out["image_rows"] = torch.tensor(image_rows, dtype=torch.long)
        return out

    def count(self, batch):
        return int((batch["aspect_ratio_ids"] > 0).sum())


FAMILIES = {"qwen2_vl": QwenVL, "qwen2_5_vl": QwenVL, "llava_next": LlavaNext, "mllama": Mllama}


def vision_processing(config: Any, tokenizer: Any, image_processor: Any) -> VisionProcessing:
    """The `VisionProcessing` of a VLM config (Llava with a Pixtral vision config is Pixtral)."""
    model_type = getattr(config, "model_type", None)
    if model_type == "llava":
        vision = getattr(getattr(config, "vision_config", None), "model_type", None)
        cls = Pixtral if vision == "pixtral" else Llava
    elif model_type in FAMILIES:
        cls = FAMILIES[model_type]
    else:
        raise ValueError(f"no image handling for model_type {model_type!r}")
    return cls(config, tokenizer, image_processor)


__all__ = ["ImagePlan", "VisionProcessing", "vision_processing"]
