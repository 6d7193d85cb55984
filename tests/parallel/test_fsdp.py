"""FSDP2 over 2 gloo ranks on CPU: a tiny Llama trains with per-step losses equal to one process on the same global
batches (token counts summed over ranks and accumulation steps), adapters saved from the sharded run load on one
process; weights that cannot be split are replicated (or refused); all features at once (bf16 mixed precision, CPU
offload, checkpointing, regional compile) run with no graph break; bad input raises clearly."""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickloris.models.adapters import load_adapter, read_adapter_config  # noqa: E402
from quickloris.models.prepare import QLoRAConfig, prepare_model  # noqa: E402
from quickloris.parallel import fsdp  # noqa: E402
from quickloris.parallel.compile import CompileConfig, compile_stats, reset_compile_stats  # noqa: E402
from quickloris.parallel.compose import CheckpointConfig, build_training_model  # noqa: E402
from quickloris.quant.nf4 import NF4State, nf4_code, signed_dynamic_map  # noqa: E402
from quickloris.tensor.nf4_tensor import NF4Tensor  # noqa: E402
from tests.helpers import require, within  # noqa: E402
from tests.parallel.dist_utils import run_ranks  # noqa: E402
from tests.tiny import tiny_model  # noqa: E402

V, STEPS, MICRO = 128, 3, 2
SGD_LR = 3e-3  # stable: the loss falls (at 3e-2 it rose on some seeds, amplifying rounding)


def _tiny(kv_heads: int = 2, tied: bool = False):
    return tiny_model(seed=0, vocab_size=V, hidden=256, kv_heads=kv_heads, head_dim=64, tie_word_embeddings=tied)


def _qcfg():
    return QLoRAConfig(r=4, init_lora_weights="random")


def _batches(seed: int, world: int):
    """batches[step][rank][micro] = (ids, labels): unequal label counts across ranks and micro-batches."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        step = []
        for _ in range(world):
            micro = []
            for _ in range(MICRO):
                ids = torch.randint(0, V, (2, 24), generator=g)
                labels = ids.clone()
                labels[:, : int(torch.randint(1, 20, (1,), generator=g))] = -100  # prompt tokens: no loss
                micro.append((ids, labels))
            step.append(micro)
        out.append(step)
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (sharded) DTensor (a collective: every rank calls it), a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def _run_steps(model, steps, lr=1e-3, distributed=True, device="cpu", optimizer="adamw") -> dict:
    """Optimizer steps; each entry of `steps` is this process' micro-batches. Returns {"losses": the global loss per
    step, "grads": the first step's full gradients, "after_first": the full weights after the first step, and for the
    one-process reference "scale": per trainable tensor, the sum over the first step's micro-batches of each one's
    gradient norm (what the rounding of their accumulation is relative to)}.

    distributed=False: the one-process reference (no collective: the other rank may be gone already).
    optimizer: "adamw" or "sgd" (whose update is lr x the gradient: weights then keep the gradients' scale).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.AdamW(params, lr=lr)
    out = {"losses": [], "grads": None, "after_first": None, "scale": {n: 0.0 for n, _ in named}}
    for micro in steps:
        micro = [(ids.to(device), lab.to(device)) for ids, lab in micro]
        labels = [lab for _, lab in micro]
        n = fsdp.global_num_items(labels) if distributed else sum(fsdp.count_targets(lab) for lab in labels)
        total = 0.0
        for ids, lab in micro:
            record = out["grads"] is None and not distributed
            before = {name: p.grad.clone() if p.grad is not None else 0 for name, p in named} if record else {}
            loss = model(input_ids=ids, labels=lab, num_items_in_batch=n).loss
            (loss * (fsdp.gradient_scale() if distributed else 1.0)).backward()
            total += float(loss.detach())
            if record:
                for name, p in named:
                    out["scale"][name] += float((p.grad - before[name]).norm())
        first = out["grads"] is None
        if first:
            out["grads"] = {name: _full(p.grad) for name, p in named}
        opt.step()
        opt.zero_grad(set_to_none=True)
        if first:
            out["after_first"] = {name: _full(p) for name, p in named}
        out["losses"].append(float(fsdp.all_reduce_sum(total)) if distributed else total)
    return out


def _parity_ranks(ctx, seed, folder, kv_heads, tied):
    torch.manual_seed(seed)
    model = build_training_model(
        _tiny(kv_heads, tied),
        _qcfg(),
        checkpointing=CheckpointConfig(),
        sharding=fsdp.FSDPConfig(mixed_precision=False),
        mesh=ctx.mesh,
    )
    summary = fsdp.sharding_summary(model)
    expect_replicated = (
        [] if kv_heads == 2 else [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in ("k", "v")]
    )
    assert summary["nf4_replicated"] == expect_replicated and summary["nf4_sharded"] == 14 - len(expect_replicated)
    layer = model.model.layers[0]
    assert type(layer.mlp.up_proj.weight.to_local()) is NF4Tensor  # sharded: a DTensor over an NF4 shard
    assert layer.mlp.up_proj.weight.to_local().shape == (256, 256)
    if kv_heads == 1:
        assert type(layer.self_attn.k_proj.weight) is NF4Tensor  # replicated: the whole weight on every rank
    batches = _batches(seed, ctx.world_size)
    # SGD: its update is lr x the gradient, so the weights carry the gradients' scale (AdamW's update does not: with
    # FSDP2's averaging left undone every gradient is halved, and AdamW's weights moved by almost nothing).
    run = _run_steps(model, [step[ctx.rank] for step in batches], lr=SGD_LR, device=ctx.device, optimizer="sgd")
    final = {n: _full(p) for n, p in model.named_parameters() if p.requires_grad}  # a collective
    model.save_pretrained(folder)  # a collective: every rank calls it, rank 0 writes
    if ctx.rank:
        return
    torch.manual_seed(seed)
    # Built on the CPU like the sharded model (shard_model moves it): the same LoRA initialisation (CPU RNG).
    reference = build_training_model(_tiny(kv_heads, tied), _qcfg(), checkpointing=CheckpointConfig()).to(ctx.device)
    ref = _run_steps(
        reference,
        [[mb for rank in step for mb in rank] for step in batches],
        lr=SGD_LR,
        distributed=False,
        device=ctx.device,
        optimizer="sgd",
    )
    u = 2.0**-24  # fp32 unit roundoff
    # The first step's gradients. Each micro-batch's forward and backward is the same arithmetic in both runs (same
    # weights, same shapes, one thread); only the accumulation differs: rank 0 holds micro-batches a, b, rank 1 c, d;
    # the sharded run sums (a + c) + (b + d) (each micro-batch reduced over the ranks: x2, then FSDP2's /2, both
    # exact), the reference ((a + b) + c) + d. Any order of a 4-term fp32 sum is within 3u sum_k |g_k| of the exact
    # one, so the two differ by <= 6u sum_k |g_k| per entry, <= 6u sum_k ||g_k|| per tensor.
    grads, ref_grads = run["grads"], ref["grads"]
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 2 * 7
    for name, g in ref_grads.items():
        within(float((grads[name] - g).norm()), 6 * u * ref["scale"][name], f"seed {seed}: gradient {name}")
    # The weights after that step, w - lr g: lr x the gradients' difference, plus at most one rounding of each entry
    # of w that the two runs may take to different neighbours (2u |w|).
    for name, w in ref["after_first"].items():
        bound = SGD_LR * 6 * u * ref["scale"][name] + 2 * u * float(w.norm())
        within(float((run["after_first"][name] - w).norm()), bound, f"seed {seed}: weights after step 1, {name}")
    # Per-step losses: a sum of positive per-token terms in another order (<= n u relative for n terms, ~100 here),
    # at weights that agree to rounding.
    assert run["losses"] == pytest.approx(ref["losses"], rel=1e-5), (run["losses"], ref["losses"])
    # The saved adapter is the sharded model's weights, bit for bit.
    fresh = prepare_model(_tiny(kv_heads, tied), _qcfg())
    load_adapter(fresh, folder)
    saved = {n: p.detach() for n, p in fresh.named_parameters() if p.requires_grad}
    assert saved.keys() == final.keys()
    assert all(torch.equal(saved[n], final[n]) for n in final)
    assert read_adapter_config(folder)["r"] == 4


@pytest.mark.parametrize("kv_heads,tied", [(2, False), (1, True)], ids=["all-sharded", "kv-replicated-tied"])
def test_two_ranks_match_one_process_and_save_adapters(seed, tmp_path, kv_heads, tied):
    run_ranks(_parity_ranks, 2, seed, str(tmp_path / "adapter"), kv_heads, tied)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and sorted(cfg["target_modules"]) == sorted(QLoRAConfig().target_modules)


def _all_features_ranks(ctx, seed, keep=None):
    """keep: None (transformers' eager checkpoint around each compiled layer) or the in-graph checkpoint's keep list."""
    torch.manual_seed(seed)
    reset_compile_stats()
    in_graph = dict(checkpoint_in_graph=keep is not None, checkpoint_keep=keep or [])
    compile_cfg = (
        CompileConfig(**in_graph)
        if ctx.device.type == "cuda"
        else CompileConfig(backend="aot_eager", dynamic=False, norm=False, loss=False, **in_graph)
    )  # CPU: layers only
    model = build_training_model(
        _tiny(),
        _qcfg(),
        checkpointing=CheckpointConfig(),
        sharding=fsdp.FSDPConfig(cpu_offload=True),
        mesh=ctx.mesh,
        compile=compile_cfg,
    )
    lora = model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert lora.dtype == torch.float32  # fp32 master weights; gathered and computed in bf16
    batches = _batches(seed, ctx.world_size)[:2]
    run = _run_steps(model, [step[ctx.rank] for step in batches], device=ctx.device)
    assert compile_stats()["graph_breaks"] == 0
    assert lora.grad is None and lora.to_local().dtype == torch.float32
    if ctx.rank == 0:
        torch.manual_seed(seed)
        reference = build_training_model(_tiny(), _qcfg(), checkpointing=CheckpointConfig()).to(ctx.device)
        ref = _run_steps(
            reference, [[mb for rank in step for mb in rank] for step in batches], distributed=False, device=ctx.device
        )
        # bf16 compute (8-bit mantissa, u = 2^-9) vs fp32: the mean token loss agrees to a few u. (Their gradients
        # do not, entry by entry: on random tokens each is a nearly cancelling sum of per-token terms, each rounded
        # to bf16; the fp32 parity test above checks the gradients and their scale.)
        assert run["losses"] == pytest.approx(ref["losses"], rel=2e-2)


def test_two_ranks_bf16_offload_checkpointing_compile(seed):
    run_ranks(_all_features_ranks, 2, seed, timeout=240)


def test_two_ranks_in_graph_checkpoint_keeping_attention(seed):
    """The in-graph selective checkpoint composes with FSDP2's gathered parameters and CPU offload."""
    run_ranks(_all_features_ranks, 2, seed, ["attention"], timeout=240)


@pytest.mark.multigpu
@pytest.mark.parametrize("kv_heads,tied", [(2, False), (1, True)], ids=["all-sharded", "kv-replicated-tied"])
def test_two_gpus_match_one_gpu_and_save_adapters(seed, tmp_path, kv_heads, tied):
    run_ranks(_parity_ranks, 2, seed, str(tmp_path / "adapter"), kv_heads, tied, device="cuda", timeout=300)


@pytest.mark.multigpu
@pytest.mark.parametrize("keep", [None, ["attention"]], ids=["eager-checkpoint", "in-graph-keep-attention"])
def test_two_gpus_bf16_offload_checkpointing_inductor_compile(seed, keep):
    run_ranks(_all_features_ranks, 2, seed, keep, device="cuda", timeout=400)  # pinned offload, NCCL, inductor


def _accelerate_ranks(ctx):
    """accelerate's FSDP2 preparation must find the (renamed) decoder-layer class of a model sharded already."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    model = build_training_model(
        _tiny(), _qcfg(), checkpointing=CheckpointConfig(), sharding=fsdp.FSDPConfig(), mesh=ctx.mesh
    )
    cfg = fsdp.trainer_fsdp_config(model)
    assert cfg["fsdp_version"] == 2 and cfg["transformer_layer_cls_to_wrap"] == ["FSDPLlamaDecoderLayer"]
    plain = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    with pytest.raises(ValueError, match="Could not find the transformer layer class LlamaDecoderLayer"):
        plain.set_auto_wrap_policy(model)  # what the Trainer did with fsdp_config={"fsdp_version": 2}
    ours = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=cfg["transformer_layer_cls_to_wrap"],
    )
    ours.set_auto_wrap_policy(model)
    assert type(model.model.layers[0]) in ours.auto_wrap_policy.keywords["transformer_layer_cls"]
    args = transformers.TrainingArguments(output_dir="unused", fsdp=True, fsdp_config=cfg, use_cpu=True, report_to=[])
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == ["FSDPLlamaDecoderLayer"]


def test_trainer_fsdp_config_names_the_sharded_layer_class():
    require("accelerate")
    run_ranks(_accelerate_ranks, 1, timeout=120)
    with pytest.raises(ValueError, match="is not sharded"):
        fsdp.trainer_fsdp_config(_tiny())


# ------------------------------------------------------------------------------------------------------------
# bad input (no process group needed: refused before any collective)


class FakeMesh:
    ndim = 1
    device_type = "cpu"

    def __init__(self, n):
        self.n = n

    def size(self):
        return self.n


def test_bitsandbytes_params4bit_is_refused():
    bnb = require("bitsandbytes")
    model = _tiny()
    lin = model.model.layers[0].mlp.up_proj
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.detach(), requires_grad=False, quant_type="nf4")._quantize("cpu")
    model.model.layers[0].mlp.up_proj = q
    with pytest.raises(TypeError, match="Params4bit.*prepare_model"):
        fsdp.shard_model(model, mesh=FakeMesh(2))


def test_unprepared_sharded_twice_and_unshardable_errors():
    with pytest.raises(ValueError, match="not prepared by quickloris.prepare_model"):
        fsdp.shard_model(_tiny(), mesh=FakeMesh(2))
    model = prepare_model(_tiny(kv_heads=1), _qcfg())
    with pytest.raises(ValueError, match=r"4 NF4 weight\(s\) cannot be split over 2 ranks.*k_proj.weight \[64, 256\]"):
        fsdp.shard_model(model, fsdp.FSDPConfig(unshardable="error"), FakeMesh(2))
    with pytest.raises(ValueError, match="cannot be split over 3 ranks"):  # 3 divides no layer of this model
        fsdp.shard_model(prepare_model(_tiny(), _qcfg()), fsdp.FSDPConfig(unshardable="error"), FakeMesh(3))
    with pytest.raises(ValueError, match="FSDPConfig.unshardable"):
        fsdp.FSDPConfig(unshardable="pad")
    with pytest.raises(ValueError, match="param_dtype"):
        fsdp.FSDPConfig(param_dtype="int8")
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        fsdp.sharding_plan(model, 0)
    with pytest.raises(ValueError, match="at least one micro-batch"):
        fsdp.global_num_items([])
    with pytest.raises(ValueError, match="was not sharded"):
        fsdp.sharding_summary(model)


def _nf4_of_shape(shape):
    """An NF4Tensor of `shape` with uninitialised bytes (only its shape and format matter here)."""
    n = shape[0] * shape[1]
    nb = -(-n // 64)
    state = NF4State(
        shape=torch.Size(shape),
        dtype=torch.bfloat16,
        blocksize=64,
        absmax=torch.empty(nb, dtype=torch.uint8),
        code=nf4_code(),
        offset=torch.zeros(()),
        absmax2=torch.empty(-(-nb // 256)),
        code2=signed_dynamic_map(),
    )
    return NF4Tensor(torch.empty((n + 1) // 2, 1, dtype=torch.uint8), state)


def test_sharding_plan_of_real_shapes():
    llama8b = {
        "q": (4096, 4096),
        "k": (1024, 4096),
        "v": (1024, 4096),
        "o": (4096, 4096),
        "gate": (14336, 4096),
        "up": (14336, 4096),
        "down": (4096, 14336),
    }
    smollm2 = {
        "q": (576, 576),
        "k": (192, 576),
        "v": (192, 576),
        "o": (576, 576),
        "gate": (1536, 576),
        "up": (1536, 576),
        "down": (576, 1536),
    }
    for world in (2, 4, 8):
        assert all(_nf4_of_shape(s).shardable(world) for s in llama8b.values()), world
    shard2 = {k for k, s in smollm2.items() if _nf4_of_shape(s).shardable(2)}
    assert shard2 == {"gate", "up", "down"}  # SmolLM2-135M on 2 ranks: attention replicated, MLP sharded
    model = prepare_model(_tiny(kv_heads=1), _qcfg())
    plan = fsdp.sharding_plan(model, 2)
    assert plan["model.layers.0.self_attn.k_proj.weight"] == "replicate"
    assert plan["model.layers.0.mlp.down_proj.weight"] == "shard"
    assert set(fsdp.sharding_plan(model, 1).values()) == {"replicate"}  # one rank: NF4 weights stay outside FSDP2


def test_count_targets_and_single_process_helpers():
    labels = torch.tensor([[-100, -100, 5, 6], [1, 2, 3, -100]])
    assert int(fsdp.count_targets(labels)) == 2 + 2  # the first position is never a target
    assert int(fsdp.global_num_items([labels, labels])) == 8  # no process group: this process' count
    assert fsdp.gradient_scale() == 1.0
    assert float(fsdp.all_reduce_sum(2.5)) == 2.5
    model = copy.deepcopy(prepare_model(_tiny(), _qcfg()))
    assert not fsdp.is_sharded(model)
