"""`quickloris train` as one call: load, prepare, evaluate, train, save, evaluate again.

`run_train` does, in this order (checks first, so bad input fails before a model is loaded or a file written):

1. resolve the device, dtype and CPU threads, compile and activation checkpointing (unset: on with a GPU);
2. find the model (`quickloris.models.loading.resolve_model`) and check, from files only: the output folder
   (`quickloris.train.rundir.check_output_dir`), the input files, the architecture, --target-modules, the
   tokenizer files and --max-seq-len (`quickloris.train.runtime.check_inputs`); read --eval-data;
3. load the tokenizer, tokenize the data (`quickloris.data.config.prepare_data`: line-numbered format errors, a
   dataset with nothing to train on);
4. load the model and make it trainable (`quickloris.parallel.compose.build_training_model`: NF4 + LoRA, activation
   checkpointing, regional compile), AdamW on the LoRA matrices; with --resume restore the newest intact
   checkpoint (`quickloris.train.checkpoint.resumable_checkpoint`; its options and data must match);
5. claim the output folder (`quickloris.train.rundir.claim`: the marker is the first file written), write
   config.json, score the held-out problems (before), run `quickloris.train.loop.train_loop` with a checkpoint
   (+ metrics.json and loss.png) every --save-every steps, save the adapter (PEFT format) under ``adapter/``,
   score again (after), write metrics.json and loss.png.

With ``--task-type classification`` the model is the source's sequence classifier (`quickloris.models.
classification`: its decoder, a score head seeded with --seed), the data ``{"text", "label"}`` rows (label set read
from them; `quickloris.data.config.prepare_classification_data`), the loop's objective `quickloris.train.classify.
Classification` (with --class-weights), and evaluation accuracy + macro-F1 on the held-out texts; the adapter folder
also holds the score head (PEFT ``modules_to_save``) and the class names.

A diverging run (`TrainingDiverged`) and Ctrl-C (`TrainingInterrupted`) still write metrics.json and loss.png up
to the step where they stopped. Resuming with a larger --max-steps (or --epochs) extends a run: the remaining steps
follow the learning-rate schedule of the new length (the steps done keep the old schedule's), so an extended run
equals a run started with the new length only where the schedule does not depend on it (--lr-schedule constant,
or steps still in warm-up). Evaluation happens on the model being trained (NF4 base + LoRA), with compiled regions
run eagerly.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quickloris.config import ConfigError, flatten
from quickloris.data.config import (
    DataConfig,
    PreparedData,
    prepare_classification_data,
    prepare_data,
    read_chat_template,
    task_name,
)
from quickloris.models.prepare import QLoRAConfig
from quickloris.train.config import EvalConfig, ModelConfig, TrainConfig
from quickloris.train.loop import LoopState, TrainingDiverged, TrainingInterrupted, total_steps, train_loop
from quickloris.train.report import jsonable
from quickloris.train.rundir import ADAPTER_DIR, check_output_dir, claim
from quickloris.train.runtime import (
    check_inputs,
    check_max_seq_len_option,
    cpu_cores,
    eager_regions,
    load_average,
    load_eval_examples,
    max_position_embeddings,
    resolve_device,
    resolve_dtype,
    resolve_threads,
)
from quickloris.utils.atomic import atomic_write_json


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    state: LoopState
    metrics: dict[str, Any]


def fingerprint(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    qlora_cfg: QLoRAConfig,
    train_cfg: TrainConfig,
    dtype: torch.dtype,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every option that changes what a run computes (the fields declared ``fingerprint=True``), and the data's
    own fingerprint (`quickloris.train.checkpoint.data_fingerprint`): compared when resuming."""
    fp: dict[str, Any] = {"model": model_cfg.model, "adapter": model_cfg.adapter, "dtype": str(dtype)}
    for name, cfg in (("data", data_cfg), ("qlora", qlora_cfg), ("train", train_cfg)):
        fp.update({f"{name}.{k}": v for k, v in flatten(cfg, compared_only=True).items()})
    if model_cfg.task_type != "causal_lm":  # only then: checkpoints of causal runs keep their fingerprint
        fp.update({"task_type": model_cfg.task_type, "train.class_weights": train_cfg.class_weights})
    fp.update(data or {})
    return jsonable(fp)


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


def _eval_examples(data_cfg: DataConfig, eval_cfg: EvalConfig, prepared: PreparedData | None, preloaded: list | None):
    if preloaded is not None:
        return preloaded, f"--eval-data {eval_cfg.eval_data}"
    if data_cfg.data is None and prepared is not None:
        task = task_name(DataConfig, data_cfg.task, "causal_lm")
        return prepared.eval_examples, f"{len(prepared.eval_examples)} held-out problems of task {task!r}"
    return None, "no evaluation: training on --data without --eval-data"


def run_train(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    qlora_cfg: QLoRAConfig,
    train_cfg: TrainConfig,
    eval_cfg: EvalConfig,
    fsdp_opts: Any = None,
    vision_cfg: Any = None,
    *,
    on_step_end: Callable[[LoopState], None] | None = None,
    echo: Callable[[str], None] = lambda m: print(m, flush=True),
) -> TrainResult:
    """Fine-tune as configured and write the run folder (see the module docstring).

    `fsdp_opts` (`quickloris.parallel.fsdp.FSDPOptions` with ``fsdp=True``, under torchrun): the model is sharded
    with FSDP2 after checkpointing and before compile, each rank takes its rows of every micro-batch
    (`train_loop`'s ``dist``), rank 0 alone prints and writes files, the adapter is gathered from the shards.
    Resumable checkpoints are not written for a sharded run (--resume is refused). A process group this call
    started is ended before it returns or raises (one a caller started is left to the caller).
    """
    import torch.distributed as dist

    owned = (
        fsdp_opts is not None and fsdp_opts.sharding() is not None and dist.is_available() and not dist.is_initialized()
    )
    try:
        result = _run_train(
            model_cfg,
            data_cfg,
            qlora_cfg,
            train_cfg,
            eval_cfg,
            fsdp_opts,
            vision_cfg,
            on_step_end=on_step_end,
            echo=echo,
        )
        if owned and dist.is_initialized():
            dist.barrier()  # every rank done with its collectives before any tears the group down
        return result
    finally:
        # A gloo group left to the interpreter's exit can abort the process ("terminate called without an
        # active exception") when the other rank has already gone: end it here, on every path.
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def _run_train(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    qlora_cfg: QLoRAConfig,
    train_cfg: TrainConfig,
    eval_cfg: EvalConfig,
    fsdp_opts: Any,
    vision_cfg: Any,
    *,
    on_step_end: Callable[[LoopState], None] | None,
    echo: Callable[[str], None],
) -> TrainResult:
    from quickloris.models.adapters import save_adapter
    from quickloris.models.loading import load_model, load_tokenizer, max_positions, resolve_model
    from quickloris.models.prepare import qlora_config
    from quickloris.parallel.compose import build_training_model
    from quickloris.train.checkpoint import (
        checkpoint_step,
        data_fingerprint,
        load_checkpoint,
        resumable_checkpoint,
        save_checkpoint,
    )
    from quickloris.train.report import plot_loss, write_metrics

    started = time.perf_counter()
    out = Path(train_cfg.output_dir)
    device = resolve_device(model_cfg)
    sharding = fsdp_opts.sharding() if fsdp_opts is not None else None
    ctx = None
    if sharding is not None:
        from quickloris.parallel.fsdp import init_distributed

        if train_cfg.resume:
            raise ValueError("--resume with --fsdp: a sharded run writes no resumable checkpoint yet")
        ctx = init_distributed(device.type)
        device = ctx.device
        if not ctx.is_main:
            echo = lambda m: None  # noqa: E731 - one rank reports
    main = ctx is None or ctx.is_main
    classify = model_cfg.task_type == "classification"
    if not classify and train_cfg.class_weights != "none":
        raise ConfigError(
            TrainConfig,
            "class_weights",
            "weighs the classes of --task-type classification; this run trains a causal LM",
        )
    dtype = resolve_dtype(model_cfg, device)
    threads, why = resolve_threads(model_cfg)
    if device.type == "cpu" or model_cfg.threads is not None:
        torch.set_num_threads(threads)
    compile_cfg = train_cfg.compile.resolved(device.type)
    checkpoint_cfg = train_cfg.checkpointing.resolved(device.type)

    try:
        source = resolve_model(model_cfg.model)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(ModelConfig, "model", f": {e}") from None
    protected = {"model": source.path, "adapter": model_cfg.adapter}
    has_run = check_output_dir(train_cfg, protected)
    ckpt = None
    if train_cfg.resume and has_run:
        ckpt = resumable_checkpoint(out, echo)
        if ckpt is None:
            raise ConfigError(
                TrainConfig,
                "resume",
                f": {str(out)!r} holds a run without a checkpoint to continue from; start over with {{overwrite}}",
                ("overwrite",),
            )
    elif train_cfg.resume:
        echo(f"--resume: no run to continue in {out}, starting from step 0")
    limit = max_position_embeddings(source)
    # ---- vision-language models (quickloris.train.vision) ----
    from quickloris.train import vision as vlm

    vision = vlm.is_vision_source(source)
    vlm.check_vision_run(vision, model_cfg, data_cfg, eval_cfg, fsdp_opts, vision_cfg, qlora_cfg)
    vision_cfg = vision_cfg or vlm.VisionConfig()
    limit = vlm.text_limit(source) if vision else limit
    # ----
    check_inputs(source, model_cfg, data_cfg, qlora_cfg, eval_cfg, limit)
    echo(
        f"device: {device} ({str(dtype).replace('torch.', '')})"
        + (f", {why}" if device.type == "cpu" else "")
        + f", compile {'on' if compile_cfg.enabled else 'off'}, gradient checkpointing "
        + ("on" if checkpoint_cfg.gradient_checkpointing else "off")
    )
    preloaded = None
    if eval_cfg.eval_data is not None and not classify and not vision:  # a VLM's: read with its images, below
        from quickloris.data.shapes import parse_columns

        preloaded = load_eval_examples(eval_cfg.eval_data, parse_columns(data_cfg.data_columns))
    chat_template = read_chat_template(data_cfg.chat_template)
    echo(f"model: {source.describe()}")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(source)
    if classify:
        from quickloris.train.classify import Classification, resolve_class_weights, tokenize_eval_rows

        prepared = prepare_classification_data(
            data_cfg, tokenizer, seed=train_cfg.seed, eval_data=eval_cfg.eval_data, max_position_embeddings=limit
        )
        weights = resolve_class_weights(train_cfg.class_weights, prepared.labels, prepared.examples)
        _check_adapter_labels(model_cfg, prepared.labels)
        examples_eval = tokenize_eval_rows(tokenizer, prepared.eval_rows, prepared.labels, limit)
        eval_what = prepared.eval_source
    elif vision:
        processing, chat_template = vlm.load_vision_parts(source, tokenizer, chat_template)
        prepared, examples_eval, eval_what = vlm.prepare_vision_data(
            data_cfg, vision_cfg, eval_cfg, processing, chat_template, train_cfg.seed
        )
    else:
        prepared = prepare_data(
            data_cfg,
            tokenizer,
            seed=train_cfg.seed,
            max_position_embeddings=limit,
            progress=None if train_cfg.progress else False,
        )
        examples_eval, eval_what = _eval_examples(data_cfg, eval_cfg, prepared, preloaded)
        chat_template = prepared.chat_template  # --task tools may bring quickloris' tool template
        for note in prepared.notes:
            echo(f"note: {note}")
    st = prepared.stats
    if classify:
        echo(
            f"data: {prepared.source}: {st.kept} texts, labels {', '.join(prepared.labels)} ({st.dropped_too_long} "
            f"longer than --max-seq-len dropped), {st.tokens} tokens, longest {st.longest}"
            + (", packed" if data_cfg.packing else "")
        )
    else:
        echo(prepared.header(packing=data_cfg.packing))
    if classify and weights is not None:
        echo("class weights: " + ", ".join(f"{n} {w:.4g}" for n, w in zip(prepared.labels, weights)))
    echo(f"eval: {eval_what}")
    total = total_steps(prepared.examples, train_cfg, packing=data_cfg.packing, max_seq_len=data_cfg.max_seq_len)
    if ckpt is not None and total < checkpoint_step(ckpt):
        raise ConfigError(
            TrainConfig,
            "max_steps",
            f"gives {total} steps, fewer than the {checkpoint_step(ckpt)} the resumed run has done already",
        )

    if classify:
        from quickloris.models.classification import load_classifier

        model = load_classifier(
            source,
            prepared.labels,
            pad_token_id=tokenizer.pad_token_id,
            seed=train_cfg.seed,
            dtype=dtype,
            device=device,
        )
    else:
        model = (
            vlm.load_vision_model(source, dtype=dtype, device=device)
            if vision
            else load_model(source, dtype=dtype, device=device)
        )
    check_max_seq_len_option(data_cfg, limit if vision else max_positions(model.config))
    torch.manual_seed(train_cfg.seed)  # the LoRA initialisation
    model = build_training_model(
        model,
        qlora_cfg,
        adapter=model_cfg.adapter,
        checkpointing=checkpoint_cfg,
        compile=compile_cfg,
        sharding=sharding,
        mesh=ctx.mesh if ctx is not None else None,
    )
    if ctx is not None:
        from torch.distributed.fsdp import register_fsdp_forward_method

        from quickloris.parallel.fsdp import sharding_summary

        if not classify:  # a classifier's evaluation calls forward, which FSDP2 hooks already
            register_fsdp_forward_method(model, "generate")  # evaluation generates on all ranks, in step
        plan = sharding_summary(model)
        echo(
            f"FSDP2 over {ctx.world_size} ranks: {plan['nf4_sharded']} NF4 weights sharded, "
            f"{len(plan['nf4_replicated'])} replicated (not splittable on whole 16384-value groups)"
        )
    qlora_cfg = qlora_config(model)  # with --adapter: rank, alpha and targets come from the adapter
    if classify:
        from quickloris.models.classification import set_class_weights

        set_class_weights(model, weights)
    params = [p for p in model.parameters() if p.requires_grad]
    echo(
        f"loaded and prepared in {time.perf_counter() - t0:.1f} s: {sum(p.numel() for p in params):,} trainable "
        f"{'LoRA + score head' if classify else 'LoRA'} parameters (r={qlora_cfg.r}, alpha="
        f"{qlora_cfg.lora_alpha:g}, {','.join(qlora_cfg.target_modules)})"
    )
    optimizer = torch.optim.AdamW(
        params, lr=train_cfg.lr, betas=tuple(train_cfg.adam_betas), weight_decay=train_cfg.weight_decay
    )
    fp = fingerprint(
        model_cfg, data_cfg, qlora_cfg, train_cfg, dtype, data_fingerprint(prepared.examples, data_cfg.data)
    )
    state = LoopState()
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, fp)
        echo(f"resumed from {ckpt} (step {state.step} of {state.total_steps})")
        if total != state.total_steps and total >= state.step:
            echo(
                f"the run now has {total} steps instead of {state.total_steps}: steps {state.step + 1}-{total} follow "
                f"the learning-rate schedule of {total} steps (steps 1-{state.step} followed the {state.total_steps}-"
                "step one)"
            )
    resolved = {
        "device": str(device),
        "dtype": str(dtype),
        "threads": threads if device.type == "cpu" else None,
        "compile": compile_cfg.enabled,
        "gradient_checkpointing": checkpoint_cfg.gradient_checkpointing,
        "model_format": source.format,
        "model_path": str(source.path),
        "max_position_embeddings": max_positions(model.config),
    }
    if classify:
        resolved.update(task_type="classification", labels=prepared.labels, class_weights=weights)
    elif prepared.template_file is not None:  # `quickloris export gguf --adapter` stores this template
        resolved["chat_template"] = prepared.template_file
    if ctx is not None:
        resolved["fsdp"] = {**plan, "rank_devices": f"{ctx.world_size} x {device.type}"}
    if main:
        claim(train_cfg, protected, echo)
        _write_config(out, model_cfg, data_cfg, qlora_cfg, train_cfg, eval_cfg, resolved, prepared)
    title = f"{source.path.name}: {prepared.source}"
    last = {"checkpoint": ckpt.name if ckpt is not None else None}

    def write_reports(st: LoopState, diverged: TrainingDiverged | None = None, **extra: Any) -> dict[str, Any]:
        if not main:
            return {}
        if diverged is not None:
            extra["diverged"] = {"step": diverged.step, "what": diverged.what, "value": str(diverged.value)}
        plot_loss(
            st.history,
            out / "loss.png",
            title=title,
            evals=st.evals,
            diverged_at=diverged.step if diverged is not None else None,
        )
        return write_metrics(
            out / "metrics.json",
            st.history,
            st.elapsed,
            st.evals,
            {"resolved": resolved, "total_steps": st.total_steps, **extra},
        )

    def after_step(st: LoopState) -> None:
        if train_cfg.save_every and st.step % train_cfg.save_every == 0 and st.step < st.total_steps:
            if ctx is None:
                last["checkpoint"] = save_checkpoint(out, model, optimizer, st, fp).name
            write_reports(st)
        if on_step_end is not None:
            on_step_end(st)

    def score(label: str) -> dict[str, Any]:
        if vision:
            return vlm.evaluate_run(model, processing, examples_eval, chat_template, vision_cfg, eval_cfg, label, echo)
        if not classify:
            return evaluate(model, tokenizer, examples_eval, eval_cfg, chat_template, label, echo)
        from quickloris.train.classify import evaluate_classification

        return evaluate_classification(
            model,
            examples_eval,
            [r.text for r in prepared.eval_rows],
            prepared.labels,
            batch_size=eval_cfg.eval_batch_size,
            pad_token_id=tokenizer.pad_token_id,
            label=label,
            echo=echo,
        )

    try:
        if train_cfg.eval_before and examples_eval and state.step == 0 and "before" not in state.evals:
            state.evals["before"] = score("before")
        state = train_loop(
            model,
            prepared.examples,
            train_cfg,
            optimizer=optimizer,
            pad_token_id=tokenizer.pad_token_id,
            packing=data_cfg.packing,
            max_seq_len=data_cfg.max_seq_len,
            state=state,
            device=device,
            on_step_end=after_step,
            dist=ctx,
            objective=Classification()
            if classify
            else vlm.VisionCausalLM(processing, vision_cfg.image_max_size)
            if vision
            else None,
        )
        if ctx is None:
            last["checkpoint"] = save_checkpoint(out, model, optimizer, state, fp).name
        adapter_dir = save_adapter(model, out / ADAPTER_DIR)  # sharded: every rank gathers, rank 0 writes
    except TrainingDiverged as e:  # under FSDP every rank is here, at the same step (the loop's checks)
        e.checkpoint = last["checkpoint"]
        write_reports(state, e, wall_seconds=round(time.perf_counter() - started, 1))
        if ctx is not None:  # a rank that exits first makes the launcher stop the others: rank 0 has written
            torch.distributed.barrier()
            e.reported_elsewhere = not main  # rank 0 says it
        raise
    except KeyboardInterrupt:
        try:
            write_reports(state)
        except (Exception, KeyboardInterrupt):  # noqa: BLE001 - a second Ctrl-C, or a failure: the message first
            pass
        raise TrainingInterrupted(state.step, last["checkpoint"]) from None
    if train_cfg.eval_after and examples_eval:
        state.evals["after"] = score("after")
    metrics = write_reports(state, wall_seconds=round(time.perf_counter() - started, 1))
    if not main:
        return TrainResult(out, adapter_dir, state, metrics)
    _print_summary(echo, metrics, out, adapter_dir)
    load = load_average()
    echo(
        f"done in {metrics['wall_seconds']:.0f} s"
        + (
            f" (load average now {load:.2f} on {cpu_cores()} cores)"
            if device.type == "cpu" and load is not None
            else ""
        )
    )
    return TrainResult(out, adapter_dir, state, metrics)


def _check_adapter_labels(model_cfg: ModelConfig, labels: list[str]) -> None:
    """A classification run started from --adapter: the adapter's classes must be the data's."""
    if model_cfg.adapter is None:
        return
    from quickloris.models.adapters import read_labels

    try:
        theirs = read_labels(model_cfg.adapter)
    except FileNotFoundError as e:
        raise ConfigError(ModelConfig, "adapter", f": {e}") from None
    if theirs != labels:
        raise ConfigError(
            ModelConfig,
            "adapter",
            f"{model_cfg.adapter!r} classifies {', '.join(theirs)}, but the data's labels are {', '.join(labels)}",
        )


def _write_config(out: Path, model_cfg, data_cfg, qlora_cfg, train_cfg, eval_cfg, resolved, prepared) -> None:
    from quickloris.utils.provenance import environment

    stats = dataclasses.asdict(prepared.stats)
    stats["dropped_sources"] = stats["dropped_sources"][:20]
    if getattr(prepared, "described", ""):  # causal LM data: what was read, rows per shape, empty rows dropped
        stats.update(read=prepared.described, shapes=prepared.shapes, dropped_empty=prepared.dropped_empty)
    atomic_write_json(
        out / "config.json",
        {
            "model": dataclasses.asdict(model_cfg),
            "data": dataclasses.asdict(data_cfg),
            "qlora": dataclasses.asdict(qlora_cfg),
            "train": dataclasses.asdict(train_cfg),
            "eval": dataclasses.asdict(eval_cfg),
            "resolved": resolved,
            "data_stats": stats,
            "environment": environment(),
        },
    )


def _print_summary(echo: Callable[[str], None], metrics: dict[str, Any], out: Path, adapter_dir: Path) -> None:
    s = metrics["summary"]
    if s.get("loss_first") is not None:
        echo(
            f"loss: {s['loss_first']:.4f} -> {s['loss_last']:.4f} (mean of the first / last {s['loss_window']} "
            f"steps), {s['steps']} steps in {s['train_seconds']:.0f} s, {s['tokens_per_s']:.0f} tokens/s, "
            f"peak memory {s['peak_memory_gib']:.2f} GiB"
        )
    ev = metrics["eval"]
    if ev and all("macro_f1" in v for v in ev.values()):
        echo(
            "accuracy / macro-F1: "
            + ", ".join(
                f"{k} {100 * v['accuracy']:.1f}% / {100 * v['macro_f1']:.1f}% ({v['correct']}/{v['total']})"
                for k, v in ev.items()
            )
        )
    elif ev and all("call_accuracy" in v for v in ev.values()):
        echo(
            "tool call / final answer: "
            + ", ".join(
                f"{k} {100 * v['call_accuracy']:.1f}% / {100 * v['answer_accuracy']:.1f}% ({v['call_correct']} / "
                f"{v['answer_correct']} of {v['total']})"
                for k, v in ev.items()
            )
        )
    elif ev:
        echo(
            "exact match: "
            + ", ".join(f"{k} {100 * v['accuracy']:.1f}% ({v['correct']}/{v['total']})" for k, v in ev.items())
        )
    echo(f"adapter (PEFT format): {adapter_dir}")
    echo(f"loss plot: {out / 'loss.png'}   metrics: {out / 'metrics.json'}   config: {out / 'config.json'}")
