"""Regional compile of the whole training stack (QLoRA + checkpointing + compiled layers/norm/loss): 0 graph
breaks, few graphs over 60 steps of random sequence lengths, per-step losses equal to the eager run."""

from __future__ import annotations

import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickloris.models.prepare import QLoRAConfig  # noqa: E402
from quickloris.parallel.compile import CompileConfig, compile_model, compile_stats, reset_compile_stats  # noqa: E402
from quickloris.parallel.compiled_loss import is_compiled_loss_enabled  # noqa: E402
from quickloris.parallel.compose import CheckpointConfig, apply_checkpointing, build_training_model  # noqa: E402
from tests.helpers import within  # noqa: E402
from tests.tiny import tiny_model  # noqa: E402

V = 101


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: dynamo's per-function recompile limit (8) counts every model compiled in the
    process, and these tests compile many models (backends, policies) through the same layer forward."""
    torch._dynamo.reset()


def _tiny():
    return tiny_model(vocab_size=V)


def _chains(gen, lengths):
    """Sequences that follow one fixed random permutation of the vocabulary (next = perm[current]): a task the
    model learns. Pure noise is a bad yardstick for "losses equal eager": at its entropy floor the gradients are
    noise around zero and AdamW, which normalises each gradient entry, turns ulp-level differences between the
    eager and compiled arithmetic into O(lr) updates (seen: 3e-3 relative apart after 40 steps)."""
    perm = torch.randperm(V, generator=gen)
    out = []
    for n in lengths:
        ids = [int(torch.randint(0, V, (1,), generator=gen))]
        for _ in range(n - 1):
            ids.append(int(perm[ids[-1]]))
        out.append(torch.tensor([ids]))
    return out


def _train(model, batches, lr=2e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for ids in batches:
        labels = ids.clone()
        labels[:, : ids.shape[1] // 4] = -100  # a "prompt"
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _train_alongside(eager, compiled, batches, lr=1e-3):
    """Eager trains with AdamW; before each step the compiled model takes eager's LoRA weights, so both compute every
    step from the same parameters. Returns (eager's losses, compiled's losses, the largest difference of one
    parameter's gradient, norm-wise, relative to the step's whole gradient). Two free-running trajectories are the
    wrong yardstick: AdamW normalises each gradient entry, so ulp-level differences in near-zero entries become
    O(lr) updates that add up (seed 2999038044: 6e-4 relative apart by step 54)."""
    named = [(n, p) for n, p in eager.named_parameters() if p.requires_grad]
    twin = [(n, p) for n, p in compiled.named_parameters() if p.requires_grad]
    assert [n for n, _ in named] == [n for n, _ in twin] and named
    opt = torch.optim.AdamW([p for _, p in named], lr=lr)
    want, got, grad_rel = [], [], 0.0
    for ids in batches:
        labels = ids.clone()
        labels[:, : ids.shape[1] // 4] = -100  # a "prompt"
        with torch.no_grad():
            for (_, c), (_, e) in zip(twin, named, strict=True):
                c.copy_(e)
        for model, losses in ((eager, want), (compiled, got)):
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            losses.append(loss.item())
        # relative to the whole step's gradient: one parameter's gradient can be ~1e-7 of the others' (seen: a
        # k_proj lora_B at 4e-9 against ~1e-2), a cancelling sum whose reordering error is relative to its terms
        total = torch.cat([e.grad.flatten() for _, e in named]).norm()
        for (_, c), (_, e) in zip(twin, named, strict=True):
            grad_rel = max(grad_rel, float((c.grad - e.grad).norm() / total))
        opt.step()
        opt.zero_grad(set_to_none=True)
        compiled.zero_grad(set_to_none=True)
    return want, got, grad_rel


@pytest.mark.parametrize("in_graph", [False, True], ids=["eager_checkpoint", "checkpoint_in_graph"])
def test_60_steps_random_lengths_few_graphs_same_losses(seed, in_graph):
    """The issue's check: 60 steps, lengths uniform in [64, 2048]: 0 breaks, <= 8 graphs, losses = eager's."""
    base = _tiny()
    gen = torch.Generator().manual_seed(seed)
    batches = _chains(gen, [int(torch.randint(64, 2049, (1,), generator=gen)) for _ in range(60)])
    qcfg = QLoRAConfig(r=8, lora_alpha=16, init_lora_weights="random")
    torch.manual_seed(seed)  # the same random LoRA init in both
    eager = build_training_model(copy.deepcopy(base), qcfg)
    torch.manual_seed(seed)
    compiled = build_training_model(
        copy.deepcopy(base), qcfg, compile=CompileConfig(backend="aot_eager", checkpoint_in_graph=in_graph)
    )
    assert is_compiled_loss_enabled(compiled) and compiled.model.layers[0].gradient_checkpointing
    reset_compile_stats()
    want, got, grad_rel = _train_alongside(eager, compiled, batches, lr=1e-3)
    stats = compile_stats()
    loss_rel = max(abs(a - b) / abs(b) for a, b in zip(got, want, strict=True))
    print(
        f"60 steps, lengths {min(b.shape[1] for b in batches)}..{max(b.shape[1] for b in batches)}: {stats}; "
        f"loss {want[0]:.3f} -> {want[-1]:.3f}; largest relative difference: loss {loss_rel:.1e}, gradient "
        f"{grad_rel:.1e}"
    )
    assert stats["graph_breaks"] == 0
    assert stats["unique_graphs"] == 3, stats  # decoder layer, final norm, loss chunk: dynamic shapes, no recompile
    assert sum(want[-10:]) < sum(want[:10]) - 0.2, want  # it learns (the mean falls 0.06-0.15 over seeds 0-29)
    # fp32 both (u = 6e-8), the compiled graphs reorder the same arithmetic from the same parameters: each step's
    # loss (a mean of <= 1536 token losses through 2 layers) within 1e-5 relative, each LoRA gradient within 1e-4
    # of the step's gradient norm (sums over <= 2048 rows)
    assert loss_rel <= 1e-5 and grad_rel <= 1e-4, (loss_rel, grad_rel)


def test_checkpointed_compiled_step_equals_plain_eager_step(seed):
    """Checkpointing (recompute inside backward) and compile change nothing in loss or LoRA gradients."""
    base = _tiny()
    ids = torch.randint(0, V, (2, 150))
    qcfg = QLoRAConfig(r=4, init_lora_weights="random", lora_dropout=0.2)
    out = {}
    for name, ckpt, comp in (("plain", False, None), ("ckpt+compile", True, CompileConfig(backend="aot_eager"))):
        torch.manual_seed(seed)  # the same LoRA init
        model = build_training_model(copy.deepcopy(base), qcfg, checkpointing=CheckpointConfig(ckpt), compile=comp)
        torch.manual_seed(7)  # the same dropout masks
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        out[name] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(out["ckpt+compile"][0], out["plain"][0], rtol=1e-5, atol=1e-6)
    assert out["plain"][1].keys() == out["ckpt+compile"][1].keys() and len(out["plain"][1]) == 2 * 2 * 7
    for n, g in out["plain"][1].items():
        torch.testing.assert_close(out["ckpt+compile"][1][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_checkpointing_options_and_errors():
    model = build_training_model(_tiny(), QLoRAConfig(r=2), checkpointing=CheckpointConfig(every_n_layers=2))
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False]
    apply_checkpointing(model, CheckpointConfig(gradient_checkpointing=False))
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)
    with pytest.raises(ValueError, match="every_n_layers"):
        CheckpointConfig(every_n_layers=0)
    with pytest.raises(ValueError, match="offload"):
        apply_checkpointing(model, CheckpointConfig(offload=True))
    # unset checkpointing is off on the CPU: the offload is refused, not silently dropped (`quickloris train`'s
    # default); so is offload with checkpointing off, whatever the device (here a module on the meta device)
    with pytest.raises(ValueError, match="on the CPU already"):
        apply_checkpointing(model, CheckpointConfig(gradient_checkpointing=None, offload=True))
    with pytest.raises(ValueError, match=r"^CheckpointConfig.offload .* needs gradient_checkpointing on$"):
        apply_checkpointing(
            torch.nn.Linear(2, 2, device="meta"), CheckpointConfig(gradient_checkpointing=False, offload=True)
        )
    with pytest.raises(ValueError, match="backend"):
        CompileConfig(backend="")
    compile_model(model, CompileConfig(backend="aot_eager"))
    with pytest.raises(ValueError, match="compiled already"):
        compile_model(model, CompileConfig(backend="aot_eager"))


def _decoder_saved_bytes(model, ids) -> int:
    """Bytes autograd saves for backward in one decoder forward (the loss is left out: its vjp refuses hooks)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.model(input_ids=ids).last_hidden_state
    out.float().pow(2).mean().backward()
    return total


def test_checkpoint_moves_into_the_compiled_layer_and_still_saves_only_inputs(seed):
    """With `checkpoint_in_graph`, each checkpointed layer's checkpoint is traced into its graph: transformers'
    wrapper becomes a pass-through, the layer saves a fraction of what an un-checkpointed compiled layer saves,
    gradients equal the eager checkpointed model's; `skip_last` layers keep their activations."""
    from quickloris.parallel.compile import is_checkpointed_in_graph

    base = _tiny()
    base.model.layers.append(copy.deepcopy(base.model.layers[0]))  # 3 layers
    base.config.num_hidden_layers = 3
    ids = torch.randint(0, V, (2, 300))
    qcfg = QLoRAConfig(r=4, init_lora_weights="random")
    models, saved = {}, {}
    for name, ckpt, comp in (
        ("eager", CheckpointConfig(), None),
        ("default", CheckpointConfig(), CompileConfig(backend="aot_eager", loss=False)),
        ("in_graph", CheckpointConfig(), CompileConfig(backend="aot_eager", loss=False, checkpoint_in_graph=True)),
        (
            "skip_last",
            CheckpointConfig(skip_last=1),
            CompileConfig(backend="aot_eager", loss=False, checkpoint_in_graph=True),
        ),
        ("none", CheckpointConfig(False), CompileConfig(backend="aot_eager", loss=False)),
    ):
        torch.manual_seed(seed)
        models[name] = build_training_model(copy.deepcopy(base), qcfg, checkpointing=ckpt, compile=comp)
        reset_compile_stats()
        saved[name] = _decoder_saved_bytes(models[name], ids)
        if comp is not None:
            assert compile_stats()["graph_breaks"] == 0
    layers = lambda name: models[name].model.layers  # noqa: E731
    assert [is_checkpointed_in_graph(m) for m in layers("in_graph")] == [True] * 3
    assert [is_checkpointed_in_graph(m) for m in layers("skip_last")] == [True, True, False]
    assert [m.gradient_checkpointing for m in layers("skip_last")] == [True, True, False]
    assert models["in_graph"].is_gradient_checkpointing and not any(map(is_checkpointed_in_graph, layers("eager")))
    assert not any(map(is_checkpointed_in_graph, layers("default")))  # opt-in: the eager checkpoint by default
    per_layer_full = (saved["none"] - saved["in_graph"]) / 3
    assert saved["in_graph"] < saved["none"] / 3, saved
    assert saved["skip_last"] == pytest.approx(saved["in_graph"] + per_layer_full, rel=0.05), saved
    for n, p in models["eager"].named_parameters():
        if p.grad is not None:
            for other in ("default", "in_graph", "skip_last"):
                torch.testing.assert_close(models[other].get_parameter(n).grad, p.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="skip_last"):
        CheckpointConfig(skip_last=-1)
    with pytest.raises(ValueError, match="exceeds"):
        apply_checkpointing(_tiny(), CheckpointConfig(skip_last=3))


_GRAPHS: dict[str, list] = {"fw": [], "bw": []}


def _capturing_backend() -> str:
    """A dynamo backend that partitions like inductor (min-cut, honouring checkpoint tags) and keeps the forward and
    backward graphs in `_GRAPHS` to be read."""
    from tests.helpers import min_cut_backend

    return min_cut_backend(_GRAPHS)


def _targets(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize(
    "keep",
    [[], ["attention"], ["linears"], ["attention", "linears"]],
    ids=["full", "attention", "linears", "attention+linears"],
)
def test_in_graph_checkpoint_policy_decides_what_backward_replays(seed, keep):
    """The in-graph checkpoint's explicit policy, read off the partitioned backward graph of a decoder layer (7
    QLoRA linears, LoRA dropout on): the dropout masks are drawn once, in forward, never replayed; `linears` kept
    means backward runs only the 7 input-gradient NF4 matmuls (no forward GEMM replayed), `attention` kept means no
    attention forward in backward. Gradients equal the eager checkpoint's (same masks, same numbers)."""
    base = _tiny()
    ids = torch.randint(0, V, (2, 150))
    qcfg = QLoRAConfig(r=4, init_lora_weights="random", lora_dropout=0.3)
    backend = _capturing_backend()
    _GRAPHS["fw"].clear(), _GRAPHS["bw"].clear()
    grads = {}
    for name, comp in (
        ("eager", None),
        (
            "capture",
            CompileConfig(backend=backend, loss=False, norm=False, checkpoint_in_graph=True, checkpoint_keep=keep),
        ),
        ("aot_eager", CompileConfig(backend="aot_eager", loss=False, checkpoint_in_graph=True, checkpoint_keep=keep)),
    ):
        torch.manual_seed(seed)
        model = build_training_model(copy.deepcopy(base), qcfg, compile=comp)
        torch.manual_seed(7)  # the same dropout masks
        model(input_ids=ids, labels=ids).loss.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    # One graph pair, shared by both layers; a policy seen before in this process still gets its own graph.
    assert len(_GRAPHS["fw"]) == len(_GRAPHS["bw"]) == 1
    fw, bw = _targets(_GRAPHS["fw"][0]), _targets(_GRAPHS["bw"][0])
    assert sum("rand" in t for t in fw) == 7 and not any("rand" in t for t in bw)  # masks saved, not redrawn
    assert sum("nf4_matmul" in t for t in fw) == 7
    replayed_gemms = sum("nf4_matmul" in t for t in bw) - 7  # 7 are the dx = g @ W matmuls
    attention_fwd_in_bw = sum(("attention" in t and "backward" not in t) or "run_with_rng_state" in t for t in bw)
    assert (replayed_gemms == 0) == ("linears" in keep), (replayed_gemms, keep)
    assert (attention_fwd_in_bw == 0) == ("attention" in keep), (bw, keep)
    assert set(grads["capture"]) == set(grads["eager"]) and len(grads["eager"]) == 28
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads["aot_eager"][n], g, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grads["capture"][n], g, rtol=1e-4, atol=1e-6)


def test_checkpoint_policy_per_op():
    """The policy's decision for each kind of op: random draws always saved (attention only when its dropout_p is
    not 0), attention kernels (fused SDPA, flex) and NF4 matmuls saved when asked for, the rest replayed."""
    from torch._higher_order_ops.flex_attention import flex_attention
    from torch.utils.checkpoint import CheckpointPolicy

    from quickloris.parallel.compile import checkpoint_policy

    aten = torch.ops.aten
    x = torch.randn(1, 2, 8, 4)
    sdpa = aten._scaled_dot_product_flash_attention_for_cpu.default
    calls = {
        "rand": (aten.rand_like.default, (x,), {}),
        "mm": (aten.mm.default, (x[0, 0], x[0, 0].T), {}),
        "sdpa": (sdpa, (x, x, x), {}),
        "sdpa_dropout": (sdpa, (x, x, x, 0.1), {}),
        "sdpa_dropout_kw": (sdpa, (x, x, x), {"dropout_p": 0.1}),
        "flex": (flex_attention, (x, x, x), {}),
        "nf4": (torch.ops.quickloris.nf4_matmul.default, (), {}),
    }
    saved = {}
    for keep in ([], ["attention"], ["linears"], ["attention", "linears"]):
        policy = checkpoint_policy(keep)
        saved[tuple(keep)] = {
            name
            for name, (op, args, kwargs) in calls.items()
            if policy(None, op, *args, **kwargs) == CheckpointPolicy.MUST_SAVE
        }
    always = {"rand", "sdpa_dropout", "sdpa_dropout_kw"}
    assert saved[()] == always
    assert saved[("attention",)] == always | {"sdpa", "flex"}
    assert saved[("linears",)] == always | {"nf4"}
    assert saved[("attention", "linears")] == always | {"sdpa", "flex", "nf4"}


def test_checkpoint_keep_is_checked():
    from quickloris.parallel.compile import checkpoint_in_graph

    for bad in (["everything"], "linears"):
        with pytest.raises(ValueError, match="checkpoint_keep"):
            CompileConfig(checkpoint_in_graph=True, checkpoint_keep=bad)
    with pytest.raises(ValueError, match="CompileConfig.checkpoint_keep=.'linears'. needs checkpoint_in_graph"):
        CompileConfig(checkpoint_keep=["linears"])
    with pytest.raises(ValueError, match="checkpoint_keep"):
        tiny = _tiny()
        checkpoint_in_graph(tiny, tiny.model.layers[0], ["mlp"])


def _scalar_cpp_under_default_capability(request) -> None:
    if os.environ.get("ATEN_CPU_CAPABILITY") == "default":
        # Inductor picks its C++ vector width from the CPU, but ATen then ships no at::vec headers: scalar C++ code.
        # (Through the config's own patch: a monkeypatch of the `cpp` sub-config proxy leaves inductor unable to
        # read the setting back, "cpp.simdlen does not exist".)
        patch = torch._inductor.config.patch({"cpp.vec_isa_ok": False})
        patch.__enter__()
        request.addfinalizer(lambda: patch.__exit__(None, None, None))


def test_inductor_on_cpu_small_step_matches_eager(seed, request):
    """Inductor (the GPU default) in CI: each decoder layer, the final norm and the loss chunk compiled to C++ by
    inductor, one training step of one small batch, fixed shapes (one compile, ~10-20 s on 2 cores): 0 graph breaks,
    the loss and every LoRA gradient equal eager's to fp32 rounding. Inductor fuses and reorders the same fp32
    arithmetic (u = 6e-8), so the loss agrees to a few u. A LoRA gradient is a sum over tokens of terms that largely
    cancel at a random init (kappa = sum |terms| / |sum| of 1e2-1e3 here: measured <= 2e-5 of its norm), so per tensor
    within 1e-3 of its norm (room for kappa up to ~1e4); a wrong kernel (a lost term, a wrong derivative) moves it
    by O(1)."""
    _scalar_cpp_under_default_capability(request)
    base = _tiny()
    ids = torch.randint(0, V, (2, 48))
    qcfg = QLoRAConfig(r=4, init_lora_weights="random")
    out = {}
    for name, comp in (("eager", None), ("inductor", CompileConfig(backend="inductor", dynamic=False))):
        torch.manual_seed(seed)  # the same LoRA init
        model = build_training_model(copy.deepcopy(base), qcfg, compile=comp)
        reset_compile_stats()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if comp is not None:
            stats = compile_stats()
            assert stats["graph_breaks"] == 0 and stats["unique_graphs"] >= 3, stats  # layer, norm, loss chunk
        out[name] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(out["inductor"][0], out["eager"][0], rtol=1e-5, atol=0)
    assert out["inductor"][1].keys() == out["eager"][1].keys() and len(out["eager"][1]) == 2 * 2 * 7
    for n, g in out["eager"][1].items():
        within(float((out["inductor"][1][n] - g).norm()), 1e-3 * float(g.norm()), f"seed {seed}: gradient {n}")


@pytest.mark.slow
def test_inductor_on_cpu_matches_eager(seed, request):
    _scalar_cpp_under_default_capability(request)
    base = _tiny()
    batches = [torch.randint(0, V, (2, n)) for n in (70, 300, 129, 811)]
    qcfg = QLoRAConfig(r=4, init_lora_weights="random")
    torch.manual_seed(seed)
    want = _train(build_training_model(copy.deepcopy(base), qcfg), batches)
    reset_compile_stats()
    torch.manual_seed(seed)
    got = _train(build_training_model(copy.deepcopy(base), qcfg, compile=CompileConfig(backend="inductor")), batches)
    assert compile_stats()["graph_breaks"] == 0
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_gpu_60_steps_inductor(seed, attention):
    """On the GPU: inductor, bf16, the NF4 Triton kernel, lengths 64..2048 of a learnable task (as on the CPU: pure
    noise lets AdamW amplify rounding): 0 breaks, 3 graphs (decoder layer, final norm, loss chunk), eager's losses
    to bf16 rounding."""
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    base = transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    # Two rows per batch (the chain twice), as before the learnable task: on torch 2.11 inductor found no flex
    # kernel config for a one-row batch of this model (head_dim 32) under dynamic lengths (NoValidChoicesError).
    lengths = [int(torch.randint(64, 2049, (1,), generator=gen)) for _ in range(60)]
    batches = [b.repeat(2, 1).cuda() for b in _chains(gen, lengths)]
    qcfg = QLoRAConfig(r=16, lora_alpha=32, attention=attention)
    torch.manual_seed(0)
    eager = build_training_model(copy.deepcopy(base), qcfg)
    torch.manual_seed(0)
    compiled = build_training_model(copy.deepcopy(base), qcfg, compile=CompileConfig())
    want = _train(eager, batches, lr=1e-3)
    reset_compile_stats()
    got = _train(compiled, batches, lr=1e-3)
    stats = compile_stats()
    rel = max(abs(a - b) / abs(b) for a, b in zip(got, want))
    print(f"GPU 60 steps ({attention}): {stats}; max rel loss diff {rel:.2e}; loss {want[0]:.3f} -> {want[-1]:.3f}")
    assert stats["graph_breaks"] == 0
    # The CPU test's 3 graphs (layer, final norm, loss chunk); inductor on an H100 compiled one more for sdpa
    # (gpu-tests log at aed10ca: 4, no break), where the flex layer may take one more per BlockMask layout.
    assert stats["unique_graphs"] <= 4, stats
    assert sum(want[-10:]) < sum(want[:10]) - 0.2, want  # it learns
    # bf16 (u = 2^-9 = 2e-3): inductor rounds intermediates differently from eager (fp32 inside fused kernels), by a
    # few u of the activations; the per-step losses stay within 2e-2 (~5u) relative over the 60 steps.
    assert rel < 2e-2


def test_regions_trace_once_with_their_float_hyperparameters_specialised():
    """A region is traced once: under dynamic=True dynamo made RMSNorm's eps and each LoRA layer's scaling / dropout
    symbolic float inputs, then threw the whole trace away to specialise them ("Restarting analysis due to ...
    _tensorify_python_scalars": a second trace, ~40 % of the first compile). `traced_as_region` specialises floats
    from the start; the decoder layers, final norm and loss chunk then compile with no restart (aot_eager: the
    trace, not inductor's code, is what restarts)."""
    import torch._dynamo

    torch._dynamo.reset()
    qcfg = QLoRAConfig(r=4, lora_alpha=8, lora_dropout=0.05, init_lora_weights="random")
    model = build_training_model(_tiny(), qcfg, compile=CompileConfig(backend="aot_eager"))
    reset_compile_stats()
    ids = torch.randint(0, V, (2, 40))
    model(input_ids=ids, labels=ids).loss.backward()
    stats = compile_stats()
    assert stats["unique_graphs"] == 3 and stats["graph_breaks"] == 0, stats
    assert stats["trace_restarts"] == 0, stats


def test_compile_seconds_times_the_phases_of_a_compile(monkeypatch, request):
    """`compile_seconds` (bench train's first-step breakdown) reads dynamo's timers: after a compiled forward and
    backward each phase is timed and nested in the total; `reset_compile_stats` starts it from zero."""
    from quickloris.parallel.compile import compile_seconds

    _scalar_cpp_under_default_capability(request)
    # a compile, not a load from the on-disk caches of an earlier run (which skip the backend's backward compile)
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    reset_compile_stats()
    assert set(compile_seconds().values()) == {0.0}
    torch._dynamo.reset()
    f = torch.compile(lambda x: (x.sin() * 2).relu().sum(), backend="inductor", dynamic=True)  # a backward of its own
    f(torch.randn(7, requires_grad=True)).backward()
    s = compile_seconds()
    assert s["total"] > 0 and 0 < s["dynamo_trace"] < s["total"], s
    assert 0 < s["forward_backend"] < s["total"] and 0 < s["backward_backend"] < s["total"], s
    reset_compile_stats()
    assert set(compile_seconds().values()) == {0.0}
