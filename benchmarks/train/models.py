"""Models and the timed training loop for `quickloris bench train` (device-agnostic, so CPU tests run it tiny).

One random-init base is built once, directly in NF4 on the device, layer by layer (an 8B model never exists in
16-bit: each weight is drawn, quantized and dropped before the next): `SharedBase` holds the NF4 weights and the
16-bit embeddings / norms / head. Both stacks are built on top of the *same* tensors, one at a time, on
meta-device skeletons (no weight memory) of the base's architecture (``LlamaForCausalLM``, or another family's
``*ForCausalLM``: `benchmarks.train.families`), with LoRA on every decoder linear under the family's names
(`quickloris.models.families`: Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` on both stacks):

* ``hf_*``: what a user runs today - the ``*ForCausalLM`` whose decoder linears are bitsandbytes ``Linear4bit``
  (``Params4bit`` objects wrapping the shared NF4 bytes: the same bytes a ``BitsAndBytesConfig`` load makes),
  PEFT ``get_peft_model`` LoRA (fp32 adapters, PEFT's default), transformers' non-reentrant gradient
  checkpointing, HF's full-logits loss; ``hf_compiled`` adds ``torch.compile`` of each decoder layer
  (static shapes: the baseline's best case for a fixed-shape run).
* ``ql_*``: `quickloris.parallel.compose.build_training_model` on the shared `NF4Tensor`s (no byte copied),
  same LoRA init (copied into PEFT's layers), checkpointing, ``ql_compiled`` adds the regional compile.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from benchmarks.loss.models import LLAMA_1B
from quickloris.parallel.offload import HostMemoryError, empty_pinned_cache
from quickloris.tensor.nf4_tensor import NF4Tensor

LLAMA_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=False,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
)
TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=True,
)
SHAPES = {"llama-3.2-1b": LLAMA_1B, "llama-3.1-8b": LLAMA_8B, "tiny": TINY}
STACKS = ("hf_eager", "hf_compiled", "ql_eager", "ql_compiled")


@dataclass
class SharedBase:
    config: Any
    nf4: dict[str, NF4Tensor] = field(default_factory=dict)  # "model.layers.0.mlp.up_proj" -> weight
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # state-dict name -> tensor
    architecture: str = "LlamaForCausalLM"  # the transformers *ForCausalLM class both stacks are built as

    def targets(self) -> list[str]:
        """LoRA targets: every decoder linear, under the family's names (both stacks use these)."""
        from quickloris.models.families import family_of

        return list(family_of(self.config).linears)

    def param_count(self) -> int:
        """Parameters of the model (a tied head counted once), as a checkpoint of this shape has them."""
        return sum(t.shape.numel() for t in self.nf4.values()) + sum(t.numel() for t in self.dense.values())


def build_base(
    shape: dict,
    *,
    device: str,
    architecture: str = "LlamaForCausalLM",
    dtype=torch.bfloat16,
    seed: int = 0,
    std: float = 0.02,
) -> SharedBase:
    """A random-init `architecture` (a transformers ``*ForCausalLM``, configured by `shape`): decoder linears
    drawn one at a time and quantized to NF4 on `device`; norm weights at the value that makes them the identity
    (1, or 0 for Gemma's zero-centred ``(1 + w)`` norms), other tensors N(0, std)."""
    import transformers

    from quickloris.models.families import family_of

    cls = getattr(transformers, architecture)
    config = cls.config_class(**shape)
    config._attn_implementation = "sdpa"
    spec = family_of(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        skeleton = cls(config)
    prefix = spec.layers_path(skeleton) + "."
    base = SharedBase(config, architecture=architecture)
    for name, module in skeleton.named_modules():
        if type(module) is nn.Linear and name.startswith(prefix):
            w = torch.randn(module.out_features, module.in_features, generator=gen, device=device, dtype=dtype) * std
            base.nf4[name] = NF4Tensor.from_float(w)
            del w
    norm = torch.zeros if spec.norm == "rms_one_plus_fp32" else torch.ones
    for name, t in skeleton.state_dict().items():
        if name.rsplit(".weight", 1)[0] in base.nf4 or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        if name.endswith("norm.weight"):
            base.dense[name] = norm(t.shape, device=device, dtype=dtype)
        else:
            base.dense[name] = torch.randn(t.shape, generator=gen, device=device, dtype=dtype) * std
    return base


def _materialise_buffers(model: nn.Module, device: str) -> None:
    """The buffers a meta-device skeleton leaves on meta (not in the state dict): rotary tables (the module is
    rebuilt from the config) and Gemma's embedding scale (its recorded float); anything else is an error."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent, _, child = name.rpartition(".")
            with torch.device("cpu"):  # the tables computed on CPU, as from_pretrained does, then moved
                rebuilt = type(module)(config=model.config)
            setattr(model.get_submodule(parent) if parent else model, child, rebuilt.to(device))
        elif hasattr(module, "scalar_embed_scale") and getattr(module, "embed_scale", None) is not None:
            module.embed_scale = torch.tensor(float(module.scalar_embed_scale), device=device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{type(model).__name__}: no value for {left[:5]} (extend _materialise_buffers)")


def _skeleton(base: SharedBase, device: str, linear_factory) -> nn.Module:
    import copy

    import transformers

    # a config of its own: quickloris' set_attention writes the backend into model.config, which must not carry
    # over to the stack built next on this base (the HF stacks would then run quickloris' attention)
    config = copy.deepcopy(base.config)
    with torch.device("meta"):
        model = getattr(transformers, base.architecture)(config)
    for name, nf4 in base.nf4.items():
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, linear_factory(nf4))
    model.load_state_dict(base.dense, strict=False, assign=True)
    model.tie_weights()
    _materialise_buffers(model, device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def hf_stack(
    base: SharedBase, *, device: str, compiled: bool, r: int = 16, alpha: int = 32, compile_backend: str = "inductor"
) -> nn.Module:
    """HF + PEFT + bitsandbytes on the shared NF4 bytes (see the module docstring)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    def linear4bit(nf4: NF4Tensor) -> nn.Module:
        lin = bnb.nn.Linear4bit(
            nf4.shape[1],
            nf4.shape[0],
            bias=False,
            compute_dtype=nf4.dtype,
            quant_type="nf4",
            compress_statistics=nf4.nested,
            device="meta",
        )
        lin.weight = nf4.to_bnb()
        lin.weight.module = lin
        return lin

    from quickloris.models.families import decoder_layers

    model = _skeleton(base, device, linear4bit)
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"hf stack: attention {model.config._attn_implementation!r}, not sdpa")
    model.is_loaded_in_4bit = True
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=base.targets()))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compiled:  # not fullgraph: a break in bitsandbytes / PEFT code is the baseline's to have (counted, not fatal)
        for layer in decoder_layers(model):
            layer.compile(dynamic=False, backend=compile_backend)
    return model.train()


def ql_stack(
    base: SharedBase,
    *,
    device: str,
    compiled: bool,
    r: int = 16,
    alpha: int = 32,
    compile_backend: str = "inductor",
    attention: str = "sdpa",
    offload: bool = False,
    skip_last: int = 0,
    mlp_chunks: int = 1,
    checkpoint_in_graph: bool = False,
    checkpoint_keep: list[str] | None = None,
    compile_mode: str | None = None,
) -> nn.Module:
    """quickloris' stack on the shared NF4 tensors (see the module docstring); `skip_last` decoder layers are left
    un-checkpointed, `mlp_chunks` tiles each MLP over checkpointed sequence chunks, `checkpoint_in_graph` traces the
    checkpoint into each compiled layer, keeping `checkpoint_keep` besides the layer input
    (`quickloris.parallel.compile`); `compile_mode` is torch.compile's mode of the regions."""
    from quickloris.models.prepare import QLoRAConfig
    from quickloris.parallel.compile import CompileConfig
    from quickloris.parallel.compose import CheckpointConfig, build_training_model

    def holder(nf4: NF4Tensor) -> nn.Module:
        lin = nn.Linear(nf4.shape[1], nf4.shape[0], bias=False, device="meta")
        lin.weight = nn.Parameter(nf4, requires_grad=False)
        return lin

    model = _skeleton(base, device, holder)
    return build_training_model(
        model,
        QLoRAConfig(r=r, lora_alpha=alpha, quantize=False, attention=attention, target_modules=base.targets()),
        checkpointing=CheckpointConfig(offload=offload, skip_last=skip_last, mlp_chunks=mlp_chunks),
        compile=CompileConfig(
            backend=compile_backend,
            mode=compile_mode,
            checkpoint_in_graph=checkpoint_in_graph,
            checkpoint_keep=list(checkpoint_keep or []),
        )
        if compiled
        else None,
    )


def lora_init_of(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The quickloris model's LoRA matrices by module path (CPU copies)."""
    from quickloris.models.adapters import lora_layers

    return {name: tuple(t.detach().cpu().clone() for t in m.lora_weights) for name, m in lora_layers(model).items()}


def apply_lora_init(init: dict[str, tuple[torch.Tensor, torch.Tensor]], model: nn.Module) -> None:
    """Give `model` (quickloris or PEFT) these LoRA matrices: every stack starts from the same adapter."""
    from quickloris.nn.qlora_linear import QLoRALinear

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        for name, (A, B) in init.items():
            layer = inner.get_submodule(name)
            if isinstance(layer, QLoRALinear):
                dst = layer.lora_weights
            else:
                dst = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
            dst[0].copy_(A)
            dst[1].copy_(B)


def make_batches(n: int, batch: int, seq: int, vocab: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def release(device: str) -> None:
    """Frees what the last run left: its objects, the GPU's cached blocks, and the pinned host buffers offloaded
    checkpoints used (the caching host allocator never gives them back by itself: a longer trial would pin beside
    them)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        empty_pinned_cache()


def train_run(
    model: nn.Module, batches: list[torch.Tensor], *, device: str, lr: float = 1e-4, timed_from: int = 3
) -> dict[str, Any]:
    """Steps of AdamW on `batches`; tokens/s = median over steps `timed_from`.. (1-based), peak memory.

    ``host_issue_s``: per step, the host's time until the step's last call returned, before waiting on the GPU.
    Issue time well below the step's time means the host ran ahead of the GPU (GPU-bound). Issue time close to it
    means the GPU waited on the host, or the host was blocked by a full launch queue (CUDA blocks once about a
    thousand launches are pending); a profile (`benchmarks/train/probe_speed.py`) tells the two apart. A
    synchronisation inside the step counts the wait before it as issue time: the compiled ql stacks have none,
    ``ql_eager``'s chunked loss has one (its label check), other stacks' are not checked."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    release(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    losses, times, issued = [], [], []
    tokens = batches[0].numel()
    for ids in batches:
        ids = ids.to(device)
        _sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        issued.append(time.perf_counter() - t0)
        losses.append(loss.item())  # synchronizes
        _sync(device)
        times.append(time.perf_counter() - t0)
    timed = times[timed_from - 1 :] or times
    out = {
        "losses": losses,
        "step_s": times,
        "host_issue_s": issued,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / statistics.median(timed),
        "first_step_s": times[0],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
    }
    del opt
    return out


def cap_gpu_memory(gib: float | None) -> None:
    """Let this process allocate at most `gib` GiB of the GPU (None: all of it): a larger GPU then measures what a
    smaller one fits (``torch.cuda.set_per_process_memory_fraction``)."""
    if gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total))


def one_step(
    model: nn.Module, opt, seq: int, vocab: int, *, device: str, steps: int = 1
) -> tuple[bool, float | None, str, list[float]]:
    """`steps` optimizer steps at batch 1 x `seq`: (fits, peak GiB, note, seconds of each step). The first step
    pays for compiling this length and growing the allocators' pools (pinned host memory included); later steps
    are what training at this length costs. Out-of-memory is caught and cleaned up."""
    release(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    fits, note, times = False, "out of memory", []
    try:
        for _ in range(steps):
            ids = torch.randint(0, vocab, (1, seq), device=device)
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_value = loss.item()  # synchronizes
            times.append(time.perf_counter() - t0)
            ids = loss = None  # noqa: F841 - the next step's graph does not stand beside this one's
        fits, note = True, f"loss {loss_value:.3f}, " + " / ".join(f"{t:.1f}" for t in times) + " s"
    except torch.cuda.OutOfMemoryError:
        pass
    except RuntimeError as e:  # offloaded checkpoints' pinned host memory running out, or pinning failing
        if not isinstance(e, HostMemoryError) and "out of memory" not in str(e):
            raise
        note = "out of memory (host)"
    ids = loss = None  # noqa: F841 - drop the graph before measuring and freeing
    opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if fits and device.startswith("cuda") else None
    release(device)
    return fits, peak, note, times
