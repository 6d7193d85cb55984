"""`quickloris train` on a vision-language model folder: what differs from a text run, in one place.

`run_train` (`quickloris.train.run`) asks `is_vision_source` once; for a VLM it then takes from here: the checks of
options that do not apply (`check_vision_run`), the tokenizer + image handling (`load_vision_parts`: the folder's
tokenizer, its image processor - transformers' PIL backend, the same with or without torchvision - and the chat
template, which VLM folders keep beside the processor), the tokenized data (`prepare_vision_data`: ``--data`` JSONL
with image parts, or an embedded visual task, `quickloris.data.vision_tasks`), the model (`load_vision_model`:
``AutoModelForImageTextToText``), the loop's objective (`VisionCausalLM`: the causal-LM loss over
`quickloris.data.vision.collate_vision` batches) and the held-out accuracy of a visual task (`evaluate_vision`:
greedy generation, exact match of the first line).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Literal

import torch

from quickloris.config import Config, ConfigError, at_least, field
from quickloris.data.config import DataConfig, PreparedData
from quickloris.data.tasks import exact_match
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
        help="vision-language models without --data: the embedded visual task to train on and score (images drawn "
        "on the fly): dots (count 1-6 dots), shapes (circle / square / triangle) or colors (the shape's colour)",
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
    if eval_cfg.eval_data is not None:
        raise ConfigError(type(eval_cfg), "eval_data", "is not supported for vision-language models yet")
    if data_cfg.data is None and vision_cfg.visual_task is None:
        raise ConfigError(VisionConfig, "visual_task", "or --data is needed to train a vision-language model")
    if data_cfg.data is not None and vision_cfg.visual_task is not None:
        raise ConfigError(VisionConfig, "visual_task", "and --data are exclusive: pick one")


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
    data_cfg: DataConfig, vision_cfg: VisionConfig, processing: Any, chat_template: str | None, seed: int
) -> tuple[PreparedData, list]:
    """(training examples + stats, held-out visual problems: empty for --data)."""
    from quickloris.data.vision import read_vision_jsonl, tokenize_vision_records
    from quickloris.data.vision_tasks import visual_problems

    if data_cfg.data is None:
        task, size = vision_cfg.visual_task, vision_cfg.image_task_size
        records = [p.record() for p in visual_problems(task, "train", data_cfg.num_train, seed, size)]
        heldout = visual_problems(task, "heldout", data_cfg.num_eval, seed, size)
        source = f"embedded visual task {task!r}"
    else:
        # --data takes several files (one list): their records in the order given.
        records = [r for path in data_cfg.data for r in read_vision_jsonl(path)]
        heldout, source = [], ", ".join(data_cfg.data)
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
    return PreparedData(examples, stats, [], source), heldout


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


def evaluate_vision(
    model: Any,
    processing: Any,
    problems: list,
    *,
    chat_template: str | None,
    image_max_size: int | None,
    max_new_tokens: int = 8,
    label: str = "",
    echo=print,
) -> dict[str, Any]:
    """Exact match of greedy replies to held-out visual problems (one prompt at a time: no padding to get wrong)."""
    from quickloris.data.vision import collate_vision, prompt_example
    from quickloris.train.runtime import eager_regions

    tok = processing.tokenizer
    device = next(model.parameters()).device
    use_cache, training = model.config.use_cache, model.training
    model.config.use_cache = True
    model.eval()
    t0, correct, samples = time.perf_counter(), 0, []
    try:
        with torch.no_grad(), eager_regions():
            for p in problems:
                ex = prompt_example(
                    processing,
                    p.prompt_messages(),
                    [p.image],
                    chat_template=chat_template,
                    image_max_size=image_max_size,
                )
                batch = collate_vision(
                    processing, [ex], packing=False, pad_token_id=tok.pad_token_id, image_max_size=image_max_size
                )
                batch.pop("labels")
                batch.pop("image_rows", None)  # one row with its image: transformers' own per-row layout
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                if "pixel_values" in batch:
                    from quickloris.models.vision import vision_parameters

                    batch["pixel_values"] = batch["pixel_values"].to(vision_parameters(model)[0].dtype)
                out = model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
                )
                reply = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
                ok = exact_match(reply, p.answer)
                correct += ok
                if len(samples) < 3:
                    samples.append({"question": p.question, "answer": p.answer, "reply": reply, "correct": ok})
    finally:
        model.config.use_cache = use_cache
        model.train(training)
    n = len(problems)
    result = {
        "accuracy": correct / n if n else 0.0,
        "correct": correct,
        "total": n,
        "seconds": round(time.perf_counter() - t0, 3),
        "samples": samples,
    }
    echo(
        f"eval{' ' + label if label else ''}: exact match {100 * result['accuracy']:.1f}% ({correct}/{n}) in "
        f"{result['seconds']:.1f} s"
    )
    for s in samples:
        echo(f"    {s['answer']!r} <- {s['reply'].strip()[:40]!r} ({'right' if s['correct'] else 'wrong'})")
    return result


__all__ = [
    "VisionConfig",
    "VisionCausalLM",
    "check_vision_run",
    "evaluate_vision",
    "is_vision_source",
    "load_vision_model",
    "load_vision_parts",
    "prepare_vision_data",
    "text_limit",
]
