"""Step 4 of `quickloris.train.run.run_train`: the model made trainable, its optimizer, and what --resume restores.

`build_run_model` loads the model (a sequence classifier's: its decoder and a score head seeded with --seed; a
VLM's: `quickloris.train.vision`), makes it trainable (`quickloris.parallel.compose.build_training_model`: NF4 +
LoRA, activation checkpointing, FSDP2 sharding, regional compile), builds AdamW on the trainable parameters and,
with --resume, restores the checkpoint (`quickloris.train.checkpoint.load_checkpoint`: its options and data must
match the run's `fingerprint`). It also gathers what the run resolved (config.json's and metrics.json's
``resolved``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from quickloris.config import flatten
from quickloris.data.config import DataConfig
from quickloris.models.prepare import QLoRAConfig
from quickloris.train.config import ModelConfig, TrainConfig
from quickloris.train.loop import LoopState
from quickloris.train.report import jsonable
from quickloris.train.rundata import RunData
from quickloris.train.runtime import check_max_seq_len_option
from quickloris.train.setup import RunSetup


@dataclass
class RunModel:
    """The trainable model of a run and what trains and checkpoints it."""

    model: Any
    optimizer: torch.optim.Optimizer
    qlora_cfg: QLoRAConfig  # as the model has it (with --adapter: rank, alpha and targets of the adapter)
    fingerprint: dict[str, Any]
    state: LoopState  # step 0, or the resumed checkpoint's
    resolved: dict[str, Any]  # what the run resolved: device, dtype, threads, compile, model path...


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


def build_run_model(
    setup: RunSetup,
    data: RunData,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    qlora_cfg: QLoRAConfig,
    train_cfg: TrainConfig,
) -> RunModel:
    """The model loaded and made trainable, AdamW, the resumed state (see the module docstring)."""
    from quickloris.models.loading import load_model, max_positions
    from quickloris.models.prepare import qlora_config
    from quickloris.parallel.compose import build_training_model
    from quickloris.train import vision as vlm
    from quickloris.train.checkpoint import data_fingerprint, load_checkpoint

    echo, ctx, device, dtype = setup.echo, setup.ctx, setup.device, setup.dtype
    classify, prepared = setup.classify, data.prepared
    if classify:
        from quickloris.models.classification import load_classifier

        model = load_classifier(
            setup.source,
            prepared.labels,
            pad_token_id=data.tokenizer.pad_token_id,
            seed=train_cfg.seed,
            dtype=dtype,
            device=device,
        )
    else:
        model = (
            vlm.load_vision_model(setup.source, dtype=dtype, device=device)
            if setup.vision
            else load_model(setup.source, dtype=dtype, device=device)
        )
    check_max_seq_len_option(data_cfg, setup.limit if setup.vision else max_positions(model.config))
    torch.manual_seed(train_cfg.seed)  # the LoRA initialisation
    model = build_training_model(
        model,
        qlora_cfg,
        adapter=model_cfg.adapter,
        checkpointing=setup.checkpoint_cfg,
        compile=setup.compile_cfg,
        sharding=setup.sharding,
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

        set_class_weights(model, data.weights)
    params = [p for p in model.parameters() if p.requires_grad]
    echo(
        f"loaded and prepared in {time.perf_counter() - data.loading_started:.1f} s: "
        f"{sum(p.numel() for p in params):,} trainable "
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
    if setup.ckpt is not None:
        state = load_checkpoint(setup.ckpt, model, optimizer, fp)
        echo(f"resumed from {setup.ckpt} (step {state.step} of {state.total_steps})")
        total = data.total
        if total != state.total_steps and total >= state.step:
            echo(
                f"the run now has {total} steps instead of {state.total_steps}: steps {state.step + 1}-{total} follow "
                f"the learning-rate schedule of {total} steps (steps 1-{state.step} followed the {state.total_steps}-"
                "step one)"
            )
    resolved = {
        "device": str(device),
        "dtype": str(dtype),
        "threads": setup.threads if device.type == "cpu" else None,
        "compile": setup.compile_cfg.enabled,
        "gradient_checkpointing": setup.checkpoint_cfg.gradient_checkpointing,
        "model_format": setup.source.format,
        "model_path": str(setup.source.path),
        "max_position_embeddings": max_positions(model.config),
    }
    if classify:
        resolved.update(task_type="classification", labels=prepared.labels, class_weights=data.weights)
    elif prepared.template_file is not None:  # `quickloris export gguf --adapter` stores this template
        resolved["chat_template"] = prepared.template_file
    if ctx is not None:
        resolved["fsdp"] = {**plan, "rank_devices": f"{ctx.world_size} x {device.type}"}
    return RunModel(model, optimizer, qlora_cfg, fp, state, resolved)
