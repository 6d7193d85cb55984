"""QLoRA on several GPUs with FSDP2 (`torch.distributed.fsdp.fully_shard`): NF4 bases sharded as bytes.

`shard_model(model, FSDPConfig(...), mesh)` shards a model prepared by `quickloris.prepare_model`:

* one FSDP2 unit per decoder layer plus the root (embeddings, final norm, lm_head); each unit's parameters are
  stored 1/N per rank (dim 0), all-gathered just before its forward (and again before its backward, unless
  ``reshard_after_forward=False``) and freed after; LoRA gradients are reduce-scattered.
* NF4 base weights (`quickloris.tensor.NF4Tensor`) are sharded as what they are, 4-bit bytes: the tensor implements
  FSDP2's all-gather extension, so the collective moves the packed uint8 codes, the uint8 absmax codes and the
  fp32 absmax2 scales of each shard (the per-tensor ``offset`` and the code tables are replicated) and the
  gathered weight is bit-identical to the unsharded one. A shard must hold whole groups of 64 * 256 = 16384 values
  (one absmax2 scale), i.e. ``(out / N) * in % 16384 == 0`` and ``out % N == 0``; Llama-3.1-8B's weights all
  qualify up to N = 8 (k/v: 1024 x 4096). A weight that does not is **replicated** (kept whole on every rank,
  outside FSDP's management: ``ignored_params``; it is frozen, so no gradient is lost), listed by
  `sharding_plan`; ``unshardable="error"`` raises instead.
* Memory per rank, NF4 weights: ``0.52 * P / N`` bytes resident, plus the all-gathered layer(s) in flight
  (``reshard_after_forward``); with ``cpu_offload`` the resident shards and the LoRA optimizer step live in
  (pinned) CPU memory and each layer comes to the GPU for its compute.
* Mixed precision (``MixedPrecisionPolicy``): parameters are gathered in ``param_dtype`` (bf16: LoRA matrices,
  norms and embeddings are cast; NF4 weights are never cast - they only dequantize to that dtype), gradients are
  reduce-scattered in ``reduce_dtype`` (fp32) into fp32 LoRA master weights.

Loss equal to one GPU. With a step of micro-batches ``b`` over ranks ``r``, one GPU minimises
``L = sum_{r,b} sum_tokens ce / N_tokens`` with ``N_tokens`` the number of target tokens of the whole step (all
ranks, all accumulation steps). Each rank computes its share ``L_r = sum_{b} sum_tokens ce / N_tokens`` (the
count all-reduced first: `global_num_items`) and backpropagates ``N * L_r``: FSDP2 averages gradients over the N
ranks, so the reduced gradient is ``sum_r dL_r = dL`` (HF ``Trainer`` scales the same way when
``average_tokens_across_devices``). The reported loss is ``sum_r L_r`` (`all_reduce_sum`).

Adapters: `quickloris.models.adapters.save_adapter` (and the prepared model's ``save_pretrained``) gathers the LoRA
matrices of a sharded model (every rank must call it; rank 0 writes) in PEFT's format, loadable on one GPU. Launch:
``torchrun --nproc-per-node N script.py`` (or ``accelerate launch``), then `init_distributed`. The stack order
(quantize/LoRA -> checkpointing -> sharding -> compile) is `quickloris.parallel.compose.build_training_model`'s.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import os
import socket
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from quickloris.config import Config, field
from quickloris.models import surgery
from quickloris.models.adapters import adapter_state_dict as gather_adapter_state_dict  # noqa: F401 - re-exported
from quickloris.models.adapters import save_adapter  # noqa: F401 - re-exported (gathers a sharded model)
from quickloris.tensor.nf4_tensor import NF4Tensor

STEP = "fsdp"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclasses.dataclass
class FSDPConfig(Config):
    """FSDP2 sharding of a QLoRA model over the ranks of a 1-D device mesh (see `quickloris.parallel.fsdp`)."""

    mixed_precision: bool = field(
        True,
        help="gather parameters in --param-dtype and reduce gradients in "
        "--reduce-dtype (MixedPrecisionPolicy); off: compute in the parameters' dtypes",
    )
    param_dtype: Literal["bfloat16", "float16", "float32"] = field(
        "bfloat16", help="compute dtype of the gathered parameters (NF4 weights dequantize to it)"
    )
    reduce_dtype: Literal["float32", "bfloat16"] = field("float32", help="dtype of the gradient reduce-scatter")
    cpu_offload: bool = field(
        False,
        help="keep parameter shards, gradients and the optimizer step on the CPU "
        "(pinned memory); each layer is copied to the GPU for its compute",
    )
    reshard_after_forward: bool = field(
        True,
        help="free each layer's gathered parameters after its forward and "
        "gather again for backward (less memory, one more all-gather per layer)",
    )
    unshardable: Literal["replicate", "error"] = field(
        "replicate",
        help="an NF4 weight that cannot be split into whole 16384-value groups per rank: keep it whole "
        "on every rank (replicate), or raise (error)",
    )


@dataclasses.dataclass
class FSDPOptions(FSDPConfig):
    """`quickloris train` options: whether to shard with FSDP2, and how (the `FSDPConfig` fields)."""

    fsdp: bool = field(
        False,
        help="shard the model with FSDP2 over the processes `torchrun --nproc-per-node N "
        "-m quickloris train --fsdp` starts (one per GPU); each step's rows are split over the ranks, "
        "the loss stays the one-process loss",
    )

    def sharding(self) -> FSDPConfig | None:
        """The `FSDPConfig` to shard with, or None without --fsdp."""
        if not self.fsdp:
            return None
        return FSDPConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FSDPConfig)})


@dataclasses.dataclass
class DistContext:
    """This process' place in the job: rank, world size, local rank, compute device and the 1-D mesh."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: Any

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ----------------------------------------------------------------------------------------------------------
# process group


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(
    device_type: str | None = None, *, backend: str | None = None, timeout_s: float = 1800.0
) -> DistContext:
    """Join the job torchrun / accelerate launched (env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without a launcher this process is a job of one (rank 0 of 1: FSDP2 on one GPU, e.g. for CPU offload).
    `device_type`: cuda (default when available; the GPU is ``cuda:LOCAL_RANK``; backend ``cpu:gloo,cuda:nccl``:
    NCCL for the GPU collectives, gloo for those on CPU-offloaded shards, e.g. gradient-norm clipping) or cpu
    (gloo). Calling it again returns the same context.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type must be cuda or cpu, got {device_type!r}")
    if "RANK" not in os.environ and not dist.is_initialized():
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s): "
                "launch at most one process per GPU (torchrun --nproc-per-node <= GPUs)"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        kw: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
        if device_type == "cuda":
            kw["device_id"] = device
        dist.init_process_group(backend or ("cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"), **kw)
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, mesh)


# ----------------------------------------------------------------------------------------------------------
# sharding


def check_no_bitsandbytes(model: nn.Module) -> None:
    """Raise TypeError if `model` still holds bitsandbytes 4-bit parameters (FSDP2 cannot shard them)."""
    for name, p in model.named_parameters():
        if getattr(p, "quant_state", None) is not None or type(p).__name__ == "Params4bit":
            raise TypeError(
                f"{name} is a bitsandbytes {type(p).__name__}: FSDP2 cannot shard it (its quant_state is "
                "not a tensor FSDP2 moves, and its uint8 bytes would be split without their scales). "
                "Call quickloris.prepare_model(model) first: it wraps the same bytes as NF4Tensor "
                "weights, which shard bit-exactly"
            )


def sharding_plan(model: nn.Module, world_size: int) -> dict[str, str]:
    """``{parameter name: "shard" | "replicate"}`` for the NF4 weights of `model` over `world_size` ranks.

    With one rank every NF4 weight stays outside FSDP2 ("replicate"): there is nothing to shard, and FSDP2's
    one-rank shortcut copies only the first tensor of an all-gather extension.
    """
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    return {
        name: "shard" if world_size > 1 and p.shardable(world_size) else "replicate"
        for name, p in model.named_parameters()
        if isinstance(p, NF4Tensor)
    }


def _unshardable_message(model: nn.Module, names: list[str], world_size: int) -> str:
    params = dict(model.named_parameters())
    shown = ", ".join(f"{n} {list(params[n].shape)}" for n in names[:4]) + (" ..." if len(names) > 4 else "")
    unit = params[names[0]].shard_unit
    return (
        f"{len(names)} NF4 weight(s) cannot be split over {world_size} ranks into shards of whole {unit}-value "
        f"groups ((out / world_size) * in must be a multiple of {unit}, out a multiple of world_size): {shown}"
    )


def _mp_policy(cfg: FSDPConfig):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not cfg.mixed_precision:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=_DTYPES[cfg.param_dtype], reduce_dtype=_DTYPES[cfg.reduce_dtype])


def _offload_policy(cfg: FSDPConfig, device: torch.device):
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    if not cfg.cpu_offload:
        return OffloadPolicy()
    return CPUOffloadPolicy(pin_memory=device.type == "cuda")  # pinning needs an accelerator


def mesh_device(mesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def shard_model(model: nn.Module, config: FSDPConfig | None = None, mesh=None) -> nn.Module:
    """Apply FSDP2 to a prepared QLoRA model in place (see the module docstring); returns it.

    `mesh`: a 1-D DeviceMesh over the data-parallel ranks (default: `init_distributed().mesh`). The model is
    moved to the mesh's device first (replicated weights stay there; sharded ones end there, or on the CPU with
    ``cpu_offload``). Call before `torch.compile` and after activation checkpointing
    (`quickloris.parallel.compose.build_training_model` keeps that order).
    """
    from torch.distributed.fsdp import fully_shard

    from quickloris.models.families import decoder_layers
    from quickloris.models.prepare import is_prepared

    cfg = config or FSDPConfig()
    if not isinstance(cfg, FSDPConfig):
        raise TypeError(f"config must be a quickloris FSDPConfig, got {type(cfg).__name__}")
    check_no_bitsandbytes(model)
    if not is_prepared(model):
        raise ValueError(
            f"{type(model).__name__} was not prepared by quickloris.prepare_model: FSDP2 shards the "
            "NF4 weights and LoRA adapters it creates (call prepare_model or build_training_model first)"
        )
    if surgery.applied(model, STEP):
        raise ValueError("this model is sharded already")
    if surgery.applied(model, "compile"):
        raise ValueError("shard the model before compiling it (compile traces the sharded modules)")
    mesh = mesh if mesh is not None else init_distributed().mesh
    if mesh.ndim != 1:
        raise ValueError(f"shard_model takes a 1-D data-parallel mesh, got {mesh.ndim}-D")
    world = mesh.size()
    plan = sharding_plan(model, world)
    replicate = sorted(n for n, how in plan.items() if how == "replicate")
    if replicate and cfg.unshardable == "error" and world > 1:
        raise ValueError(
            _unshardable_message(model, replicate, world) + "; use FSDPConfig(unshardable='replicate') "
            "to keep them whole on every rank, or another world size"
        )
    if replicate and "ignored_params" not in inspect.signature(fully_shard).parameters:
        raise RuntimeError(
            _unshardable_message(model, replicate, world) + "; replicating them needs "
            "fully_shard(ignored_params=...) (torch >= 2.7)"
        )
    device = mesh_device(mesh)
    kw: dict[str, Any] = dict(mesh=mesh, mp_policy=_mp_policy(cfg), offload_policy=_offload_policy(cfg, device))
    model.to(device)  # replicated weights are not moved by fully_shard: they must be on the device already
    if replicate:
        params = dict(model.named_parameters())
        kw["ignored_params"] = {params[n] for n in replicate}
    # A vision-language model's vision tower and projector stay whole on every rank, outside FSDP2: a rank whose rows
    # have no image does not run them, and FSDP2 reduces only the gradients a rank produced, so their LoRA (with
    # --train-vision) is averaged by quickloris.models.vision.reduce_vision_grads, every parameter on every rank.
    from quickloris.models.vision import vision_parameters

    vision = vision_parameters(model)
    if vision:
        kw["ignored_params"] = kw.get("ignored_params", set()) | set(vision)
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=cfg.reshard_after_forward, **kw)
    fully_shard(model, **kw)  # root: embeddings, final norm, lm_head (kept gathered from forward to backward)
    surgery.record(
        model,
        STEP,
        "model.model.layers.*, model",
        f"fully_shard over {world} ranks: one unit per decoder "
        f"layer + the root ({len(replicate)} NF4 weights replicated)",
    )
    surgery.set_state(model, STEP, {"config": cfg, "world_size": world, "plan": plan, "mesh": mesh})
    return model


def is_sharded(model: nn.Module) -> bool:
    return surgery.state(model, STEP) is not None


def sharding_summary(model: nn.Module) -> dict[str, Any]:
    """World size, config, and the NF4 weights sharded / replicated (names) of a model `shard_model` sharded."""
    state = surgery.state(model, STEP)
    if state is None:
        raise ValueError(f"{type(model).__name__} was not sharded by quickloris.parallel.fsdp.shard_model")
    plan = state["plan"]
    return {
        "world_size": state["world_size"],
        "config": dataclasses.asdict(state["config"]),
        "nf4_sharded": sum(v == "shard" for v in plan.values()),
        "nf4_replicated": sorted(n for n, v in plan.items() if v == "replicate"),
    }


def trainer_fsdp_config(model: nn.Module) -> dict[str, Any]:
    """`TrainingArguments(fsdp=True, fsdp_config=...)` for a model `shard_model` sharded already.

    accelerate's FSDP2 preparation looks up the decoder-layer class by name before it notices that the model is
    an FSDP2 module and leaves it alone; `fully_shard` renamed that class (``LlamaDecoderLayer`` ->
    ``FSDPLlamaDecoderLayer``), so the name it looks for is given here. Checkpointing and mixed precision stay
    quickloris' (``gradient_checkpointing=False, bf16=False`` in the arguments)."""
    from quickloris.models.families import decoder_layers

    if not is_sharded(model):
        raise ValueError(f"{type(model).__name__} is not sharded: call quickloris.parallel.fsdp.shard_model first")
    names = sorted({type(layer).__name__ for layer in decoder_layers(model)})
    return {
        "fsdp_version": 2,
        "state_dict_type": "SHARDED_STATE_DICT",
        "transformer_layer_cls_to_wrap": names,
        "activation_checkpointing": False,
    }


# ----------------------------------------------------------------------------------------------------------
# loss normalisation


def count_targets(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Target tokens of a causal-LM batch: labels after the shift by one (position i predicts label i + 1)."""
    from quickloris.models.chunked_loss import shift_for_causal_lm

    return (shift_for_causal_lm(labels, ignore_index) != ignore_index).sum()


def all_reduce_sum(value: torch.Tensor | float, group=None) -> torch.Tensor:
    """The sum over ranks (a copy; float64 for python numbers, so token counts stay exact)."""
    import torch.distributed as dist

    t = value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        if dist.get_backend(group) == "nccl" and not t.is_cuda:  # a process group of NCCL alone
            t = t.cuda()
        dist.all_reduce(t, group=group)
    return t


def global_num_items(
    labels: torch.Tensor | Iterable[torch.Tensor], *, ignore_index: int = -100, group=None
) -> torch.Tensor:
    """Target tokens of one optimizer step: summed over the given micro-batches' labels and over all ranks."""
    batches = [labels] if isinstance(labels, torch.Tensor) else list(labels)
    if not batches:
        raise ValueError("global_num_items needs the labels of at least one micro-batch")
    local = sum(int(count_targets(b, ignore_index)) for b in batches)
    return all_reduce_sum(torch.tensor(local, dtype=torch.int64, device=batches[0].device), group)


def gradient_scale(group=None) -> float:
    """The factor each rank multiplies its loss share by before backward: FSDP2 averages gradients over ranks."""
    import torch.distributed as dist

    return float(dist.get_world_size(group)) if dist.is_initialized() else 1.0


__all__ = [
    "FSDPConfig",
    "FSDPOptions",
    "DistContext",
    "init_distributed",
    "shard_model",
    "sharding_plan",
    "sharding_summary",
    "is_sharded",
    "check_no_bitsandbytes",
    "count_targets",
    "global_num_items",
    "all_reduce_sum",
    "gradient_scale",
    "gather_adapter_state_dict",
    "save_adapter",
    "free_port",
]
