"""Step 5 of `quickloris.train.run.run_train`, once the output folder is claimed: score, train, save, score again.

`train_and_score` scores the held-out problems (before; not when resuming past step 0), runs
`quickloris.train.loop.train_loop` with a checkpoint (+ metrics.json and loss.png) every --save-every steps, saves
the last checkpoint and the adapter (PEFT format) under ``adapter/``, scores again (after) and writes metrics.json
and loss.png. A diverging run (`TrainingDiverged`) and Ctrl-C (`TrainingInterrupted`) still write metrics.json and
loss.png up to the step where they stopped. Under FSDP2 every rank trains and scores; rank 0 alone writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quickloris.data.config import DataConfig
from quickloris.train.build import RunModel
from quickloris.train.config import EvalConfig, TrainConfig
from quickloris.train.loop import LoopState, TrainingDiverged, TrainingInterrupted, train_loop
from quickloris.train.rundata import RunData
from quickloris.train.rundir import ADAPTER_DIR
from quickloris.train.setup import RunSetup


def train_and_score(
    setup: RunSetup,
    data: RunData,
    built: RunModel,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    eval_cfg: EvalConfig,
    on_step_end: Callable[[LoopState], None] | None,
    started: float,
) -> tuple[LoopState, Path, dict[str, Any]]:
    """(final state, adapter folder, metrics) of the run (see the module docstring); `started` is the run's
    `time.perf_counter()` at its start (metrics.json's ``wall_seconds``)."""
    from quickloris.models.adapters import save_adapter
    from quickloris.train import vision as vlm
    from quickloris.train.checkpoint import save_checkpoint
    from quickloris.train.report import plot_loss, write_metrics

    out, ctx, main, echo = setup.out, setup.ctx, setup.main, setup.echo
    model, optimizer, fp, resolved = built.model, built.optimizer, built.fingerprint, built.resolved
    prepared, tokenizer = data.prepared, data.tokenizer
    title = f"{setup.source.path.name}: {prepared.source}"
    last = {"checkpoint": setup.ckpt.name if setup.ckpt is not None else None}

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
        if setup.vision:
            return vlm.evaluate_run(
                model, data.processing, data.examples_eval, data.chat_template, setup.vision_cfg, eval_cfg, label, echo
            )
        if not setup.classify:
            from quickloris.train.evaluation import evaluate

            return evaluate(model, tokenizer, data.examples_eval, eval_cfg, data.chat_template, label, echo)
        from quickloris.train.classify import evaluate_classification

        return evaluate_classification(
            model,
            data.examples_eval,
            [r.text for r in prepared.eval_rows],
            prepared.labels,
            batch_size=eval_cfg.eval_batch_size,
            pad_token_id=tokenizer.pad_token_id,
            label=label,
            echo=echo,
        )

    state = built.state
    try:
        if train_cfg.eval_before and data.examples_eval and state.step == 0 and "before" not in state.evals:
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
            device=setup.device,
            on_step_end=after_step,
            dist=ctx,
            objective=_objective(setup, data),
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
    if train_cfg.eval_after and data.examples_eval:
        state.evals["after"] = score("after")
    metrics = write_reports(state, wall_seconds=round(time.perf_counter() - started, 1))
    return state, adapter_dir, metrics


def _objective(setup: RunSetup, data: RunData) -> Any:
    """The loop's objective: a classifier's (`quickloris.train.classify.Classification`), a VLM's, else the
    loop's default (the causal LM loss the model computes)."""
    if setup.classify:
        from quickloris.train.classify import Classification

        return Classification()
    if setup.vision:
        from quickloris.train import vision as vlm

        return vlm.VisionCausalLM(data.processing, setup.vision_cfg.image_max_size)
    return None
