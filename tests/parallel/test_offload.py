"""Offloaded checkpoints (`quickloris.parallel.offload`): what is moved, in which order it comes back, that the
gradients are the plain checkpoint's, and that a dropped graph frees its buffers.

On CPU the copies are a synchronous stand-in (`_Copies`) that clones and logs; the packing, fetch order and
prefetch logic are the real ones. On a GPU (``gpu``) the real side-stream copies run on a tiny Llama: gradients
bit-equal to the checkpoint kept on the GPU, and less memory."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from quickloris.parallel.offload import (
    KEEP_FREE,
    LEDGER,
    HostMemoryError,
    OffloadedCheckpoint,
    PinnedLedger,
    _pow2,
    check_host_room,
    pinned_pieces,
)
from quickloris.utils.hostmem import HostMemory


class _Copies:
    """Synchronous stand-in for `CudaCopies`: every tensor counts as on the device; copies are clones, logged."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []  # ("host" | "device" | "let go", id of the host buffer)
        self.copied: dict[int, torch.Tensor] = {}  # the event stand-in of a copy to the host -> its host buffer
        self.held: list[bool] = []  # each to_host's `held`

    def offloads(self, t):
        return True

    def to_host(self, t, held=False):
        host = t.detach().clone()
        self.log.append(("host", id(host)))
        self.held.append(held)
        event = object()
        self.copied[id(event)] = host
        return host, event

    def to_device(self, host, device):
        self.log.append(("device", id(host)))
        return host.clone(), "done"

    def wait(self, t, done):
        assert done == "done"

    def done_with(self, copied, device):  # a held tensor let go after its copy to the host
        self.log.append(("let go", id(self.copied[id(copied)])))


class _Layer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, h, table):
        return h + torch.tanh(self.lin(h) * table)


class _Stack(nn.Module):
    """Layers called through a checkpoint function, as transformers calls a checkpointed decoder layer; `table`
    stands for the rotary tables: shared by all layers, no gradient."""

    def __init__(self, n: int, d: int, func) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(d) for _ in range(n))
        self.func = func

    def forward(self, x, table):
        h = x
        for layer in self.layers:
            h = self.func(layer.__call__, h, table)
        return h


def _grads(model, x, table):
    model.zero_grad()
    x = x.clone().requires_grad_()
    (model(x, table) ** 2).mean().backward()
    return [p.grad.clone() for p in model.parameters()] + [x.grad]


@pytest.mark.parametrize("n", [1, 2, 5])
def test_offloaded_checkpoint_moves_the_layer_inputs_and_prefetches_backwards(seed, n):
    torch.manual_seed(seed)
    d, tokens = 16, 33
    func = OffloadedCheckpoint(_Copies(), min_bytes=tokens * d * 4)  # the hidden states qualify, nothing smaller
    model = _Stack(n, d, func)
    plain = copy.deepcopy(model)
    plain.func = lambda f, *a: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=False)
    x, table = torch.randn(tokens, d), torch.randn(d)

    got, want = _grads(model, x, table), _grads(plain, x, table)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)  # the same arithmetic: only where the inputs lived changed

    log = func.copies.log
    hosts = [i for kind, i in log if kind == "host"]
    assert len(hosts) == n and func.packed == n  # each layer's hidden states; the shared table stays
    back = [i for kind, i in log if kind == "device"]
    assert back == hosts[::-1]  # backward replays the last layer first, each input fetched once
    assert (func.fetched, func.prefetched) == (1, n - 1)  # only the first had to be fetched on demand
    # each prefetch is issued while the layer after it is unpacked: host-to-device copies lead by one layer
    order = [i for kind, i in log if kind == "device"]
    assert order[: min(2, n)] == hosts[::-1][: min(2, n)]


def test_offloaded_checkpoint_keeps_small_and_gradient_free_tensors_and_frees_dropped_graphs(seed):
    torch.manual_seed(seed)
    d, tokens = 8, 20
    func = OffloadedCheckpoint(_Copies(), min_bytes=tokens * d * 4 + 1)  # the hidden states are 1 byte too small
    model = _Stack(3, d, func)
    model(torch.randn(tokens, d, requires_grad=True), torch.randn(d)).sum().backward()
    assert func.packed == 0 and func.copies.log == []

    func = OffloadedCheckpoint(_Copies(), min_bytes=1)
    model = _Stack(3, d, func)
    table = torch.randn(tokens, d)  # big enough, but no gradient: shared by every layer, left where it is
    out = model(torch.randn(tokens, d, requires_grad=True), table)
    assert func.packed == 3
    last = func._last
    assert last() is not None
    del out  # the graph goes without a backward: its handles (and their host buffers) go with it
    gc.collect()
    assert last() is None


def test_offloaded_checkpoint_drops_the_device_input_after_packing():
    """The point of it: after the forward no layer input is held on the "device" (here: the original tensors)."""
    d, tokens, n = 8, 16, 3
    inputs = []

    class Spy(_Layer):
        def forward(self, h, table):
            inputs.append(weakref.ref(h))
            return super().forward(h, table)

    for func, kept in ((OffloadedCheckpoint(_Copies(), min_bytes=1), 0), (None, n - 1)):
        inputs.clear()
        model = _Stack(n, d, func or (lambda f, *a: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=False)))
        model.layers = nn.ModuleList(Spy(d) for _ in range(n))
        x = torch.randn(tokens, d, requires_grad=True)
        out = model(x, torch.randn(d))
        gc.collect()
        alive = sum(r() is not None for r in inputs[1:])  # layer 0's input is `x`, held by the test
        assert alive == kept
        out.sum().backward()


def test_offloaded_checkpoint_refuses_the_reentrant_checkpoint():
    with pytest.raises(ValueError, match="use_reentrant=False"):
        OffloadedCheckpoint(_Copies())(lambda x: x, torch.ones(1, requires_grad=True), use_reentrant=True)


@pytest.mark.parametrize("nbytes", [1, 2**20, 3 * 2**30, 2**31 - 2, 7 * 2**28 + 3 * 2**20 + 6, 1_234_567_890])
def test_pinned_pieces_cover_the_bytes_in_at_most_four_buffers_wasting_under_a_seventh(nbytes):
    pieces = pinned_pieces(nbytes)
    assert sum(pieces) == nbytes and 1 <= len(pieces) <= 4 and all(p > 0 for p in pieces)
    assert all(p & (p - 1) == 0 for p in pieces[:-1])  # exact powers of two: the allocator rounds nothing
    assert sum(_pow2(p) for p in pieces) - nbytes < nbytes / 7
    assert pinned_pieces(3 * 2**30) == [2**31, 2**30]  # the 8B's layer input at 384K tokens: 3 GiB, not 4


def test_check_host_room_refuses_to_pin_into_the_last_tenth_of_the_host():
    total = 128 * 2**30
    free = HostMemory(available=40 * 2**30, total=total)
    room = int(free.available - KEEP_FREE * total)  # what may still be pinned
    check_host_room(room, free)
    check_host_room(0, HostMemory(available=0, total=total))  # no growth: nothing to check
    check_host_room(10 * total, None)  # the host's memory is unknown: no check
    with pytest.raises(HostMemoryError, match=r"^--checkpoint-offload: out of host memory: .* 28\.2 GiB more") as e:
        check_host_room(room + 2**30, free)  # 27.2 GiB may be pinned: 28.2 may not
    assert "\n" not in str(e.value) and e.value.exit_code == 1  # one line, no traceback from the CLI


def test_pinned_ledger_counts_free_buffers_per_rounded_size():
    """A freed 4 GiB buffer serves a later 4 GiB piece, not a 2 GiB one: the allocator's one total of free bytes
    (4 GiB here) would call a 2 GiB request free of growth while the pool grows by 2 GiB. Sizes round up to a
    power of two; a buffer is free once its tensor is gone (the backward freed the layer input)."""
    ledger = PinnedLedger()
    a = torch.empty(4 * 1024, dtype=torch.uint8)  # stands in for 4 GiB: the ledger only reads sizes
    b = torch.empty(3 * 1024 + 5, dtype=torch.uint8)  # rounds up to 4096 bytes as well
    ledger.hold(a)
    ledger.hold(b)
    assert ledger.growth([4096]) == 4096  # both 4096-byte buffers are in use
    del a
    gc.collect()
    assert ledger.growth([4096]) == 0 and ledger.growth([3000]) == 0  # the freed one serves either
    assert ledger.growth([2048]) == 2048  # ... but not a smaller size
    assert ledger.growth([4096, 4096]) == 4096 and ledger.growth([4096, 2048, 1000]) == 2048 + 1024
    del b
    gc.collect()
    assert ledger.growth([4096, 4096]) == 0 and ledger.growth([4096] * 3) == 4096
    c = torch.empty(4096, dtype=torch.uint8)
    ledger.hold(c)  # takes a held buffer: no more held than before
    assert ledger.growth([4096]) == 0 and ledger.growth([4096, 4096]) == 4096


def test_apply_checkpointing_offload_sets_one_function_on_every_checkpointed_layer(seed):
    """The wiring on a tiny Llama (transformers' real layer call): every layer's checkpoint function is the one
    `OffloadedCheckpoint`, recorded as an edit; on CPU its copies are the stand-in, and gradients equal the
    plain checkpoint's."""
    pytest.importorskip("transformers")
    from quickloris.models import surgery
    from quickloris.models.prepare import QLoRAConfig
    from quickloris.parallel.compose import CheckpointConfig, _offload_checkpoints, build_training_model
    from tests.tiny import tiny_model

    torch.manual_seed(seed)
    plain = build_training_model(tiny_model(vocab_size=97), QLoRAConfig(r=4, init_lora_weights="random"))
    model = copy.deepcopy(plain)
    _offload_checkpoints(model)
    funcs = {id(layer._gradient_checkpointing_func) for layer in model.model.layers}
    assert len(funcs) == 1
    func = model.model.layers[0]._gradient_checkpointing_func
    assert isinstance(func, OffloadedCheckpoint)
    assert any("pinned CPU memory" in e.what for e in surgery.edits(model).log)
    func.copies, func.min_bytes = _Copies(), 1
    ids = torch.randint(0, 97, (2, 40))
    grads = {}
    for name, m in (("plain", plain), ("offload", model)):
        assert CheckpointConfig().gradient_checkpointing and all(x.gradient_checkpointing for x in m.model.layers)
        m(input_ids=ids, labels=ids).loss.backward()
        grads[name] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert func.packed == len(model.model.layers)  # the hidden states only: not the rotary tables
    assert grads["plain"].keys() == grads["offload"].keys() and grads["plain"]
    for n, g in grads["plain"].items():
        torch.testing.assert_close(grads["offload"][n], g, rtol=0, atol=0, msg=n)


def test_in_graph_checkpoint_keeps_the_offload(seed):
    """`checkpoint_in_graph` on offloaded layers: each layer's slot becomes the offload's `in_graph` (its hooks, no
    eager checkpoint), the compiled region saves only the layer input among what needs a gradient, so one tensor
    a layer moves, prefetched in reverse as with the eager offload; gradients equal the eager offloaded
    checkpoint's (aot_eager on fp32: the replay inside the compiled backward reorders no sum that matters beyond
    ~1e-6 relative; rtol 1e-4 as in the in-graph compile test). Undoing the compile restores the eager offload."""
    pytest.importorskip("transformers")
    from quickloris.models import surgery
    from quickloris.models.prepare import QLoRAConfig
    from quickloris.parallel.compile import CompileConfig, compile_model, is_checkpointed_in_graph
    from quickloris.parallel.compose import CheckpointConfig, _offload_checkpoints, build_training_model
    from tests.tiny import tiny_model

    torch.manual_seed(seed)
    eager = build_training_model(
        tiny_model(vocab_size=97, layers=3),
        QLoRAConfig(r=4, init_lora_weights="random"),
        checkpointing=CheckpointConfig(gradient_checkpointing=True),
    )
    _offload_checkpoints(eager)
    in_graph = copy.deepcopy(eager)  # its own OffloadedCheckpoint, shared by its layers; the ledger is the process's
    mine, theirs = (
        in_graph.model.layers[0]._gradient_checkpointing_func,
        eager.model.layers[0]._gradient_checkpointing_func,
    )
    assert isinstance(mine, OffloadedCheckpoint) and mine is not theirs and mine.copies is not theirs.copies
    assert all(x._gradient_checkpointing_func is mine for x in in_graph.model.layers)
    assert mine.copies.ledger is theirs.copies.ledger is LEDGER
    torch._dynamo.reset()
    compile_model(in_graph, CompileConfig(backend="aot_eager", loss=False, checkpoint_in_graph=True))
    funcs = []
    for m in (eager, in_graph):
        func = m.model.layers[0]._gradient_checkpointing_func
        func = getattr(func, "__self__", func)
        func.copies, func.min_bytes = _Copies(), 1
        funcs.append(func)
    assert [is_checkpointed_in_graph(x) for x in in_graph.model.layers] == [True] * 3
    assert not any(map(is_checkpointed_in_graph, eager.model.layers))
    assert {id(x._gradient_checkpointing_func.__self__) for x in in_graph.model.layers} == {id(funcs[1])}
    ids = torch.randint(0, 97, (2, 40))
    grads = {}
    for name, m in (("eager", eager), ("in_graph", in_graph)):
        m(input_ids=ids, labels=ids).loss.backward()
        grads[name] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    for func in funcs:
        assert func.packed == func.fetched + func.prefetched == 3, vars(func)
    host = [i for kind, i in funcs[1].copies.log if kind == "host"]
    back = [i for kind, i in funcs[1].copies.log if kind == "device"]
    assert back == host[::-1]  # the last layer's input first, each next one prefetched
    assert grads["eager"].keys() == grads["in_graph"].keys() and grads["eager"]
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads["in_graph"][n], g, rtol=1e-4, atol=1e-6, msg=n)
    surgery.undo(in_graph, "compile")
    assert all(x._gradient_checkpointing_func is funcs[1] for x in in_graph.model.layers)


def test_hf_trainer_with_gradient_checkpointing_keeps_the_offloaded_checkpoint(seed, tmp_path):
    """HF Trainer's ``TrainingArguments(gradient_checkpointing=True)`` calls ``gradient_checkpointing_enable()``
    before training; transformers' own would put its checkpoint function back on every layer (the offload silently
    gone). quickloris' model keeps its own, warns, and the Trainer's steps pack every layer's input; after
    ``gradient_checkpointing_disable()`` the call is transformers' again; a deep copy's method is the copy's."""
    transformers = pytest.importorskip("transformers")
    from quickloris.models.prepare import QLoRAConfig
    from quickloris.parallel.compose import CheckpointConfig, _offload_checkpoints, build_training_model
    from tests.tiny import tiny_model

    torch.manual_seed(seed)
    model = build_training_model(
        tiny_model(vocab_size=97),
        QLoRAConfig(r=4, init_lora_weights="random"),
        checkpointing=CheckpointConfig(gradient_checkpointing=True),
    )
    _offload_checkpoints(model)
    layers = model.model.layers
    func = layers[0]._gradient_checkpointing_func
    func.copies, func.min_bytes = _Copies(), 1
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
    )
    rows = [{"input_ids": torch.randint(0, 97, (24,)).tolist()} for _ in range(4)]

    def collate(batch):
        ids = torch.tensor([r["input_ids"] for r in batch])
        return {"input_ids": ids, "labels": ids}

    with pytest.warns(UserWarning, match="quickloris already checkpoints"):
        transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=collate).train()
    assert all(layer._gradient_checkpointing_func is func for layer in layers)
    assert func.packed == 2 * len(layers)  # two steps, every layer's input offloaded

    twin = copy.deepcopy(model)
    assert twin.gradient_checkpointing_enable.__self__ is twin
    model.gradient_checkpointing_disable()
    model.gradient_checkpointing_enable()  # transformers' own now: its checkpoint function on every layer
    assert model.is_gradient_checkpointing and all(layer._gradient_checkpointing_func is not func for layer in layers)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offloaded_checkpoint_same_gradients_less_memory(seed):
    """Side-stream copies on a GPU: bit-equal gradients to the checkpoint kept on the GPU, and the layer inputs
    are gone from the peak (all but the two in flight)."""
    pytest.importorskip("transformers")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from quickloris.models.prepare import QLoRAConfig
    from quickloris.parallel.compose import CheckpointConfig, build_training_model
    from tests.tiny import tiny_model

    torch.manual_seed(seed)
    n_layers, hidden, tokens = 12, 256, 8192
    base = tiny_model(vocab_size=128, hidden=hidden, layers=n_layers, inter=512)
    base = base.to("cuda", torch.bfloat16)
    ids = torch.randint(0, 128, (1, tokens), device="cuda")
    out = {}
    for offload in (False, True):
        torch.manual_seed(seed)
        model = build_training_model(
            copy.deepcopy(base),
            QLoRAConfig(r=4, init_lora_weights="random"),
            checkpointing=CheckpointConfig(offload=offload),
        )
        for _ in range(2):  # the second step: the caching allocators are warm
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            # the math backend: the flash / efficient backwards add into dQ atomically, so two runs of the same
            # step differ in the last bits whatever the checkpoint does (seen: layer 0's q_proj LoRA gradient)
            with sdpa_kernel(SDPBackend.MATH):
                model(input_ids=ids, labels=ids).loss.backward()
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
        out[offload] = (peak, grads)
        del model
    for n, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][n], g, rtol=0, atol=0, msg=n)
    layer_input = tokens * hidden * 2  # bf16
    saved = out[False][0] - out[True][0]
    assert saved >= (n_layers - 4) * layer_input, (out[False][0], out[True][0], layer_input)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inductor_in_graph_checkpoint_with_offload(seed):
    """Inductor, the checkpoint in each layer's graph, its input offloaded: the eager offloaded checkpoint's loss
    and LoRA gradients (norm-wise: Inductor fuses the two differently; 1e-3 as in the tiled-MLP GPU test), one input
    moved per layer and step, and the layer inputs gone from the peak against the in-graph checkpoint kept on
    the GPU."""
    pytest.importorskip("transformers")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from quickloris.models.prepare import QLoRAConfig
    from quickloris.parallel.compile import CompileConfig
    from quickloris.parallel.compose import CheckpointConfig, build_training_model
    from tests.tiny import tiny_model

    torch.manual_seed(seed)
    n_layers, hidden, tokens = 12, 256, 8192
    base = tiny_model(vocab_size=128, hidden=hidden, layers=n_layers, inter=512).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 128, (1, tokens), device="cuda")
    out = {}
    for name, offload, in_graph in (("eager", True, False), ("in_graph", True, True), ("on_gpu", False, True)):
        torch._dynamo.reset()
        torch.manual_seed(seed)
        model = build_training_model(
            copy.deepcopy(base),
            QLoRAConfig(r=4, init_lora_weights="random"),
            checkpointing=CheckpointConfig(offload=offload),
            compile=CompileConfig(checkpoint_in_graph=in_graph),
        )
        for _ in range(2):  # the second step: compiled, the caching allocators warm
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            with sdpa_kernel(SDPBackend.MATH):  # no atomic dQ adds: the difference is the fusions' alone
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            torch.cuda.synchronize()
        func = model.model.layers[0]._gradient_checkpointing_func
        func = getattr(func, "__self__", func)
        packed = getattr(func, "packed", None)
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        out[name] = (torch.cuda.max_memory_allocated() - before, grads, float(loss), packed)
        del model
    assert out["in_graph"][3] == 2 * n_layers, out["in_graph"][3]  # two steps, one layer input each
    torch.testing.assert_close(out["in_graph"][2], out["eager"][2], rtol=1e-3, atol=0)
    for n, g in out["eager"][1].items():
        err = float((out["in_graph"][1][n] - g).norm() / g.norm().clamp_min(1e-30))
        assert err <= 1e-3, (n, err)
    layer_input = tokens * hidden * 2  # bf16
    assert out["on_gpu"][0] - out["in_graph"][0] >= (n_layers - 4) * layer_input, (out["on_gpu"][0], out["in_graph"][0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copies_round_trip_odd_sizes_in_pieces_and_refuse_a_full_host(seed, monkeypatch):
    """`CudaCopies` on a GPU: a tensor whose bytes are no power of two goes to the host in pinned pieces and comes
    back bit-equal (a strided one too); with the host's memory reported full it raises one line instead, also for
    a piece smaller than the pool's free bytes when they are in a buffer of another size (`PinnedLedger`)."""
    from quickloris.parallel import offload

    torch.manual_seed(seed)
    offload.empty_pinned_cache()  # earlier tests' free buffers (of any size) out of the pool and the ledger
    copies = offload.CudaCopies()
    for t in (
        torch.randn(3 * 2**19 + 7, 3, device="cuda", dtype=torch.bfloat16),  # 9 MiB + 42 bytes: 4 pieces
        torch.randn(1000, 600, device="cuda").t(),  # not contiguous
    ):
        host, copied = copies.to_host(t)
        copied.synchronize()
        assert copied.query()
        assert [p.numel() for p in host[0]] == pinned_pieces(t.numel() * t.element_size())
        assert all(p.is_pinned() for p in host[0])
        back, done = copies.to_device(host, t.device)
        copies.wait(back, done)
        assert back.dtype == t.dtype and back.shape == t.shape
        assert torch.equal(back, t)
    stats = torch.cuda.host_memory_stats()  # the counters the room check reads exist in this torch
    assert "allocated_bytes.current" in stats and "active_bytes.current" in stats
    freed = copies.to_host(torch.zeros(2**26, dtype=torch.uint8, device="cuda"))  # one 64 MiB buffer
    torch.cuda.synchronize()
    del freed, host
    gc.collect()  # the pool now keeps a free 64 MiB buffer
    full = HostMemory(available=0, total=2**40)
    monkeypatch.setattr(offload.hostmem, "host_memory", lambda: full)
    with pytest.raises(HostMemoryError, match="--checkpoint-offload"):  # 32 MiB: a size the free buffer cannot serve
        copies.to_host(torch.zeros(2**25, dtype=torch.uint8, device="cuda"))
    big = torch.empty(2**33, dtype=torch.uint8, device="cuda")  # 8 GiB: more than the pool keeps free
    with pytest.raises(HostMemoryError, match="--checkpoint-offload"):
        copies.to_host(big)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_offloaded_checkpoint_hold_keeps_each_input_until_the_next_is_copied_and_the_last_for_backward(seed, n):
    """``hold`` (CUDA graphs): a packed input stays on the device until the next one is packed, and is let go only
    after the compute stream waited for its copy's event (`done_with`), and gets no ``record_stream``; the last one
    is used by backward as it is (no round trip). The gradients are the plain checkpoint's, bit for bit."""
    torch.manual_seed(seed)
    d, tokens = 8, 16
    inputs = []

    class Spy(_Layer):
        def forward(self, h, table):
            inputs.append(weakref.ref(h))
            return super().forward(h, table)

    func = OffloadedCheckpoint(_Copies(), min_bytes=1, hold=True)
    model = _Stack(n, d, func)
    model.layers = nn.ModuleList(Spy(d) for _ in range(n))
    plain = copy.deepcopy(model)
    plain.func = lambda f, *a: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=False)
    x, table = torch.randn(tokens, d, requires_grad=True), torch.randn(d)
    out = model(x, table)
    gc.collect()
    # Spy records every call: the forward's only so far. Layer 0's input is `x` (the test holds it).
    assert [r() is not None for r in inputs[1:]] == [False] * (n - 2) + [True] * (n > 1)
    log = func.copies.log
    hosts = [i for kind, i in log if kind == "host"]
    assert func.copies.held == [True] * n  # no record_stream on a held tensor
    # each input is let go right after the next one's copy was issued, and only then
    want = [("host", hosts[0])]
    for i in range(1, n):
        want += [("host", hosts[i]), ("let go", hosts[i - 1])]
    assert log == want
    out.pow(2).mean().backward()
    got = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    x.grad = None
    for g, w in zip(got, _grads(plain, x.detach(), table), strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    back = [i for kind, i in log if kind == "device"]
    assert back == hosts[::-1][1:]  # the last input was still on the device: every other one comes back, in order
    assert (func.fetched, func.prefetched) == (0, n - 1)
    assert copy.deepcopy(func).hold  # a copied model's offload holds too


def test_compile_modes_with_cuda_graphs_refuse_checkpoint_offload(seed):
    """A compile mode that replays CUDA graphs with offloaded checkpoints is one `ConfigError` naming the mode and
    the offload, raised before anything is compiled (not yet verified on a GPU: `quickloris.parallel.offload`);
    without CUDA graphs the same model compiles."""
    pytest.importorskip("transformers")
    from quickloris.config import ConfigError
    from quickloris.models import surgery
    from quickloris.models.prepare import QLoRAConfig
    from quickloris.parallel.compile import CompileConfig, check_offload_allowed, compile_model, uses_cuda_graphs
    from quickloris.parallel.compose import CheckpointConfig, _offload_checkpoints, build_training_model
    from tests.tiny import tiny_model

    for mode, in_graph, refused in (
        ("reduce-overhead", True, True),
        ("max-autotune", False, True),
        (None, True, False),
        ("max-autotune-no-cudagraphs", False, False),
    ):
        model = build_training_model(
            tiny_model(vocab_size=97, layers=2),
            QLoRAConfig(r=4, init_lora_weights="random"),
            checkpointing=CheckpointConfig(gradient_checkpointing=True),
        )
        _offload_checkpoints(model)
        cfg = CompileConfig(mode=mode, loss=False, checkpoint_in_graph=in_graph)
        if refused:
            with pytest.raises(ConfigError, match="checkpoint offload") as e:
                compile_model(model, cfg)
            assert e.value.name == "mode" and "\n" not in str(e.value)
            assert not surgery.applied(model, "compile")
        else:
            compile_model(model, cfg)  # compiles lazily
            assert surgery.applied(model, "compile")
    assert uses_cuda_graphs(CompileConfig(backend="cudagraphs"))
    assert not uses_cuda_graphs(CompileConfig(backend="aot_eager", mode=None))
    with pytest.raises(ConfigError, match=r"^CompileConfig\.backend='cudagraphs' \(CUDA graphs\)"):
        check_offload_allowed(CompileConfig(backend="cudagraphs"))
    # the run's config refuses it before a model is loaded; without offload, or compiling off, it is fine
    from quickloris.train.config import TrainConfig

    with pytest.raises(ConfigError, match="checkpoint offload"):
        TrainConfig(
            compile=CompileConfig(enabled=None, mode="reduce-overhead"), checkpointing=CheckpointConfig(offload=True)
        )
    TrainConfig(compile=CompileConfig(enabled=None, mode="reduce-overhead"))
    TrainConfig(
        compile=CompileConfig(enabled=False, mode="reduce-overhead"), checkpointing=CheckpointConfig(offload=True)
    )


def test_in_graph_offload_finds_the_input_by_its_memory_not_its_object(seed):
    """CUDA graph trees hand a compiled region's saved input back as a new tensor over the same memory, without
    requires_grad: `in_graph` still offloads it, once per call (a second alias of it stays), and nothing the
    region made itself."""

    class Saves(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x.detach(), x.detach().view(-1), w.detach() * 2)
            return x * w

        @staticmethod
        def backward(ctx, g):
            x, flat, w2 = ctx.saved_tensors
            assert torch.equal(flat, x.reshape(-1))
            return g * w2 / 2, (g * x).sum(0)

    torch.manual_seed(seed)
    func = OffloadedCheckpoint(_Copies(), min_bytes=1)
    x, w = torch.randn(5, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    out = func.in_graph(lambda a, b: Saves.apply(a, b), x, w)
    assert func.packed == 1 and len(func.copies.log) == 1
    out.sum().backward()
    assert func.fetched == 1
    torch.testing.assert_close(x.grad, w.detach().expand(5, 3), rtol=0, atol=0)
    torch.testing.assert_close(w.grad, x.detach().sum(0), rtol=0, atol=0)
