"""`quickloris eval`: exact-match accuracy of a model, optionally with a LoRA adapter, and of an exported GGUF file,
on held-out problems (a sequence classifier's accuracy and macro-F1 with ``--task-type classification``:
`quickloris.train.classify`).

With ``--adapter`` the model is evaluated as quickloris trained it: base linears in NF4 (quantized here, or the
bytes of a ``*-bnb-4bit`` folder) plus the adapter (`quickloris.models.prepare.prepare_model(model, adapter=...)`),
so the accuracy equals the "after" number of the `quickloris train` run that wrote the adapter. Without an adapter
the model is scored as loaded, unless ``--nf4`` asks for its NF4 version (what training starts from: the "before"
number of a train run).

``--gguf FILE`` scores a GGUF file through llama.cpp on the same problems, with the same prompt tokens, greedy
decoding, stop tokens and exact-match rule (`quickloris.train.exact_match.evaluate_exact_match_gguf`). With
``--adapter`` too, the NF4 base alone is scored as well and one table shows before / after / exported: a file exported
with ``quickloris export gguf`` (default ``--merge-base nf4``, F32 or F16) scores like "after", a quantized one shows
what its quantization costs. Without ``--adapter`` or an explicit ``--nf4`` / ``--no-nf4``, only the file is scored
(``--model`` then only supplies the tokenizer, chat template and EOS ids).

Checks that need no model run first: ``--no-nf4`` with ``--adapter`` (an adapter is scored on the NF4 base it was
trained on), a missing ``--adapter`` folder or ``--gguf`` file, and for Hugging Face folders whether the adapter's
shapes fit the model's config (a GGUF model is checked right after loading).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quickloris.train.config import EvalConfig, EvalTaskConfig, ModelConfig
from quickloris.train.runtime import (
    eager_regions,
    load_eval_examples,
    resolve_device,
    resolve_dtype,
    resolve_threads,
)


def run_quantization(adapter: str | os.PathLike) -> Any:
    """The NF4 settings an adapter was trained with: from the run's config.json when the adapter is a
    `quickloris train` run's ``adapter/`` folder (PEFT's adapter_config.json does not record them), else the
    defaults. Rank, alpha and targets always come from the adapter itself."""
    from quickloris.models.adapter_base import run_config
    from quickloris.models.prepare import QLoRAConfig

    base = QLoRAConfig(chunked_loss=False)
    found = run_config(adapter)
    try:
        q = found[1]["qlora"]
        return dataclasses.replace(
            base, blocksize=int(q["blocksize"]), double_quant=bool(q["double_quant"]), lora_dtype=q["lora_dtype"]
        )
    except (KeyError, TypeError, ValueError):
        return base


def check_eval_options(model_cfg: ModelConfig, task_cfg: EvalTaskConfig) -> None:
    """The checks that need no model (one line each, naming the options)."""
    if model_cfg.adapter is not None:
        if task_cfg.nf4 is False:
            raise ValueError(
                "--no-nf4 with --adapter: an adapter is scored on the NF4 base it was trained on; to "
                "score it merged into the 16-bit weights, export it with `quickloris export gguf "
                "--merge-base original --quant f16` and score the file with --gguf"
            )
        if not os.path.isdir(model_cfg.adapter):
            raise FileNotFoundError(f"--adapter {model_cfg.adapter} is not a folder")
    if task_cfg.gguf is not None:
        path = Path(task_cfg.gguf)
        if not path.is_file():
            raise FileNotFoundError(f"--gguf {task_cfg.gguf} is not a file")
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError(f"--gguf {task_cfg.gguf} is not a GGUF file (it does not start with 'GGUF')")
        if importlib.util.find_spec("llama_cpp") is None:
            raise ModuleNotFoundError(
                "--gguf scores the file through llama.cpp, which needs llama-cpp-python: pip install llama-cpp-python"
            )


def stop_ids(source: Any) -> list[int]:
    """The EOS ids HF's `generate` stops at for this model: its generation config's (a GGUF file: its EOS id)."""
    from quickloris.models.loading import gguf_special_token_ids

    if source.is_gguf:
        ids = gguf_special_token_ids(source.path)
        return [ids["eos"]] if "eos" in ids else []
    from transformers import AutoConfig, GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(str(source.folder))
    except OSError:  # no generation_config.json: transformers derives it from config.json
        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(source.folder)))
    eos = gen.eos_token_id
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in (eos or [])]


@contextlib.contextmanager
def lora_off(model: Any):
    """The NF4 base alone: every LoRA B matrix zero (the LoRA term is then exactly 0), restored afterwards."""
    from quickloris.models.adapters import lora_layers

    saved = []
    with torch.no_grad():
        for layer in lora_layers(model).values():
            b = layer.lora_weights[1]
            saved.append((b, b.detach().clone()))
            b.zero_()
    try:
        yield model
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: list,
    eval_cfg: EvalConfig,
    chat_template: str | None,
    label: str,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """Exact-match accuracy of `model` on `examples` (the tool task: call and final answer accuracy,
    `quickloris.train.tool_eval`); prints it with a few replies."""
    from quickloris.train.exact_match import evaluate_exact_match, generate_replies
    from quickloris.train.tool_eval import echo_eval, evaluate_tool_calls, is_tool_task

    # prepare_model turns the KV cache off for training; generation needs it (else every token re-reads the prompt).
    use_cache = model.config.use_cache
    model.config.use_cache = True
    try:
        with eager_regions():
            if is_tool_task(examples):
                result = evaluate_tool_calls(
                    lambda prompts, tools, n: generate_replies(
                        model,
                        tokenizer,
                        prompts,
                        max_new_tokens=n,
                        batch_size=eval_cfg.eval_batch_size,
                        chat_template=chat_template,
                        tools=tools,
                    ),
                    tokenizer,
                    examples,
                    chat_template=chat_template,
                    max_new_tokens=eval_cfg.max_new_tokens,
                    num_samples=3,
                )
            else:
                result = evaluate_exact_match(
                    model,
                    tokenizer,
                    examples,
                    batch_size=eval_cfg.eval_batch_size,
                    max_new_tokens=eval_cfg.max_new_tokens,
                    chat_template=chat_template,
                    num_samples=3,
                )
    finally:
        model.config.use_cache = use_cache
    echo_eval(echo, label, result.to_dict())
    return result.to_dict()


def _evaluate_tools_gguf(
    gguf: str,
    tokenizer: Any,
    examples: list,
    stops: list[int],
    max_new_tokens: int | None,
    chat_template: str | None,
    threads: int,
) -> tuple[Any, int]:
    """The tool task's scores of a GGUF file through llama.cpp (`quickloris.train.tool_eval`), and how many prompts
    llama.cpp's tokenizer splits differently."""
    from quickloris.train.exact_match import generate_replies_gguf
    from quickloris.train.tool_eval import evaluate_tool_calls

    retokenized = 0

    def generate(prompts: list, tools: list, n: int) -> list[str]:
        nonlocal retokenized
        replies, again = generate_replies_gguf(
            gguf,
            tokenizer,
            prompts,
            max_new_tokens=n,
            stop_ids=stops,
            chat_template=chat_template,
            threads=threads,
            tools=tools,
        )
        retokenized = max(retokenized, again)
        return replies

    result = evaluate_tool_calls(
        generate, tokenizer, examples, chat_template=chat_template, max_new_tokens=max_new_tokens, num_samples=3
    )
    return result, retokenized


def run_eval(
    model_cfg: ModelConfig,
    task_cfg: EvalTaskConfig,
    eval_cfg: EvalConfig,
    vision_cfg: Any = None,
    *,
    echo: Callable[[str], None] = lambda m: print(m, flush=True),
) -> dict[str, Any]:
    """Score the model and/or the --gguf file; returns the result as a dict (also written to ``--output``).

    One model scored: its result. Several (``--gguf`` with ``--adapter`` or ``--nf4``): the main one's result (the
    adapter's, else the model's) plus ``rows``, each row's result, also printed as one table. A classifier
    (``--task-type classification``) is scored by `quickloris.train.classify.run_eval_classification`; a
    vision-language model (`vision_cfg`: `quickloris.train.vision.VisionConfig`) on --eval-data or --visual-task,
    through `quickloris.train.vision_eval`."""
    if model_cfg.task_type == "classification":
        from quickloris.train.classify import run_eval_classification

        quantization = run_quantization(model_cfg.adapter) if model_cfg.adapter is not None else None
        return run_eval_classification(model_cfg, task_cfg, eval_cfg, quantization=quantization, echo=echo)
    from quickloris.data.chat import tool_task_template
    from quickloris.data.config import read_chat_template, task_name
    from quickloris.data.tasks import get_task
    from quickloris.data.tool_task import TOOLS_TASK
    from quickloris.models.adapter_base import check_adapter_fits, folder_parameter_shapes, model_parameter_shapes
    from quickloris.models.loading import load_model, load_tokenizer, resolve_model
    from quickloris.models.prepare import QLoRAConfig, prepare_model
    from quickloris.train.exact_match import evaluate_exact_match_gguf
    from quickloris.train.tool_eval import echo_eval
    from quickloris.train.vision import (
        VisionConfig,
        check_vision_eval,
        evaluate_run,
        is_vision_source,
        load_vision_model,
        load_vision_parts,
    )
    from quickloris.train.vision_eval import vision_problems
    from quickloris.utils.atomic import atomic_write_json

    check_eval_options(model_cfg, task_cfg)
    vision_cfg = vision_cfg or VisionConfig()
    adapter, gguf = model_cfg.adapter, task_cfg.gguf
    device = resolve_device(model_cfg)
    dtype = resolve_dtype(model_cfg, device)
    threads, why = resolve_threads(model_cfg)
    if device.type == "cpu" or model_cfg.threads is not None:
        torch.set_num_threads(threads)
    source = resolve_model(model_cfg.model)
    vision = is_vision_source(source)
    check_vision_eval(vision, model_cfg, task_cfg, eval_cfg, vision_cfg)
    if adapter is not None and not source.is_gguf:
        check_adapter_fits(adapter, folder_parameter_shapes(source.folder), model=str(source.path))
    task = None
    if vision:
        task_args = (vision_cfg.visual_task, task_cfg.num_eval, task_cfg.seed, vision_cfg.image_task_size)
        examples, what = vision_problems(eval_cfg.eval_data, *task_args)
        what += f" (seed {task_cfg.seed})" if eval_cfg.eval_data is None else ""
    elif eval_cfg.eval_data is not None:
        examples, what = load_eval_examples(eval_cfg.eval_data), f"--eval-data {eval_cfg.eval_data}"
    else:
        task = get_task(task_name(EvalTaskConfig, task_cfg.task, "causal_lm"))
        examples = task.generate("heldout", task_cfg.num_eval, task_cfg.seed)
        what = f"{len(examples)} held-out problems of task {task.name!r} (seed {task_cfg.seed})"
    chat_template = read_chat_template(task_cfg.chat_template)
    tool_task = eval_cfg.eval_data is None and task is TOOLS_TASK
    nf4 = task_cfg.nf4 if task_cfg.nf4 is not None else adapter is not None
    score_model = gguf is None or adapter is not None or task_cfg.nf4 is not None
    described = (
        f"model: {source.describe()}"
        + (f" + adapter {adapter}" if adapter else "")
        + (", NF4 base" if nf4 and score_model else "")
        + f"; device {device}"
    )
    if gguf is not None:
        described += f"; GGUF file {gguf} (llama.cpp)" + ("" if score_model else "; the model itself is not scored")
    echo(described + (f", {why}" if device.type == "cpu" or gguf is not None else ""))
    echo(f"eval: {what}")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(source)
    if vision:
        processing, chat_template = load_vision_parts(source, tokenizer, chat_template)
    if tool_task:  # the model's template when it renders tools, else quickloris' ChatML tool template
        chat_template, note = tool_task_template(tokenizer, chat_template)
        if note:
            echo(f"note: {note}")
    rows: list[tuple[str, str, dict[str, Any]]] = []
    if score_model:
        model = (load_vision_model if vision else load_model)(source, dtype=dtype, device=device)
        if adapter is not None:
            if source.is_gguf:
                check_adapter_fits(adapter, model_parameter_shapes(model), model=str(source.path))
            prepare_model(model, run_quantization(adapter), adapter=adapter)  # a vision-LoRA adapter included
        elif nf4:
            prepare_model(model, QLoRAConfig(chunked_loss=False))  # LoRA B = 0: exactly the NF4 base
        model.eval()
        echo(f"loaded in {time.perf_counter() - t0:.1f} s")

        def score(label: str) -> dict[str, Any]:
            if vision:
                return evaluate_run(model, processing, examples, chat_template, vision_cfg, eval_cfg, label, echo)
            return evaluate(model, tokenizer, examples, eval_cfg, chat_template, label, echo)

        table = gguf is not None
        if adapter is not None and table:
            with lora_off(model):
                rows.append(("before", "NF4 base", score("before")))
        label = ("after" if adapter is not None else "model") if table else ""
        name = f"NF4 base + adapter {adapter}" if adapter else ("NF4 base" if nf4 else f"{source.path.name}")
        rows.append((label or "model", name, score(label)))
        del model
    if gguf is not None:
        if tool_task:
            result, retokenized = _evaluate_tools_gguf(
                gguf, tokenizer, examples, stop_ids(source), eval_cfg.max_new_tokens, chat_template, threads
            )
        else:
            result, retokenized = evaluate_exact_match_gguf(
                gguf,
                tokenizer,
                examples,
                stop_ids=stop_ids(source),
                max_new_tokens=eval_cfg.max_new_tokens,
                num_samples=3,
                chat_template=chat_template,
                threads=threads,
            )
        if retokenized:
            echo(
                f"note: llama.cpp's tokenizer in {gguf} splits {retokenized} of {len(examples)} prompts differently "
                f"from the tokenizer of --model {source.path}; scored from --model's tokens (another model's file?)"
            )
        rows.append(("exported", f"{gguf} (llama.cpp)", result.to_dict()))
        echo_eval(echo, "exported", rows[-1][2])
    if len(rows) > 1:
        width = max(len(name) for _, name, _ in rows)
        echo(f"{'tool call / final answer' if tool_task else 'exact match'} on {what}:")
        for label, name, r in rows:
            if tool_task:
                score = f"{100 * r['call_accuracy']:5.1f}% / {100 * r['answer_accuracy']:5.1f}%"
                counts = f"{r['call_correct']} / {r['answer_correct']} of {r['total']}"
                echo(f"  {label:9s} {name:<{width}}  {score}  ({counts})")
            else:
                echo(f"  {label:9s} {name:<{width}}  {100 * r['accuracy']:5.1f}%  ({r['correct']}/{r['total']})")
    main = next(r for label, _, r in rows if label in ("after", "model")) if score_model else rows[-1][2]
    out = {
        "model": str(source.path),
        "adapter": adapter,
        "nf4": nf4 if score_model else None,
        "gguf": gguf,
        "eval": what,
        **main,
    }
    if len(rows) > 1:
        out["rows"] = [{"row": label, "what": name, **r} for label, name, r in rows]
    if task_cfg.output is not None:
        atomic_write_json(task_cfg.output, out)
        echo(f"result written to {task_cfg.output}")
    return out
