"""`quickloris eval`: exact-match accuracy of a model, optionally with a LoRA adapter, on held-out problems (a
sequence classifier's accuracy and macro-F1 with ``--task-type classification``: `quickloris.train.classify`).

With ``--adapter`` the model is evaluated as quickloris trained it: base linears in NF4 (quantized here, or the
bytes of a ``*-bnb-4bit`` folder) plus the adapter (`quickloris.models.prepare.prepare_model(model, adapter=...)`),
so the accuracy equals the "after" number of the `quickloris train` run that wrote the adapter. Without an adapter
the model is scored as loaded, unless ``--nf4`` asks for its NF4 version (what training starts from: the "before"
number of a train run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quickloris.train.config import EvalConfig, EvalTaskConfig, ModelConfig
from quickloris.train.runtime import load_eval_examples, resolve_device, resolve_dtype, resolve_threads


def run_quantization(adapter: str | os.PathLike) -> Any:
    """The NF4 settings an adapter was trained with: from the run's config.json when the adapter is a
    `quickloris train` run's ``adapter/`` folder (PEFT's adapter_config.json does not record them), else the
    defaults. Rank, alpha and targets always come from the adapter itself."""
    from quickloris.models.prepare import QLoRAConfig

    base = QLoRAConfig(chunked_loss=False)
    try:
        q = json.loads((Path(adapter).parent / "config.json").read_text(encoding="utf-8"))["qlora"]
        return dataclasses.replace(base, blocksize=int(q["blocksize"]), double_quant=bool(q["double_quant"]),
                                   lora_dtype=q["lora_dtype"])
    except (OSError, KeyError, TypeError, ValueError):
        return base


def run_eval(model_cfg: ModelConfig, task_cfg: EvalTaskConfig, eval_cfg: EvalConfig, *,
             echo: Callable[[str], None] = lambda m: print(m, flush=True)) -> dict[str, Any]:
    """Score the model; returns the result as a dict (also written to ``--output`` when given). A classifier
    (``--task-type classification``) is scored by `quickloris.train.classify.run_eval_classification`."""
    if model_cfg.task_type == "classification":
        from quickloris.train.classify import run_eval_classification

        quantization = run_quantization(model_cfg.adapter) if model_cfg.adapter is not None else None
        return run_eval_classification(model_cfg, task_cfg, eval_cfg, quantization=quantization, echo=echo)
    from quickloris.data.config import read_chat_template, task_name
    from quickloris.data.tasks import get_task
    from quickloris.models.loading import load_model, load_tokenizer, resolve_model
    from quickloris.models.prepare import QLoRAConfig, prepare_model
    from quickloris.train.run import evaluate
    from quickloris.utils.atomic import atomic_write_json

    device = resolve_device(model_cfg)
    dtype = resolve_dtype(model_cfg, device)
    threads, why = resolve_threads(model_cfg)
    if device.type == "cpu" or model_cfg.threads is not None:
        torch.set_num_threads(threads)
    source = resolve_model(model_cfg.model)
    if eval_cfg.eval_data is not None:
        examples, what = load_eval_examples(eval_cfg.eval_data), f"--eval-data {eval_cfg.eval_data}"
    else:
        task = get_task(task_name(EvalTaskConfig, task_cfg.task, "causal_lm"))
        examples = task.generate("heldout", task_cfg.num_eval, task_cfg.seed)
        what = f"{len(examples)} held-out problems of task {task.name!r} (seed {task_cfg.seed})"
    chat_template = read_chat_template(task_cfg.chat_template)
    nf4 = task_cfg.nf4 if task_cfg.nf4 is not None else model_cfg.adapter is not None
    echo(f"model: {source.describe()}" + (f" + adapter {model_cfg.adapter}" if model_cfg.adapter else "")
         + (", NF4 base" if nf4 else "") + f"; device {device}" + (f", {why}" if device.type == "cpu" else ""))
    echo(f"eval: {what}")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype=dtype, device=device)
    if model_cfg.adapter is not None:
        if not nf4:
            raise ValueError("--adapter is evaluated on the NF4 base it was trained on; drop --no-nf4")
        prepare_model(model, run_quantization(model_cfg.adapter), adapter=model_cfg.adapter)
    elif nf4:
        prepare_model(model, QLoRAConfig(chunked_loss=False))  # LoRA B = 0: exactly the NF4 base
    model.eval()
    echo(f"loaded in {time.perf_counter() - t0:.1f} s")
    result = evaluate(model, tokenizer, examples, eval_cfg, chat_template, "", echo)
    result = {"model": str(source.path), "adapter": model_cfg.adapter, "nf4": nf4, "eval": what, **result}
    if task_cfg.output is not None:
        atomic_write_json(task_cfg.output, result)
        echo(f"result written to {task_cfg.output}")
    return result
