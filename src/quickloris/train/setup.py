"""Steps 1-2 of `quickloris.train.run.run_train`: what the run is, checked from options and files alone.

`resolve_run` resolves the device (with --fsdp: joins the process group; only rank 0 reports), dtype and CPU
threads, compile and activation checkpointing (unset: on with a GPU), finds the model and checks the output folder
(`quickloris.train.rundir.check_output_dir`), what --resume continues from, the vision options and the input files
(`quickloris.train.runtime.check_inputs`). Nothing is loaded and nothing written yet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quickloris.config import ConfigError
from quickloris.data.config import DataConfig
from quickloris.models.prepare import QLoRAConfig
from quickloris.train.config import EvalConfig, ModelConfig, TrainConfig
from quickloris.train.rundir import check_output_dir
from quickloris.train.runtime import (
    check_inputs,
    max_position_embeddings,
    resolve_device,
    resolve_dtype,
    resolve_threads,
)


@dataclass
class RunSetup:
    """What the later steps of a run share: where it writes, on what, from which model (and checkpoint)."""

    out: Path
    device: torch.device
    ctx: Any  # `quickloris.parallel.fsdp.DistContext` of a sharded run, else None
    sharding: Any
    echo: Callable[[str], None]  # silent on every rank but the first
    classify: bool
    vision: bool
    dtype: torch.dtype
    threads: int
    compile_cfg: Any
    checkpoint_cfg: Any
    source: Any
    protected: dict[str, Any]  # folders the run never writes into (`check_output_dir`, `claim`)
    ckpt: Path | None  # the checkpoint --resume continues from
    limit: int | None  # the model's position limit (a VLM: its text model's)
    vision_cfg: Any

    @property
    def main(self) -> bool:
        """Whether this process reports and writes files (rank 0, or the only process)."""
        return self.ctx is None or self.ctx.is_main


def resolve_run(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    qlora_cfg: QLoRAConfig,
    train_cfg: TrainConfig,
    eval_cfg: EvalConfig,
    fsdp_opts: Any,
    vision_cfg: Any,
    echo: Callable[[str], None],
) -> RunSetup:
    """The run's device, dtype, threads, model and output folder, every check that needs no model (see the module
    docstring); prints the device line."""
    from quickloris.models.loading import resolve_model
    from quickloris.train import vision as vlm

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
    ckpt = _resume_from(train_cfg, out, check_output_dir(train_cfg, protected), echo)
    limit = max_position_embeddings(source)
    vision = vlm.is_vision_source(source)
    vlm.check_vision_run(vision, model_cfg, data_cfg, eval_cfg, fsdp_opts, vision_cfg, qlora_cfg)
    vision_cfg = vision_cfg or vlm.VisionConfig()
    limit = vlm.text_limit(source) if vision else limit
    check_inputs(source, model_cfg, data_cfg, qlora_cfg, eval_cfg, limit)
    echo(
        f"device: {device} ({str(dtype).replace('torch.', '')})"
        + (f", {why}" if device.type == "cpu" else "")
        + f", compile {'on' if compile_cfg.enabled else 'off'}, gradient checkpointing "
        + ("on" if checkpoint_cfg.gradient_checkpointing else "off")
    )
    return RunSetup(
        out=out,
        device=device,
        ctx=ctx,
        sharding=sharding,
        echo=echo,
        classify=classify,
        vision=vision,
        dtype=dtype,
        threads=threads,
        compile_cfg=compile_cfg,
        checkpoint_cfg=checkpoint_cfg,
        source=source,
        protected=protected,
        ckpt=ckpt,
        limit=limit,
        vision_cfg=vision_cfg,
    )


def _resume_from(train_cfg: TrainConfig, out: Path, has_run: bool, echo: Callable[[str], None]) -> Path | None:
    """The newest intact checkpoint of the run in `out` that --resume continues (None: start from step 0)."""
    from quickloris.train.checkpoint import resumable_checkpoint

    if not train_cfg.resume:
        return None
    if not has_run:
        echo(f"--resume: no run to continue in {out}, starting from step 0")
        return None
    ckpt = resumable_checkpoint(out, echo)
    if ckpt is None:
        raise ConfigError(
            TrainConfig,
            "resume",
            f": {str(out)!r} holds a run without a checkpoint to continue from; start over with {{overwrite}}",
            ("overwrite",),
        )
    return ckpt
