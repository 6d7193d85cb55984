"""The training stack, assembled in one place and one order.

    1. quantize + LoRA      `quickloris.models.prepare_model` (NF4 bases, adapters, chunked loss, attention)
    2. checkpointing        `apply_checkpointing` (transformers' per-layer checkpointing, non-reentrant)
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
from typing import TYPE_CHECKING, Any

from torch import nn

from quickloris.cli.args import field
from quickloris.models.prepare import QLoRAConfig, prepare_model
from quickloris.parallel.compile import CompileConfig, compile_model

if TYPE_CHECKING:
    from quickloris.parallel.fsdp import FSDPConfig


@dataclasses.dataclass
class CheckpointConfig:
    """Activation checkpointing of the decoder layers."""

    gradient_checkpointing: bool = field(True, help="recompute each decoder layer in backward instead of keeping "
                                         "its activations (non-reentrant torch.utils.checkpoint)")
    every_n_layers: int = field(1, help="checkpoint one decoder layer in n (1: all; 2: half, faster, more memory)")
    skip_last: int = field(0, help="leave the last k decoder layers un-checkpointed: their backward needs no "
                           "recompute, for k layers' activations of memory (use spare memory for speed)")
    offload: bool = field(False, help="keep the checkpointed layer inputs in pinned CPU memory (longest contexts)")

    def __post_init__(self):
        if not isinstance(self.every_n_layers, int) or isinstance(self.every_n_layers, bool) or self.every_n_layers < 1:
            raise ValueError(f"CheckpointConfig.every_n_layers must be a positive int, got {self.every_n_layers!r}")
        if not isinstance(self.skip_last, int) or isinstance(self.skip_last, bool) or self.skip_last < 0:
            raise ValueError(f"CheckpointConfig.skip_last must be an int >= 0, got {self.skip_last!r}")


def apply_checkpointing(model: nn.Module, config: CheckpointConfig | None = None) -> nn.Module:
    """Enable (or disable) activation checkpointing of `model`'s decoder layers through transformers' own API."""
    cfg = config or CheckpointConfig()
    if not cfg.gradient_checkpointing:
        if getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_disable()
        return model
    if cfg.offload and next(model.parameters()).device.type == "cpu":
        raise ValueError("CheckpointConfig.offload moves checkpointed activations from the GPU to pinned CPU memory; "
                         "this model is on the CPU already")
    params = inspect.signature(model.gradient_checkpointing_enable).parameters
    kwargs: dict = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    for name, value, default in (("every_n_layers", cfg.every_n_layers, 1), ("offload", cfg.offload, False)):
        if name in params:
            kwargs[name] = value
        elif value != default:
            raise ValueError(f"CheckpointConfig.{name}={value!r} needs a transformers version whose "
                             f"gradient_checkpointing_enable() accepts {name}")
    model.gradient_checkpointing_enable(**kwargs)
    if cfg.skip_last:
        from quickloris.parallel.compile import decoder_layers

        layers = decoder_layers(model)
        if cfg.skip_last > len(layers):
            raise ValueError(f"CheckpointConfig.skip_last={cfg.skip_last} exceeds the model's {len(layers)} layers")
        for layer in layers[len(layers) - cfg.skip_last:]:
            layer.gradient_checkpointing = False
    return model


def build_training_model(model: nn.Module, qlora: QLoRAConfig | None = None, *,
                         checkpointing: CheckpointConfig | None = None, compile: CompileConfig | None = None,
                         adapter: str | None = None, sharding: FSDPConfig | None = None,
                         mesh: Any = None) -> nn.Module:
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
