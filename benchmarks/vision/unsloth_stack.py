"""The ``unsloth`` stack of `quickloris bench vision`'s speed part: Unsloth's ``FastVisionModel``, in its own process.

Unsloth patches transformers when imported, so (as `benchmarks.train.unsloth_stack` does for text) the parent
saves what the other stacks train on - the random-init Qwen2-VL in bf16 (``save_pretrained``), a processor built
from the bench's tokenizer (Unsloth's loader insists on one; the batches never go through it), and every step's
padded batches already collated (``torch.save``) - and runs this module under Unsloth's site folder
(`benchmarks.train.unsloth_stack.run_child`). The child loads the folder with ``FastVisionModel.from_pretrained(
load_in_4bit=True)`` (bitsandbytes NF4, double quant: the same 4-bit codes the other stacks hold, re-quantized
from the bf16 weights), adds LoRA r=16 alpha=32 on the language model's attention and MLP linears only (vision
tower frozen, as in the other stacks) with ``use_gradient_checkpointing="unsloth"``, and times the same steps with
the same loop (`benchmarks.vision.bench.timed_steps`).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def save_processor(tok, directory: Path) -> None:
    """A Qwen2-VL processor over `tok` (the image / video processors' defaults) in `directory` (needs torchvision,
    which the device has, for the video processor a Qwen2-VL processor cannot go without)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    proc = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=tok.chat_template,
    )
    proc.save_pretrained(directory)


def run_unsloth_vision(model, tok, batches: list[list[dict]], tokens: list[int], *, seed: int) -> dict[str, Any]:
    """Parent side: `model` (moved to the CPU here, so its GPU memory is free for the child) saved with a processor,
    `batches` / `tokens` as `timed_steps` takes them; the child's record or ``{"error": ...}``."""
    import torch

    from benchmarks.train.unsloth_stack import run_child, unsloth_missing

    if missing := unsloth_missing():
        return {"error": missing}
    with tempfile.TemporaryDirectory(prefix="ql-unsloth-vision-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        model.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        model.save_pretrained(tmp / "ckpt")
        save_processor(tok, tmp / "ckpt")
        torch.save({"batches": batches, "tokens": tokens}, tmp / "batches.pt")
        job = {
            "checkpoint": str(tmp / "ckpt"),
            "batches": str(tmp / "batches.pt"),
            "seed": seed,
            "save_s": round(time.perf_counter() - t0, 1),
        }
        return run_child("benchmarks.vision.unsloth_stack", job, tmp, timeout=1800)


def _child(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    import unsloth  # noqa: F401 - first, so that its patches apply to what follows (as its users do)
    from unsloth import FastVisionModel

    from benchmarks.vision.bench import timed_steps

    t0 = time.perf_counter()
    model, _proc = FastVisionModel.from_pretrained(
        job["checkpoint"], load_in_4bit=True, dtype=torch.bfloat16, use_gradient_checkpointing="unsloth"
    )
    model = FastVisionModel.get_peft_model(
        model,
        finetune_vision_layers=False,
        finetune_language_layers=True,
        finetune_attention_modules=True,
        finetune_mlp_modules=True,
        r=16,
        lora_alpha=32,
        lora_dropout=0,
        bias="none",
        random_state=job["seed"],
        use_gradient_checkpointing="unsloth",
    )
    FastVisionModel.for_training(model)
    build_s = time.perf_counter() - t0
    saved = torch.load(job["batches"], weights_only=True)
    res = timed_steps(model, saved["batches"], saved["tokens"], "cuda", torch.bfloat16)
    versions = {"unsloth": unsloth.__version__}
    try:
        import unsloth_zoo

        versions["unsloth_zoo"] = unsloth_zoo.__version__
    except Exception:  # noqa: BLE001 - a version is informative only
        pass
    lora = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A" in n})
    return res | {"versions": versions, "build_s": round(build_s, 1), "save_s": job["save_s"], "lora_on": lora}


if __name__ == "__main__":
    from benchmarks.train.unsloth_stack import child_main

    raise SystemExit(child_main(_child, sys.argv[1:]))
