"""`quickloris train` on a vision-language model folder: what differs from a text run, in one place.

`run_train` (`quickloris.train.run`) asks `is_vision_source` once; for a VLM it then takes from here: the checks of
options that do not apply (`check_vision_run`), the tokenizer + image handling (`load_vision_parts`: the folder's
tokenizer, its image processor - transformers' PIL backend, the same with or without torchvision - and the chat
template, which VLM folders keep beside the processor), the tokenized data (`prepare_vision_data`: ``--data`` JSONL
with image parts, or an embedded visual task, `quickloris.data.vision_tasks`), the model (`load_vision_model`:
``AutoModelForImageTextToText``), the loop's objective (`VisionCausalLM`: the causal-LM loss over
`quickloris.data.vision.collate_vision` batches); the held-out problems (``--eval-data`` or the visual task's) are
scored by `quickloris.train.vision_eval.evaluate_vision` (the text path's exact match, images in the prompts).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import torch

from quickloris.config import Config, ConfigError, at_least, field
from quickloris.data.config import DataConfig, PreparedData
from quickloris.train.config import EvalConfig, EvalTaskConfig, ModelConfig
from quickloris.train.loop import CausalLM


@dataclasses.dataclass
class VisionConfig(Config):
    """Images of a vision-language model run."""

    image_max_size: int | None = field(
        None,
        help="vision-language models: scale each image down so its longest side is at most this many pixels (aspect "
        "kept, sides snapped to the model's patch multiple); none: the image processor's own limits only",
        check=lambda v: None if v is None else at_least(1)(v),
    )
    visual_task: Literal["dots", "shapes", "colors"] | None = field(
        None,
        help="vision-language models: the embedded visual task (images drawn on the fly) that train trains on "
        "without --data and scores, and eval scores: dots (count 1-6 dots), shapes (circle / square / triangle) or "
        "colors (the shape's colour)",
    )
    image_task_size: int = field(
        56, help="side in pixels of the images the embedded visual task draws", check=at_least(8)
    )


def is_vision_source(source: Any) -> bool:
    from quickloris.models.vision import is_vision_model

    return source.config is not None and is_vision_model(source.config)


def check_vision_run(vision: bool, model_cfg, data_cfg, eval_cfg, fsdp_opts, vision_cfg, qlora_cfg) -> None:
    """Options that need (or do not work with) a vision-language model, refused naming the option."""
    if not vision:
        for name in ("image_max_size", "visual_task"):
            if vision_cfg is not None and getattr(vision_cfg, name) is not None:
                raise ConfigError(VisionConfig, name, "applies to vision-language models; this model is text-only")
        if qlora_cfg.train_vision:
            raise ConfigError(type(qlora_cfg), "train_vision", "applies to vision-language models; this one is text")
        return
    if model_cfg.task_type != "causal_lm":
        raise ConfigError(type(model_cfg), "task_type", "must be causal_lm for a vision-language model")
    if data_cfg.data is None and vision_cfg.visual_task is None:
        raise ConfigError(VisionConfig, "visual_task", "or --data is needed to train a vision-language model")
    if data_cfg.data is not None and vision_cfg.visual_task is not None:
        raise ConfigError(VisionConfig, "visual_task", "and --data are exclusive: pick one")


def check_vision_eval(
    vision: bool, model_cfg: ModelConfig, task_cfg: EvalTaskConfig, eval_cfg: EvalConfig, vision_cfg: VisionConfig
) -> None:
    """`quickloris eval`: the options a vision-language model needs or does not take (a text model: the image
    options), one line each naming them."""
    if not vision:
        if vision_cfg.image_max_size is not None or vision_cfg.visual_task is not None:
            name = "visual_task" if vision_cfg.visual_task is not None else "image_max_size"
            raise ConfigError(VisionConfig, name, "applies to vision-language models; this model is text-only")
        return
    if model_cfg.task_type != "causal_lm":
        raise ConfigError(ModelConfig, "task_type", "must be causal_lm for a vision-language model")
    if task_cfg.gguf is not None:
        raise ConfigError(
            EvalTaskConfig,
            "gguf",
            "scores a text model's file; a vision-language model's export (with its .mmproj.gguf) runs in "
            "llama.cpp's multimodal tools, not scored here yet",
        )
    if task_cfg.task is not None:
        raise ConfigError(EvalTaskConfig, "task", "is a text task; score a vision-language model on --visual-task")
    if vision_cfg.visual_task is None and eval_cfg.eval_data is None:
        raise ConfigError(VisionConfig, "visual_task", "or --eval-data is needed to score a vision-language model")
    if vision_cfg.visual_task is not None and eval_cfg.eval_data is not None:
        raise ConfigError(VisionConfig, "visual_task", "and --eval-data are exclusive: pick what to score")


def _chat_template(folder: Path) -> str | None:
    for name in ("chat_template.jinja", "chat_template.json"):
        p = folder / name
        if p.is_file():
            text = p.read_text(encoding="utf-8")
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def load_vision_parts(source: Any, tokenizer: Any, chat_template: str | None) -> tuple[Any, str | None]:
    """(`VisionProcessing`, chat template) of a VLM folder (--chat-template overrides the folder's)."""
    from transformers import AutoConfig
    from transformers.models.auto.image_processing_auto import (
        AutoImageProcessor,
    )  # the top-level name needs torchvision
    from transformers.utils import logging

    from quickloris.models.vision_processing import vision_processing

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "torchvision missing: PIL backend" is expected and not the user's concern
    try:
        image_processor = AutoImageProcessor.from_pretrained(str(source.folder), backend="pil")
    finally:
        logging.set_verbosity(verbosity)
    config = AutoConfig.from_pretrained(str(source.folder))
    template = chat_template or getattr(tokenizer, "chat_template", None) or _chat_template(source.folder)
    if template is None:
        raise ConfigError(DataConfig, "chat_template", f": {source.folder} has no chat template; pass one")
    return vision_processing(config, tokenizer, image_processor), template


def text_limit(source: Any) -> int | None:
    """The language model's position limit, from the folder's config.json (its text_config)."""
    text = (source.config or {}).get("text_config") or {}
    value = text.get("max_position_embeddings")
    return int(value) if value is not None else None


def prepare_vision_data(
    data_cfg: DataConfig,
    vision_cfg: VisionConfig,
    eval_cfg: EvalConfig,
    processing: Any,
    chat_template: str | None,
    seed: int,
) -> tuple[PreparedData, list, str]:
    """(training examples + stats, the held-out problems - --eval-data's, else the visual task's, else none - and
    what they are)."""
    from quickloris.data.vision import read_vision_jsonl, tokenize_vision_records
    from quickloris.data.vision_tasks import visual_problems
    from quickloris.train.vision_eval import vision_problems

    task, size = vision_cfg.visual_task, vision_cfg.image_task_size
    heldout, what = vision_problems(eval_cfg.eval_data, task, data_cfg.num_eval, seed, size)
    if data_cfg.data is None:
        records = [p.record() for p in visual_problems(task, "train", data_cfg.num_train, seed, size)]
        source = f"embedded visual task {task!r}"
    else:
        # --data takes several files (one list): their records in the order given.
        records = [r for path in data_cfg.data for r in read_vision_jsonl(path)]
        source = ", ".join(data_cfg.data)
    if vision_cfg.image_max_size is not None and vision_cfg.image_max_size < processing.snap:
        raise ConfigError(
            VisionConfig,
            "image_max_size",
            f"={vision_cfg.image_max_size} is smaller than the model's patch multiple ({processing.snap} pixels)",
        )
    if data_cfg.packing and processing.kind == "mllama":
        raise ConfigError(DataConfig, "packing", "is not supported for Mllama (cross-attention reads whole rows)")
    examples, stats = tokenize_vision_records(
        processing,
        records,
        max_seq_len=data_cfg.max_seq_len,
        overflow=data_cfg.overflow,
        chat_template=chat_template,
        image_max_size=vision_cfg.image_max_size,
    )
    return PreparedData(examples, stats, [], source), heldout, what


def load_vision_model(source: Any, *, dtype: Any, device: Any) -> Any:
    """The folder's ``*ForConditionalGeneration`` (every part in `dtype`: bf16 on a GPU), in eval mode."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(source.folder), dtype=dtype)
    return model.to(device).eval()


class VisionCausalLM(CausalLM):
    """The causal-LM objective over vision-language batches (image inputs for the rows that have images)."""

    def __init__(self, processing: Any, image_max_size: int | None):
        self.processing, self.image_max_size = processing, image_max_size

    def collate(self, examples, batch, *, packing: bool, pad_token_id: int) -> dict[str, Any]:
        from quickloris.data.vision import collate_vision

        chosen = [examples[i] for row in batch for i in row]
        out = collate_vision(
            self.processing, chosen, packing=packing, pad_token_id=pad_token_id, image_max_size=self.image_max_size
        )
        self._pad = pad_token_id
        return out | {"examples": chosen}

    def loss(self, model, batch, num_items, keep):
        batch = {k: v for k, v in batch.items() if k != "examples"}
        if "pixel_values" in batch:  # the image processor's fp32 pixels, in the vision tower's dtype (bf16 on a GPU)
            from quickloris.models.vision import vision_parameters

            batch["pixel_values"] = batch["pixel_values"].to(vision_parameters(model)[0].dtype)
        return super().loss(model, batch, num_items, keep)

    def split(self, batch: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
        """This rank's rows (``rank::world``) collated again - their own images only - and padded to the whole
        micro-batch's length (the positions every rank scores are the whole batch's)."""
        from quickloris.data.chat import IGNORE_INDEX
        from quickloris.data.vision import collate_vision

        rows = batch["examples"][rank::world]
        out = collate_vision(
            self.processing, rows, packing=False, pad_token_id=self._pad, image_max_size=self.image_max_size
        )
        extra = batch["input_ids"].shape[1] - out["input_ids"].shape[1]
        fills = {"input_ids": self._pad, "labels": IGNORE_INDEX, "attention_mask": 0, "mm_token_type_ids": 0}
        for key, fill in fills.items():
            if key in out and extra:
                out[key] = torch.nn.functional.pad(out[key], (0, extra), value=fill)
        if "cross_attention_mask" in out and extra:
            out["cross_attention_mask"] = torch.nn.functional.pad(out["cross_attention_mask"], (0, 0, 0, 0, 0, extra))
        return out

    def after_backward(self, model, world: int) -> None:
        from quickloris.models.vision import reduce_vision_grads

        reduce_vision_grads(model, world)


def evaluate_run(model, processing, problems, chat_template, vision_cfg, eval_cfg, label: str, echo) -> dict[str, Any]:
    """`quickloris.train.vision_eval.evaluate_vision` with a command's options (--image-max-size, --max-new-tokens)."""
    from quickloris.train.vision_eval import evaluate_vision

    return evaluate_vision(
        model,
        processing,
        problems,
        chat_template=chat_template,
        image_max_size=vision_cfg.image_max_size,
        max_new_tokens=eval_cfg.max_new_tokens,
        batch_size=eval_cfg.eval_batch_size,
        label=label,
        echo=echo,
    )


__all__ = [
    "VisionConfig",
    "VisionCausalLM",
    "check_vision_eval",
    "check_vision_run",
    "evaluate_run",
    "is_vision_source",
    "load_vision_model",
    "load_vision_parts",
    "prepare_vision_data",
    "text_limit",
]
