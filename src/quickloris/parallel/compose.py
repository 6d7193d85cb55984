"""The training stack, assembled in one place and one order.

    1. quantize + LoRA      `quickloris.models.prepare_model` (NF4 bases, adapters, chunked loss, attention)
    2. checkpointing        `apply_checkpointing` (transformers' per-layer checkpointing, non-reentrant; inputs
                            optionally offloaded to the CPU, MLPs optionally over checkpointed sequence chunks)
    3. sharding             `quickloris.parallel.fsdp.shard_model` (FSDP2: one unit per decoder layer + the root;
                            NF4 bytes sharded and all-gathered as bytes; mixed precision, CPU offload)
    4. compile              `quickloris.parallel.compile.compile_model` (each decoder layer, final norm, loss)

Why this order: LoRA layers must exist before anything wraps or shards the modules; checkpointing is a flag on
each decoder layer (transformers' per-layer wrapper around the layer's *call*); FSDP2's hooks sit on that call
too (its pre-forward all-gather, and a pre-backward all-gather before the layer's backward - and thus before any
recompute); compile comes last so it traces the final, sharded modules (``module.compile`` keeps the FSDP2 hooks
on the call path, each layer's graph sees its gathered parameters); with ``CompileConfig.checkpoint_in_graph`` it
also moves each flagged layer's checkpoint into the layer's compiled graph (`quickloris.parallel.compile`: the
replay runs inside the compiled backward, after FSDP2's pre-backward all-gather).
Steps 2-4 are optional (`None` / disabled configs).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import warnings
from typing import TYPE_CHECKING, Any

from torch import nn

from quickloris.config import Config, ConfigError, at_least, field
from quickloris.models import surgery
from quickloris.models.prepare import QLoRAConfig, prepare_model
from quickloris.parallel.compile import CompileConfig, compile_model

if TYPE_CHECKING:
    from quickloris.parallel.fsdp import FSDPConfig


@dataclasses.dataclass
class CheckpointConfig(Config):
    """Activation checkpointing of the decoder layers (`gradient_checkpointing` None: decided by the device)."""

    gradient_checkpointing: bool | None = field(
        True,
        help="recompute each decoder layer in backward instead of "
        "keeping its activations (non-reentrant torch.utils.checkpoint); "
        "unset: on with a GPU, off on CPU",
        flag="--gradient-checkpointing",
    )
    every_n_layers: int = field(
        1, help="checkpoint one decoder layer in n (1: all; 2: half, faster, more memory)", check=at_least(1)
    )
    skip_last: int = field(
        0,
        help="leave the last k decoder layers un-checkpointed: their backward needs no "
        "recompute, for k layers' activations of memory (use spare memory for speed)",
        check=at_least(0),
        flag="--skip-checkpoint-last",
    )
    offload: bool = field(
        False,
        help="keep the checkpointed layer inputs in pinned CPU memory, copied on a side stream "
        "(a GPU with gradient checkpointing; longest contexts; quickloris.parallel.offload)",
    )
    mlp_chunks: int = field(
        1,
        help="run each decoder layer's MLP over this many sequence chunks, each checkpointed: backward holds one "
        "chunk's [tokens, intermediate] activations (longest contexts; one more MLP forward per step; "
        "quickloris.parallel.tiled_mlp)",
        check=at_least(1),
    )

    def resolved(self, device_type: str) -> CheckpointConfig:
        """This config with `gradient_checkpointing` decided: unset checkpoints on a GPU only."""
        if self.gradient_checkpointing is not None:
            return self
        return dataclasses.replace(self, gradient_checkpointing=device_type == "cuda")


def apply_checkpointing(model: nn.Module, config: CheckpointConfig | None = None) -> nn.Module:
    """Enable (or disable) activation checkpointing of `model`'s decoder layers through transformers' own API; with
    `config.offload` their inputs go to pinned CPU memory (`quickloris.parallel.offload`), with `config.mlp_chunks`
    each decoder MLP runs over checkpointed sequence chunks (`quickloris.parallel.tiled_mlp`)."""
    device = next(model.parameters()).device.type
    cfg = (config or CheckpointConfig()).resolved(device)
    if cfg.offload and device == "cpu":  # checked first: unset checkpointing is off on the CPU (said, not ignored)
        raise ConfigError(
            CheckpointConfig,
            "offload",
            "moves checkpointed activations from the GPU to pinned CPU memory; this model is on the CPU already",
        )
    if cfg.offload and not cfg.gradient_checkpointing:
        raise ConfigError(
            CheckpointConfig,
            "offload",
            "moves the checkpointed layers' inputs: it needs {gradient_checkpointing} on",
            refs=("gradient_checkpointing",),
        )
    from quickloris.parallel.tiled_mlp import set_mlp_chunks

    set_mlp_chunks(model, cfg.mlp_chunks)  # 1: no tiling (undoes an earlier one)
    if not cfg.gradient_checkpointing:
        if getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_disable()
        return model
    params = inspect.signature(type(model).gradient_checkpointing_enable).parameters
    kwargs: dict = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if "every_n_layers" in params:
        kwargs["every_n_layers"] = cfg.every_n_layers
    elif cfg.every_n_layers != 1:
        raise ValueError(
            f"CheckpointConfig.every_n_layers={cfg.every_n_layers!r} needs a transformers version whose "
            "gradient_checkpointing_enable() accepts every_n_layers"
        )
    type(model).gradient_checkpointing_enable(model, **kwargs)  # transformers' own, past `_keep_on_enable`
    _keep_on_enable(model)
    if cfg.offload:
        _offload_checkpoints(model)
    if cfg.skip_last:
        from quickloris.models.families import decoder_layers

        layers = decoder_layers(model)
        if cfg.skip_last > len(layers):
            raise ConfigError(
                CheckpointConfig, "skip_last", f"={cfg.skip_last} exceeds the model's {len(layers)} layers"
            )
        for layer in layers[len(layers) - cfg.skip_last :]:
            layer.gradient_checkpointing = False
    return model


def _enable_keeping_quickloris(self: nn.Module, *args: Any, **kwargs: Any) -> None:
    """A model's ``gradient_checkpointing_enable`` once quickloris checkpoints it (`_keep_on_enable`)."""
    if not getattr(self, "is_gradient_checkpointing", False):
        type(self).gradient_checkpointing_enable(self, *args, **kwargs)
        return
    warnings.warn(  # the default filter shows it once per calling line
        "gradient_checkpointing_enable(): quickloris already checkpoints this model's layers (CheckpointConfig / "
        "--checkpoint-* options); its checkpointing is kept as configured",
        stacklevel=2,
    )


def _keep_on_enable(model: nn.Module) -> None:
    """Make a later ``model.gradient_checkpointing_enable()`` keep quickloris' checkpointing while it is on.

    HF ``Trainer`` with ``TrainingArguments(gradient_checkpointing=True)`` (TRL's ``SFTTrainer`` too) calls it
    before training. transformers' version would put its own checkpoint function back on every layer: offloaded
    inputs would silently stay on the GPU, and a layer whose checkpoint is traced into its compiled graph would be
    checkpointed twice. While checkpointing is on, the call warns and changes nothing; after
    ``gradient_checkpointing_disable()`` it is transformers' own again. A bound method, so that a deep copy of the
    model gets one bound to the copy."""
    surgery.set_attribute(
        model,
        "checkpoint",
        model,
        "gradient_checkpointing_enable",
        types.MethodType(_enable_keeping_quickloris, model),
        "a later gradient_checkpointing_enable() (HF Trainer's) keeps quickloris' checkpointing",
    )


def _offload_checkpoints(model: nn.Module) -> None:
    """Give every module transformers checkpoints one `OffloadedCheckpoint` as its checkpoint function: layer
    inputs in pinned CPU memory, copied on a side stream (transformers' own ``offload=True`` copies on the compute
    stream and waits for each copy: `quickloris.parallel.offload`)."""
    from quickloris.parallel.offload import OffloadedCheckpoint

    func = OffloadedCheckpoint()
    for path, module in model.named_modules():
        if getattr(module, "_gradient_checkpointing_func", None) is not None:
            surgery.set_attribute(
                model,
                "checkpoint",
                module,
                "_gradient_checkpointing_func",
                func,
                "checkpoint with its input in pinned CPU memory (copied on a side stream, one layer prefetched)",
                path=path,
            )


def build_training_model(
    model: nn.Module,
    qlora: QLoRAConfig | None = None,
    *,
    checkpointing: CheckpointConfig | None = None,
    compile: CompileConfig | None = None,
    adapter: str | None = None,
    sharding: FSDPConfig | None = None,
    mesh: Any = None,
) -> nn.Module:
    """`model` made trainable, steps 1-4 of the module docstring, in place; returns it (in train mode).

    `sharding`: FSDP2 over `mesh` (default: the job `quickloris.parallel.fsdp.init_distributed` joins); None: not
    sharded.
    """
    prepare_model(model, qlora, adapter=adapter)
    apply_checkpointing(model, checkpointing or CheckpointConfig())
    if sharding is not None:
        from quickloris.parallel.fsdp import shard_model

        shard_model(model, sharding, mesh)
    if compile is not None and compile.enabled:
        compile_model(model, compile)
    return model.train()
