"""Vision-language training data: JSONL with image content parts, resizing, response-only labels, collation.

Records. One JSON object per line, ``{"messages": [...]}`` as for text, where a message's ``content`` is a string or
a list of parts ``{"type": "text", "text": "..."}`` / ``{"type": "image", "image": "images/cat.png"}`` (a local file,
relative to the data file's folder). Rows with and without images mix freely. Images belong to user / system turns
(an image in an assistant turn is refused: its tokens would be "trained" and are never generated).

Images. `load_image` opens a file as RGB; with ``image_max_size`` (``--image-max-size``) its longest side is scaled
down to at most that (aspect kept) and both sides are snapped to the model's patch multiple (`VisionProcessing.snap`:
patch x merge), never above the limit; the image processor's own limits (Qwen's min/max pixels, Pixtral's longest
edge, Llava's fixed crop, Mllama's tiles) apply after.

Tokens and labels. A conversation is rendered with the chat template and its trained characters located by
rendering prefixes (`quickloris.data.chat.tokenize_chat`: no string markers), where each image renders as the
family's placeholder token. Each placeholder is then replaced by the tokens the image becomes
(`VisionProcessing.plan`: Qwen's ``t*h*w/4`` ``<|image_pad|>``, Pixtral's rows of ``[IMG]`` closed by
``[IMG_BREAK]`` / ``[IMG_END]``, ...), all labelled -100. The length is counted after this expansion, so
``--max-seq-len`` drops (or, with ``--overflow error``, refuses) a row whose images make it too long; a row is never
cut, so no image loses tokens.

Batches (`collate_vision`). Padded: right-padded ``[B, L]`` rows, plus the image inputs of the rows that have images
(``VisionProcessing.pixels``: the vision tower never sees a row without one; a batch without images has no pixel
inputs at all), Qwen's ``mm_token_type_ids``, Mllama's ``cross_attention_mask``. Packed (padding-free): one row of
all documents, ``position_ids`` restarting at 0 per document - for Qwen's multimodal RoPE ``[4, 1, N]``: the text
positions, then the temporal / height / width positions of `mrope_positions`, each restarting per document - which
the attention masks read as document boundaries (flex: a block-diagonal BlockMask; SDPA: transformers' packed-
sequence detection); the first label of every document is -100.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from quickloris.data.chat import IGNORE_INDEX, TokenizedExample, TokenizeStats, check_max_seq_len, tokenize_chat
from quickloris.data.jsonl import DataFormatError

ROLES_WITH_IMAGES = ("user", "system")


@dataclasses.dataclass(frozen=True)
class VisionRecord:
    """A conversation whose contents may hold image parts; `images` are the files, in order of appearance."""

    messages: tuple[dict[str, Any], ...]
    images: tuple[Any, ...]  # file paths (str), or PIL images (the embedded visual tasks)
    source: str = "<memory>"


@dataclasses.dataclass(frozen=True)
class VisionExample(TokenizedExample):
    """Token ids / labels after image expansion, the images (files) and each image's token grid (Qwen's mRoPE)."""

    images: tuple[Any, ...] = ()
    grids: tuple[tuple[int, int, int] | None, ...] = ()


@dataclasses.dataclass
class VisionStats(TokenizeStats):
    images: int = 0
    image_tokens: int = 0
    rows_with_images: int = 0


# ---- reading ---------------------------------------------------------------------------------------------------


def _parts(content: Any, where: str, role: str, folder: Path, images: list[str]) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise DataFormatError(f"{where}: 'content' must be a string or a non-empty list of parts")
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
        elif kind == "image" and isinstance(part.get("image"), str) and part["image"]:
            if role not in ROLES_WITH_IMAGES:
                raise DataFormatError(f"{where}: part {j} is an image in a {role!r} turn; images go in user turns")
            path = Path(part["image"])
            path = path if path.is_absolute() else folder / path
            if not path.is_file():
                raise DataFormatError(f"{where}: image {part['image']!r} not found (looked for {path})")
            images.append(str(path))
            out.append({"type": "image"})
        else:
            raise DataFormatError(
                f"{where}: part {j} must be {{'type': 'text', 'text': str}} or {{'type': 'image', 'image': path}}, "
                f"got {json.dumps(part)[:80]}"
            )
    return out


def parse_vision_record(obj: Any, where: str, folder: Path) -> VisionRecord:
    """Validate one decoded JSONL object (errors name `where`); image paths resolve against `folder`."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
        raise DataFormatError(f"{where}: expected an object with a non-empty 'messages' list")
    messages, images = [], []
    for i, m in enumerate(obj["messages"]):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise DataFormatError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        content = _parts(m["content"], f"{where}: messages[{i}]", m["role"], folder, images)
        messages.append({"role": m["role"], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataFormatError(f"{where}: 'messages' has no 'assistant' turn, so nothing to train on")
    return VisionRecord(tuple(messages), tuple(images), where)


def read_vision_jsonl(path: str | os.PathLike) -> list[VisionRecord]:
    """The records of a vision-language JSONL file (module docstring); errors name file:line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(p)!r} does not exist")
    out = []
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{p}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
            out.append(parse_vision_record(obj, where, p.parent))
    if not out:
        raise DataFormatError(f"data file {str(p)!r} contains no records")
    return out


# ---- images ----------------------------------------------------------------------------------------------------


def resized_size(width: int, height: int, max_size: int, snap: int = 1) -> tuple[int, int]:
    """(width, height) with the longest side at most `max_size` (aspect kept: both scaled by one factor, only
    down) and each side a multiple of `snap`: the nearest one, at least `snap`, at most the largest <= max_size."""
    if max_size < snap:
        raise ValueError(f"image_max_size={max_size} is smaller than the model's patch multiple {snap}")
    scale = min(1.0, max_size / max(width, height))
    top = max_size // snap * snap

    def side(v: int) -> int:
        return min(top, max(snap, int(round(v * scale / snap)) * snap))

    return side(width), side(height)


def load_image(path: Any, max_size: int | None = None, snap: int = 1) -> Any:
    """The image at `path` (or a PIL image: the embedded visual tasks draw theirs) as RGB, resized by
    `resized_size` when `max_size` is given."""
    from PIL import Image

    if isinstance(path, Image.Image):
        img = path.convert("RGB")
    else:
        with Image.open(path) as im:
            img = im.convert("RGB")
    if max_size is not None:
        size = resized_size(img.width, img.height, max_size, snap)
        if size != img.size:
            img = img.resize(size, Image.Resampling.BICUBIC)
    return img


# ---- tokens ----------------------------------------------------------------------------------------------------


def tokenize_vision(
    processing: Any, record: VisionRecord, *, chat_template: str | None = None, image_max_size: int | None = None
) -> VisionExample:
    """Render `record` (labels from rendering), then replace each image placeholder by the image's tokens."""
    base = tokenize_chat(processing.tokenizer, record.messages, source=record.source, chat_template=chat_template)
    where = [i for i, t in enumerate(base.input_ids) if t == processing.placeholder_id]
    if len(where) != len(record.images):
        raise DataFormatError(
            f"{record.source}: the chat template rendered {len(where)} image placeholders "
            f"({processing.placeholder!r}) for {len(record.images)} images"
        )
    ids, labels, grids, last = [], [], [], 0
    for at, path in zip(where, record.images):
        plan = processing.plan(load_image(path, image_max_size, processing.snap))
        ids += base.input_ids[last:at] + list(plan.tokens)
        labels += base.labels[last:at] + [IGNORE_INDEX] * len(plan.tokens)  # image tokens are never trained
        grids.append(plan.grid)
        last = at + 1
    ids += base.input_ids[last:]
    labels += base.labels[last:]
    return VisionExample(ids, labels, record.source, record.images, tuple(grids))


def tokenize_vision_records(
    processing: Any,
    records: Sequence[VisionRecord],
    *,
    max_seq_len: int,
    overflow: Literal["drop", "error"] = "drop",
    chat_template: str | None = None,
    image_max_size: int | None = None,
) -> tuple[list[VisionExample], VisionStats]:
    """All records, the length counted after image expansion: longer than `max_seq_len` -> dropped or an error."""
    check_max_seq_len(max_seq_len)
    stats = VisionStats(records=len(records))
    out = []
    for r in records:
        ex = tokenize_vision(processing, r, chat_template=chat_template, image_max_size=image_max_size)
        stats.longest = max(stats.longest, len(ex))
        if len(ex) > max_seq_len:
            if overflow == "error":
                raise DataFormatError(
                    f"{r.source}: {len(ex)} tokens with its images expanded, longer than --max-seq-len "
                    f"{max_seq_len} (raise it, lower --image-max-size, or use --overflow drop)"
                )
            stats.dropped_too_long += 1
            stats.dropped_sources.append(r.source)
            continue
        out.append(ex)
        stats.images += len(ex.images)
        stats.rows_with_images += bool(ex.images)
        stats.image_tokens += sum(t == processing.image_token_id for t in ex.input_ids)
    stats.kept = len(out)
    stats.tokens = sum(map(len, out))
    stats.trainable_tokens = sum(e.num_trainable for e in out)
    if not out:
        raise DataFormatError(
            f"no example fits --max-seq-len {max_seq_len} with its images expanded (the longest has {stats.longest} "
            "tokens)"
        )
    if stats.trainable_tokens == 0:
        raise DataFormatError("the dataset has no trainable tokens: check that the records have assistant turns")
    return out, stats


# ---- batches ---------------------------------------------------------------------------------------------------


def mrope_positions(ids: Sequence[int], image_token_id: int, grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """Qwen2-VL's multimodal RoPE positions [3, n] of one document: a text token at running position c gets
    (c, c, c) and advances c by 1; an image of merged grid (t, h, w) takes its next t*h*w tokens, token (i, j, k)
    at (c + i, c + j, c + k) (row-major), then c advances by max(h, w)."""
    out = torch.empty(3, len(ids), dtype=torch.long)
    c, i, k = 0, 0, 0
    while i < len(ids):
        if ids[i] != image_token_id:
            out[:, i] = c
            c, i = c + 1, i + 1
            continue
        t, h, w = grids[k]
        n = t * h * w
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        out[:, i : i + n] = torch.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + c
        c, i, k = c + max(h, w), i + n, k + 1
    return out


def cross_attention_spans(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """Mllama: the tokens [start, end) that attend to each image of a row - from its ``<|image|>`` token up to the
    next image's, the last image's to the end; images whose tokens are adjacent form a group that attends together
    up to where the group's last one does."""
    at = [i for i, t in enumerate(ids) if t == image_token_id]
    spans = [[a, b] for a, b in zip(at, at[1:] + [len(ids)])]
    for k in range(len(spans) - 2, -1, -1):
        if spans[k][1] == spans[k][0] + 1:  # the next image follows at once: same group
            spans[k][1] = spans[k + 1][1]
    return [(a, b) for a, b in spans]


def _cross_mask(processing: Any, rows_ids: Sequence[Sequence[int]], rows_images: Sequence[Sequence[Any]], length: int):
    max_images = max(len(r) for r in rows_images)
    mask = torch.zeros(len(rows_ids), length, max_images, processing.max_tiles, dtype=torch.long)
    for b, (ids, images) in enumerate(zip(rows_ids, rows_images)):
        if images:
            for k, ((start, end), tiles) in enumerate(
                zip(cross_attention_spans(ids, processing.image_token_id), processing.tiles(list(images)))
            ):
                mask[b, start:end, k, :tiles] = 1
    return mask


def collate_vision(
    processing: Any,
    examples: Sequence[VisionExample],
    *,
    packing: bool,
    pad_token_id: int,
    image_max_size: int | None = None,
) -> dict[str, Any]:
    """One batch of `examples` (module docstring): padded rows, or one packed row."""
    from quickloris.data.packing import collate_padded

    if not examples:
        raise ValueError("collate_vision needs at least one example")
    rows_images = [[load_image(p, image_max_size, processing.snap) for p in ex.images] for ex in examples]
    kind = processing.kind
    if packing:
        if kind == "mllama":
            raise ValueError("packing is not supported for Mllama (its cross-attention reads whole rows)")
        ids, labels, pos = [], [], []
        for ex in examples:
            ids += ex.input_ids
            labels += [IGNORE_INDEX] + ex.labels[1:]  # never predicted from the previous document
            text = torch.arange(len(ex))
            pos.append(
                torch.cat([text[None], mrope_positions(ex.input_ids, processing.image_token_id, ex.grids)])
                if kind == "qwen2_vl"
                else text[None]
            )
        batch = {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.cat(pos, dim=1)[:, None, :] if kind == "qwen2_vl" else torch.cat(pos, dim=1),
            "use_cache": False,
        }
        rows_images = [[img for r in rows_images for img in r]]
    else:
        batch = collate_padded(examples, pad_token_id)
    pixels = processing.pixels(rows_images)
    image_tokens = int((batch["input_ids"] == processing.image_token_id).sum())
    if (processing.count(pixels) if pixels else 0) != image_tokens:
        raise ValueError(
            f"the images of this batch make {processing.count(pixels) if pixels else 0} image features but the text "
            f"holds {image_tokens} image tokens ({', '.join(sorted({e.source for e in examples}))})"
        )
    batch.update(pixels)
    if kind == "qwen2_vl" and not packing:
        batch["mm_token_type_ids"] = (batch["input_ids"] == processing.image_token_id).long()
    if kind == "mllama" and pixels:
        batch["cross_attention_mask"] = _cross_mask(
            processing, [e.input_ids for e in examples], rows_images, batch["input_ids"].shape[1]
        )
    return batch


__all__ = [
    "VisionRecord",
    "VisionExample",
    "VisionStats",
    "parse_vision_record",
    "read_vision_jsonl",
    "resized_size",
    "load_image",
    "tokenize_vision",
    "tokenize_vision_records",
    "mrope_positions",
    "cross_attention_spans",
    "collate_vision",
]


def prompt_example(
    processing: Any,
    messages: Sequence[dict[str, Any]],
    images: Sequence[Any],
    *,
    chat_template: str | None = None,
    image_max_size: int | None = None,
) -> VisionExample:
    """A generation prompt: `messages` rendered with the generation prompt appended, image placeholders expanded
    (labels all -100)."""
    tok = processing.tokenizer
    text = tok.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=True, chat_template=chat_template
    )
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    out, grids, k = [], [], 0
    for t in ids:
        if t != processing.placeholder_id:
            out.append(t)
            continue
        if k >= len(images):
            raise DataFormatError(f"the prompt renders more image placeholders than its {len(images)} images")
        plan = processing.plan(load_image(images[k], image_max_size, processing.snap))
        out += plan.tokens
        grids.append(plan.grid)
        k += 1
    if k != len(images):
        raise DataFormatError(f"the prompt renders {k} image placeholders for {len(images)} images")
    return VisionExample(out, [IGNORE_INDEX] * len(out), "<prompt>", tuple(images), tuple(grids))
