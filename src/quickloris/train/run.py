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

`_run_train` composes the steps, one module each: `quickloris.train.setup` (1-2), `quickloris.train.rundata` (3),
`quickloris.train.build` (4), `quickloris.train.session` (5, after the folder is claimed and config.json written
here) and `quickloris.train.summary` (the closing lines).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quickloris.data.config import DataConfig
from quickloris.models.prepare import QLoRAConfig
from quickloris.train.build import build_run_model, fingerprint  # noqa: F401 - fingerprint re-exported
from quickloris.train.config import EvalConfig, ModelConfig, TrainConfig
from quickloris.train.evaluation import evaluate  # noqa: F401 - re-exported
from quickloris.train.loop import LoopState
from quickloris.train.rundata import prepare_run_data
from quickloris.train.rundir import claim
from quickloris.train.session import train_and_score
from quickloris.train.setup import resolve_run
from quickloris.train.summary import print_summary
from quickloris.utils.atomic import atomic_write_json


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    state: LoopState
    metrics: dict[str, Any]


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
    started = time.perf_counter()
    setup = resolve_run(model_cfg, data_cfg, qlora_cfg, train_cfg, eval_cfg, fsdp_opts, vision_cfg, echo)
    data = prepare_run_data(setup, model_cfg, data_cfg, train_cfg, eval_cfg)
    built = build_run_model(setup, data, model_cfg, data_cfg, qlora_cfg, train_cfg)
    if setup.main:
        claim(train_cfg, setup.protected, setup.echo)  # the marker is the run's first file
        _write_config(
            setup.out, model_cfg, data_cfg, built.qlora_cfg, train_cfg, eval_cfg, built.resolved, data.prepared
        )
    state, adapter_dir, metrics = train_and_score(
        setup, data, built, data_cfg, train_cfg, eval_cfg, on_step_end, started
    )
    if setup.main:
        print_summary(setup.echo, metrics, setup.out, adapter_dir, setup.device)
    return TrainResult(setup.out, adapter_dir, state, metrics)


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
