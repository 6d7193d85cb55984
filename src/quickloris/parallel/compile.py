"""Regional `torch.compile` of a QLoRA model: each decoder layer, the final norm, and the loss chunk.

What is compiled, and why this way:

* **Each decoder layer** (``layer.compile(fullgraph=True, dynamic=True)``): RMSNorms, q/k/v/o and the MLP's
  QLoRA linears (the NF4 matmul is one opaque custom op; the LoRA matmuls, scaling, dropout and the additions
  around it are traced), RoPE, attention (SDPA or FlexAttention: the flex kernel is generated here), SiLU-gate,
  residual adds. All layers run the same code with the same guards, so they share **one** compiled graph (forward
  and backward), and with dynamic shapes one graph covers every sequence length and batch size > 1.
* **The final RMSNorm** (one more small graph).
* **The loss**: lm_head + cross-entropy + its gradient for one chunk of tokens (`quickloris.parallel.compiled_loss`;
  one graph whatever the token count, since the chunk loop stays outside).

Not compiled: the embedding lookup, the rotary tables (computed once per step under no_grad) and the mask
construction (`quickloris.models.attention` builds BlockMasks in eager PyTorch), i.e. the data-dependent
glue between regions. Each region is compiled with ``fullgraph=True``: a graph break is an error, not a silent
fallback. Count graphs and breaks with `compile_stats` (dynamo's counters).

**Activation checkpointing** of a checkpointed layer is transformers' eager ``torch.utils.checkpoint`` around the
compiled layer by default: only the layer's input is kept, the recompute reruns the compiled forward. With
``checkpoint_in_graph`` the checkpoint moves *into* the layer's graph instead: the layer gets an instance-level
``forward`` calling ``torch.utils.checkpoint.checkpoint(<the class's forward>, ...)`` (transformers' wrapper becomes a
pass-through), dynamo traces it as a region, and the replay runs inside the compiled backward (no eager re-entry
per layer: on an H100 the eager checkpoint left a 1B step ~40 % GPU-idle, ``benchmarks/results/train/probe_speed-*``).
What the region keeps is set by an explicit selective-checkpoint policy (``checkpoint_keep``), not left to the
partitioner's heuristics, which differ between torch releases (on torch 2.11 they kept the linear outputs made
inside the QLoRA autograd.Function, on 2.13 they replay them). Everything is replayed (``MUST_RECOMPUTE``) but:

* always: the layer's input, the LoRA ``u = s·x_d·Aᵀ`` ([T, r] per linear) and the rotary tables - the eager
  checkpoint's memory - and the outputs of ops that draw random numbers (the LoRA dropout's ``rand_like``;
  attention only if its dropout_p > 0), so backward sees exactly the forward's masks whatever RNG replay the torch
  release does (a cost only with dropout);
* ``attention`` in ``checkpoint_keep``: the attention kernel's outputs (output + logsumexp: for Llama-3.1-8B at
  8192 tokens 65 MiB per layer), so backward does not rerun the attention forward;
* ``linears``: the outputs of the NF4 base matmuls (``quickloris::nf4_matmul``, LoRA term included), so backward
  replays no GEMM (Llama-3.2-1B at 8192 tokens: q, k, v, gate, up = 304 MiB per layer).

With checkpoint offload (`quickloris.parallel.offload`: pinned CPU copies on a side stream) the in-graph checkpoint
keeps the offload's saved-tensor hooks around each layer's call: the layer input the compiled region saves goes to
pinned memory as with the eager checkpoint.

**CUDA graphs** (``mode="reduce-overhead"`` or ``"max-autotune"``, `uses_cuda_graphs`): Inductor's graph trees
record each region's forward and backward once per shape and replay them, so a step costs a few host calls per
region instead of one per kernel (a small model's step is otherwise bound by the host's launches). Layer outputs
then live in the graphs' memory pool. Checkpoint offload is refused with them for now: a replay does not see
``record_stream``, and the offload's answer to that (``hold``) is not yet verified on a GPU.

Only registered families (`quickloris.models.families`, ``fast_path``) are compiled: their layers are tested to trace
with no graph break. A model on the generic path stays eager (`prepare_model` says so in its one warning line).
The decoder layers are found through the family spec (`quickloris.models.families.decoder_layers`).
See `quickloris.parallel.compose` for the order in which the stack is assembled.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Literal, get_args

from torch import nn

from quickloris.config import Config, field
from quickloris.models import surgery
from quickloris.models.families import decoder_layers  # noqa: F401 - the registry's; re-exported for old callers
from quickloris.parallel.compile_stats import compile_seconds, compile_stats, reset_compile_stats  # noqa: F401
from quickloris.parallel.regions import compile_region, traced_as_region  # noqa: F401 - re-exported

STEP = "compile"
Keep = Literal["attention", "linears"]
CHECKPOINT_KEEP = get_args(Keep)
_CONTEXT_FNS: dict[str, Any] = {}  # selective-checkpoint context functions by policy key (see selective_context)
# The attention kernels' forward ops (their outputs are what backward needs besides q, k, v), by (namespace, name).
_ATTENTION_OPS = frozenset(
    {
        ("aten", name)
        for name in (
            "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention",
            "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_fused_attention_overrideable",
            "_flash_attention_forward",
            "_efficient_attention_forward",
        )
    }
    | {("higher_order", "flex_attention")}
)


def _backend(name: str) -> str | None:
    return None if name else "must be a backend name, got ''"


@dataclasses.dataclass
class CompileConfig(Config):
    """Regional torch.compile settings (`enabled` None: decided by the device, `resolved`)."""

    enabled: bool | None = field(
        True,
        help="compile each decoder layer, the final norm and the loss (regional "
        "compile); unset: on with a GPU (the fast path), off on CPU (compiling costs more "
        "than it saves there)",
        flag="--compile",
    )
    backend: str = field("inductor", help="torch.compile backend (inductor; aot_eager for debugging)", check=_backend)
    mode: str | None = field(
        None,
        help="torch.compile mode, e.g. reduce-overhead (CUDA graphs: a step is a few host calls per layer, "
        "for small models; best with --checkpoint-in-graph) or max-autotune-no-cudagraphs (none: default)",
    )
    dynamic: bool = field(True, help="compile for symbolic shapes: one graph for all sequence lengths")
    loss: bool = field(
        True,
        help="compile the lm_head + cross-entropy chunk (models on the chunked loss with a "
        "frozen plain lm_head, i.e. QLoRA models)",
    )
    norm: bool = field(True, help="compile the final RMSNorm")
    checkpoint_in_graph: bool = field(
        False,
        help="trace each checkpointed decoder layer's checkpoint into its "
        "compiled graph: the replay runs inside the compiled backward, no eager re-entry per layer (with "
        "--checkpoint-offload the layer input still goes to pinned memory)",
        flag="--checkpoint-in-graph",
    )
    checkpoint_keep: list[Keep] = field(
        [],
        help="with --checkpoint-in-graph: what each layer keeps besides its input, comma-separated: attention "
        "(its outputs: no attention forward replayed) and/or linears (the NF4 matmul outputs: no GEMM replayed); "
        "faster, more memory; empty: replay everything",
        flag="--checkpoint-keep",
    )

    def validate(self) -> None:
        if self.checkpoint_keep and not self.checkpoint_in_graph:
            raise self.error(
                "checkpoint_keep",
                f"={self.checkpoint_keep} needs {{checkpoint_in_graph}} (the eager "
                "checkpoint keeps only each layer's input)",
                "checkpoint_in_graph",
            )

    def resolved(self, device_type: str) -> CompileConfig:
        """This config with `enabled` decided: unset compiles on a GPU only."""
        return self if self.enabled is not None else dataclasses.replace(self, enabled=device_type == "cuda")


def compile_model(model: nn.Module, config: CompileConfig | None = None) -> nn.Module:
    """Compile `model`'s regions in place (see the module docstring); returns it.

    A model on the generic path (an unregistered family, `quickloris.models.families`) stays eager: its layers
    were never checked to trace without a graph break. `prepare_model` said so already; otherwise this warns."""
    from quickloris.models.families import STATE, family_of, warn

    cfg = (config or CompileConfig()).resolved(next(model.parameters()).device.type)
    if not cfg.enabled:
        return model
    if surgery.applied(model, STEP):
        raise ValueError("this model's regions are compiled already")
    spec = family_of(model)
    if not spec.fast_path:
        if surgery.state(model, STATE) is None:  # prepare_model's warning covers it
            warn(
                f"{type(surgery.unwrap(model)).__name__}: not a registered family: the regional compile (fast "
                "path) is off, the model stays eager"
            )
        return model
    kw: dict[str, Any] = dict(fullgraph=True, dynamic=cfg.dynamic, backend=cfg.backend, mode=cfg.mode)
    layers = decoder_layers(model)
    if _has_offloaded_checkpoint(layers):
        check_offload_allowed(cfg)
    prefix = f"model.{spec.layers_path(surgery.unwrap(model))}"
    for i, layer in enumerate(layers):
        if cfg.checkpoint_in_graph:
            checkpoint_in_graph(model, layer, cfg.checkpoint_keep, path=f"{prefix}.{i}")
        _compile(model, layer, kw, f"{prefix}.{i}")
    base = spec.decoder(surgery.unwrap(model))
    if cfg.norm and isinstance(getattr(base, "norm", None), nn.Module):
        _compile(model, base.norm, kw, f"model.{surgery.unwrap(model).base_model_prefix}.norm")
    if cfg.loss:
        from quickloris.models.chunked_loss import is_chunked_loss_enabled
        from quickloris.parallel.compiled_loss import enable_compiled_loss, supports_compiled_loss

        # Only where the chunked loss is on (a model kept on HF's own loss keeps it), and only for a frozen plain
        # head (QLoRA's): otherwise the eager chunked loss stays, which handles every head.
        if is_chunked_loss_enabled(model) and supports_compiled_loss(model):
            enable_compiled_loss(model, backend=cfg.backend, mode=cfg.mode)
    surgery.set_state(model, STEP, cfg)
    return model


def uses_cuda_graphs(cfg: CompileConfig) -> bool:
    """Whether regions compiled with `cfg` replay CUDA graphs: its mode's Inductor options (``reduce-overhead``,
    ``max-autotune``), Inductor's global switch, or the ``cudagraphs`` backend."""
    import torch._inductor

    if cfg.backend == "cudagraphs":
        return True
    if cfg.backend != "inductor":
        return False
    return bool(
        torch._inductor.list_mode_options(cfg.mode).get("triton.cudagraphs", torch._inductor.config.triton.cudagraphs)
    )


def check_offload_allowed(cfg: CompileConfig) -> None:
    """Raise a `ConfigError` if regions compiled with `cfg` replay CUDA graphs: checkpoint offload is refused with
    them. Not verified on a GPU: the offload's ``hold`` (`quickloris.parallel.offload`) exists for it, but in the
    last run CUDA graph trees refused the copies' stream uses of their pool's memory (issue 15's note)."""
    if not uses_cuda_graphs(cfg):
        return
    name = "mode" if cfg.mode else "backend"
    raise cfg.error(
        name,
        f"={getattr(cfg, name)!r} (CUDA graphs) cannot be combined with checkpoint offload yet "
        "(--checkpoint-offload, CheckpointConfig.offload): use one of them",
    )


def _has_offloaded_checkpoint(layers) -> bool:
    """Whether a layer's checkpoint slot holds an `OffloadedCheckpoint` (as `__call__` or as the bound `in_graph`)."""
    from quickloris.parallel.offload import OffloadedCheckpoint

    slots = (getattr(layer, "_gradient_checkpointing_func", None) for layer in layers)
    return any(isinstance(getattr(f, "__self__", f), OffloadedCheckpoint) for f in slots)


def _compile(model: nn.Module, module: nn.Module, kw: dict[str, Any], path: str) -> None:
    compile_region(module, **kw)

    def undo(m: nn.Module) -> None:
        module._compiled_call_impl = None

    surgery.record(model, STEP, path, f"torch.compile (fullgraph, {kw['backend']}, dynamic={kw['dynamic']})", undo)


def compile_config(model: nn.Module) -> CompileConfig | None:
    """The config `model`'s regions were compiled with (None: not compiled)."""
    return surgery.state(model, STEP)


def check_checkpoint_keep(keep, in_graph: bool = True, owner: str = "") -> None:
    """`keep` must list kinds of `CHECKPOINT_KEEP`, and only for an in-graph checkpoint."""
    if isinstance(keep, str) or not all(k in CHECKPOINT_KEEP for k in keep):
        raise ValueError(f"{owner}checkpoint_keep must be a list of {CHECKPOINT_KEEP}, got {keep!r}")
    if keep and not in_graph:
        raise ValueError(
            f"{owner}checkpoint_keep={list(keep)} needs checkpoint_in_graph (the eager checkpoint keeps "
            "only each layer's input)"
        )


def _draws_random(op, args, kwargs) -> bool:
    """Whether this call draws random numbers: a seeded op, unless its dropout_p (attention) is 0."""
    import torch

    if torch.Tag.nondeterministic_seeded not in getattr(op, "tags", ()):
        return False
    schema = getattr(op, "_schema", None)  # an op overload's; a higher-order op has none: assume it draws
    for i, arg in enumerate(schema.arguments if schema is not None else ()):
        if arg.name == "dropout_p":
            value = kwargs.get("dropout_p", args[i] if i < len(args) else arg.default_value)
            return value != 0
    return True


def _name(op) -> tuple[str, str]:
    """(namespace, name) of an op overload or a higher-order op."""
    return getattr(op, "namespace", ""), getattr(op, "_opname", None) or getattr(op, "_name", "")


def checkpoint_policy(keep=()):
    """The selective-checkpoint policy of an in-graph checkpoint (module docstring): random draws and the kinds in
    `keep` (``attention``, ``linears``) are saved, everything else is replayed in backward."""
    from torch.utils.checkpoint import CheckpointPolicy

    import quickloris.ops.qlora_linear  # noqa: F401  (registers torch.ops.quickloris.nf4_matmul)

    check_checkpoint_keep(keep)
    keep_attention, keep_linears = "attention" in keep, "linears" in keep

    def policy(ctx, op, *args, **kwargs):
        if _draws_random(op, args, kwargs):
            return CheckpointPolicy.MUST_SAVE
        if keep_linears and _name(op) == ("quickloris", "nf4_matmul"):
            return CheckpointPolicy.MUST_SAVE
        if keep_attention and _name(op) in _ATTENTION_OPS:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.MUST_RECOMPUTE

    return policy


def _policy_key(keep) -> str:
    return ",".join(sorted(set(keep)))


def selective_context(keep=()):
    """``torch.utils.checkpoint.checkpoint``'s ``context_fn`` for `checkpoint_policy(keep)`: one object per policy,
    so that every region checkpointed with it traces the same constant (the tiled MLP's chunks use ``keep=()``)."""
    check_checkpoint_keep(keep)
    key = _policy_key(keep)
    if key not in _CONTEXT_FNS:
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        _CONTEXT_FNS[key] = functools.partial(create_selective_checkpoint_contexts, checkpoint_policy(keep))
    return _CONTEXT_FNS[key]


def _checkpointed_forward(self, *args, **kwargs):
    """The layer's class forward under a non-reentrant selective checkpoint (training only); traced into the
    layer's graph."""
    import torch.utils.checkpoint

    if not self.training:
        return type(self).forward(self, *args, **kwargs)
    return torch.utils.checkpoint.checkpoint(
        type(self).forward,
        self,
        *args,
        use_reentrant=False,
        context_fn=_CONTEXT_FNS[self.quickloris_checkpoint_keep],
        **kwargs,
    )


def _pass_through(function, *args, **kwargs):
    """transformers' checkpoint function slot for a layer whose checkpoint is in its graph: just call the layer."""
    return function(*args, **kwargs)


def checkpoint_in_graph(model: nn.Module, layer: nn.Module, keep=(), *, path: str | None = None) -> bool:
    """Move `layer`'s activation checkpoint from transformers' eager wrapper into its forward (module docstring);
    it keeps the layer's input, random draws and the kinds in `keep` (``attention``, ``linears``).

    For a layer transformers checkpoints with plain non-reentrant ``torch.utils.checkpoint`` its wrapper becomes a
    pass-through; for one checkpointed by quickloris' `OffloadedCheckpoint` it becomes that object's `in_graph`
    (its saved-tensor hooks around the call: the layer input still goes to pinned memory). Any other wrapper
    (reentrant, transformers' ``save_on_cpu``) stays. The ``gradient_checkpointing`` flag stays True, so the model
    still reports checkpointing as enabled. Returns whether the layer was changed.
    """
    import torch.utils.checkpoint

    from quickloris.parallel.offload import OffloadedCheckpoint

    selective_context(keep)  # checks `keep`; made here, eagerly: the traced forward looks it up by its key
    func = getattr(layer, "_gradient_checkpointing_func", None)
    if not getattr(layer, "gradient_checkpointing", False) or is_checkpointed_in_graph(layer):
        return False
    if isinstance(func, OffloadedCheckpoint):
        call, why = (
            func.in_graph,
            "the offloaded checkpoint keeps its hooks (layer input to pinned memory), not its wrapper",
        )
    elif (
        isinstance(func, functools.partial)
        and func.func is torch.utils.checkpoint.checkpoint
        and func.keywords.get("use_reentrant") is False
    ):
        call, why = _pass_through, "transformers' checkpoint wrapper becomes a pass-through"
    else:
        return False  # reentrant, or transformers' save_on_cpu around the checkpoint: keep the wrapper
    # The forward looks its context function up by a string attribute, not a per-layer object: dynamo guards on the
    # string, so layers with the same policy share one graph and a different policy gets its own (an object
    # attribute is not guarded: a second model with another policy would silently reuse the first one's graph).
    key = _policy_key(keep)
    what = f"in-graph selective checkpoint (keeps: input{', ' + key if key else ''})"
    surgery.set_attribute(
        model, STEP, layer, "quickloris_checkpoint_keep", key, "the policy the forward reads", path=path
    )
    surgery.set_attribute(
        model, STEP, layer, "forward", types.MethodType(_checkpointed_forward, layer), what, path=path
    )
    surgery.set_attribute(
        model,
        STEP,
        layer,
        "_gradient_checkpointing_func",
        call,
        why,
        path=path,
    )
    return True


def is_checkpointed_in_graph(layer: nn.Module) -> bool:
    """Whether `layer`'s checkpoint is traced into its graph (`checkpoint_in_graph`)."""
    from quickloris.parallel.offload import OffloadedCheckpoint

    func = getattr(layer, "_gradient_checkpointing_func", None)
    offloaded = isinstance(getattr(func, "__self__", None), OffloadedCheckpoint) and func.__name__ == "in_graph"
    return func is _pass_through or offloaded
