"""FlexAttention backend: BlockMask structure against a dense brute force, document ids from position_ids and
padding, outputs equal to transformers' SDPA (packed and padded batches), no recompile per sequence length."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickloris.models.attention import CUDNN, FLEX, attention_of, build_block_mask, document_ids, set_attention  # noqa: E402
from quickloris.models.prepare import QLoRAConfig, prepare_model  # noqa: E402
from quickloris.parallel.compile import CompileConfig, compile_model, compile_stats, reset_compile_stats  # noqa: E402
from tests.helpers import assert_close_rel, within  # noqa: E402
from tests.models.test_prepare import V, tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _dense_allowed(doc, window=None):
    S = doc.shape[1]
    q = torch.arange(S)
    allowed = (q[:, None] >= q[None, :]) & (doc[:, :, None] == doc[:, None, :])  # [B, S, S]
    return allowed if window is None else allowed & (q[:, None] - q[None, :] < window)


def _random_docs(B, S, gen):
    pos = []
    for _ in range(B):
        cuts = sorted(
            torch.randint(1, max(S, 2), (int(torch.randint(0, 4, (1,), generator=gen)),), generator=gen).tolist()
        )
        lens = [b - a for a, b in zip([0, *cuts], [*cuts, S]) if b > a]
        pos.append(torch.cat([torch.arange(n) for n in lens]))
    mask = torch.ones(B, S, dtype=torch.long)
    if S > 3:
        mask[-1, -int(torch.randint(1, S // 2 + 1, (1,), generator=gen)) :] = 0
    return torch.stack(pos), mask


@pytest.mark.parametrize(
    "S,window",
    [
        (1, None),
        (5, None),
        (127, None),
        (128, None),
        (129, None),
        (300, None),
        (513, None),
        (513, 200),
        (700, 128),
        (300, 1),
    ],
)
def test_block_mask_structure_matches_dense_mask(seed, S, window):
    gen = torch.Generator().manual_seed(seed)
    pos, mask = _random_docs(3, S, gen)
    doc = document_ids(3, S, "cpu", mask, pos)
    bm = build_block_mask(doc, window=window)
    allowed = _dense_allowed(doc, window)
    nb, blk = -(-S // 128), 128
    for b in range(3):
        for i in range(nb):
            partial = set(bm.kv_indices[b, 0, i, : bm.kv_num_blocks[b, 0, i]].tolist())
            full = set(bm.full_kv_indices[b, 0, i, : bm.full_kv_num_blocks[b, 0, i]].tolist())
            assert not partial & full
            for j in range(nb):
                tile = allowed[b, i * blk : (i + 1) * blk, j * blk : (j + 1) * blk]
                if tile.all():
                    assert j in partial | full
                elif tile.any():
                    assert j in partial, (b, i, j)  # a mixed tile must have its mask_mod evaluated
                else:
                    assert j not in full  # an empty tile may be skipped (or computed, masked)
    # mask_mod itself is the dense rule
    mm = bm.mask_mod
    b_, q_, k_ = torch.meshgrid(torch.arange(3), torch.arange(S), torch.arange(S), indexing="ij")
    assert torch.equal(mm(b_, torch.zeros_like(b_), q_, k_), allowed)


def test_document_ids_from_positions_and_padding():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0]])
    assert document_ids(1, 9, "cpu", mask, pos).tolist() == [[0, 0, 0, 1, 1, 2, 2, -1, -1]]
    assert document_ids(2, 4, "cpu").tolist() == [[0] * 4] * 2
    with pytest.raises(ValueError, match="attention_mask"):
        document_ids(1, 9, "cpu", mask[:, :5])


def _packed_and_padded(S=300):
    ids = torch.randint(0, V, (2, S))
    pos = torch.cat([torch.arange(100), torch.arange(S - 100)])[None].expand(2, S).clone()
    mask = torch.ones(2, S, dtype=torch.long)
    mask[1, -37:] = 0
    return ids, pos, mask


def _hidden_by_backend(model, impls, *inputs: dict) -> dict:
    """{impl: (decoder output for each of `inputs`)} with `model`'s attention set to each impl in turn."""
    out = {}
    for impl in impls:
        set_attention(model, impl)
        assert attention_of(model) == impl
        with torch.no_grad():
            out[impl] = tuple(model.model(**kw).last_hidden_state for kw in inputs)
    return out


# The forward comparisons run in float64 on the 16-bit model (the attention is the same code for an NF4 model):
# flex and SDPA then differ by rounding alone, u = 1.1e-16 per term, ~1e-15 of the hidden states' scale after two
# layers, so 1e-10 of it holds on any CPU while a wrong mask entry moves an output by O(1). (In fp32 the reordered
# sums differ by up to ~3e-5 of the scale after two layers and norms, seed to seed: no bound to state.)
FWD_REL = 1e-10


def _double(model):
    model = model.double()
    model.config.use_cache = False  # as prepare_model sets it: with a cache transformers' SDPA ignores packing
    return model


def test_flex_matches_sdpa_on_packed_and_padded_batches(seed):
    model = _double(tiny())
    ids, pos, mask = _packed_and_padded()
    out = _hidden_by_backend(
        model, ("sdpa", "flex"), dict(input_ids=ids, position_ids=pos), dict(input_ids=ids, attention_mask=mask)
    )
    assert_close_rel(out["flex"][0], out["sdpa"][0], FWD_REL, "packed")
    valid = mask.bool()
    assert_close_rel(out["flex"][1][valid], out["sdpa"][1][valid], FWD_REL, "padded")


@pytest.mark.parametrize(
    "arch,kw",
    [
        ("mistral", dict(sliding_window=100)),
        ("qwen2", dict(use_sliding_window=True, sliding_window=64, max_window_layers=1)),
    ],
)
def test_flex_sliding_window_matches_sdpa(seed, arch, kw):
    """Mistral's model-wide sliding window goes into the one BlockMask; Qwen2's per-layer windows (layer 0 full,
    layer 1 sliding) into one BlockMask per layer type."""
    model = _double(tiny(arch, **kw))
    ids, pos, mask = _packed_and_padded(300)
    out = {}
    for impl in ("sdpa", "flex"):
        set_attention(model, impl)
        with torch.no_grad():
            out[impl] = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close_rel(out["flex"][mask.bool()], out["sdpa"][mask.bool()], FWD_REL, arch)


def _autograd_nodes(t: torch.Tensor) -> set[str]:
    """Names of the autograd nodes `t`'s backward runs through."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(fn for fn, _ in node.next_functions)
    return names


def test_flex_training_matches_sdpa(seed):
    """Loss and gradients with flex equal SDPA's, packed and padded rows. On the CPU the backward runs through PyTorch's
    FlexAttention operator itself (its reference forward and backward, evaluating our mask_mod), not through SDPA
    (the GPU's fused kernels are test_gpu_flex_training_compiled_matches_sdpa's). In float64 (the attention is the
    same code for an NF4 model): the two differ only by rounding, u = 1.1e-16 of each term, so every gradient agrees
    to 1e-12 of its norm (measured ~6e-16) however much its sum of terms cancels, where a wrong mask or derivative
    moves it by O(1)."""
    base = tiny().double().train()
    base.config.use_cache = False  # as prepare_model sets it: with a cache transformers' SDPA ignores packing
    ids, pos, mask = _packed_and_padded(200)
    labels = ids.masked_fill(mask == 0, -100)
    results = {}
    for impl in ("sdpa", "flex"):
        model = copy.deepcopy(base)
        set_attention(model, impl)
        for kw in (dict(attention_mask=mask), dict(position_ids=pos)):
            loss = model(input_ids=ids, labels=labels, **kw).loss
            nodes = _autograd_nodes(loss)
            assert any("FlexAttention" in n for n in nodes) == (impl == "flex"), sorted(nodes)
            loss.backward()
        results[impl] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(results["flex"][0], results["sdpa"][0], rtol=1e-12, atol=0)
    assert results["flex"][1].keys() == results["sdpa"][1].keys() and len(results["sdpa"][1]) == 2 * 9 + 3
    for n, g in results["sdpa"][1].items():
        within(float((results["flex"][1][n] - g).norm()), 1e-12 * float(g.norm()), f"seed {seed}: gradient {n}")


def test_compiled_flex_layers_do_not_recompile_per_length(seed):
    model = prepare_model(tiny(), QLoRAConfig(r=4, init_lora_weights="random", attention="flex")).eval()
    eager = copy.deepcopy(model)
    compile_model(model, CompileConfig(backend="aot_eager", loss=False))
    reset_compile_stats()
    outs = []
    with torch.no_grad():
        for S in (130, 300, 517, 64, 1000, 259):
            ids = torch.randint(0, V, (2, S))
            pos = torch.cat([torch.arange(S // 3), torch.arange(S - S // 3)])[None].expand(2, S)
            outs.append((ids, pos, model.model(input_ids=ids, position_ids=pos).last_hidden_state))
    stats = compile_stats()  # before the eager reference runs (eager flex on CPU compiles a wrapper of its own)
    assert stats["graph_breaks"] == 0 and stats["unique_graphs"] <= 2, stats  # decoder layer + final norm
    with torch.no_grad():
        for ids, pos, got in outs:
            torch.testing.assert_close(got, eager.model(input_ids=ids, position_ids=pos).last_hidden_state)


def test_set_attention_errors(seed):
    model = tiny()
    with pytest.raises(ValueError, match="attention must be one of"):
        set_attention(model, "flash")
    dropout = tiny(attention_dropout=0.1)
    with pytest.raises(ValueError, match="attention_dropout"):
        set_attention(dropout, "flex")
    set_attention(model, "flex")
    assert model.config._attn_implementation == FLEX
    set_attention(model, "sdpa")  # the pre-hook goes away with flex
    assert model.config._attn_implementation == "sdpa" and not model.model._forward_pre_hooks


@pytest.mark.gpu
def test_gpu_flex_training_compiled_matches_sdpa(seed):
    """The real FlexAttention kernels (forward and backward, Triton, inside compiled layers) vs SDPA's, varying
    lengths of packed documents: the losses and every LoRA gradient (accumulated over the 4 batches, no optimizer
    step: the same weights throughout) agree to float32 rounding. In float32 (bf16 is the learning tests' and the
    benchmarks'): the kernels tile the same sums in other orders, u = 6e-8 per term, ~u * sqrt(S) * depth < 1e-5 of
    each gradient's norm; the bound, 1e-3, is 100x that, while a wrong mask entry or derivative moves a gradient by
    O(1) of its norm (bf16 rounding noise, ~5 % on some gradients, left no bound to state)."""
    from quickloris.parallel.compose import CheckpointConfig, build_training_model

    dense = tiny().to("cuda")
    losses, grads = {}, {}
    for impl in ("sdpa", "flex"):
        torch.manual_seed(0)
        model = build_training_model(
            copy.deepcopy(dense),
            QLoRAConfig(r=4, init_lora_weights="random", attention=impl),
            checkpointing=CheckpointConfig(),
            compile=CompileConfig(),
        )
        reset_compile_stats()
        gen = torch.Generator().manual_seed(seed)
        out = []
        for S in (200, 700, 129, 1500):
            ids = torch.randint(0, V, (2, S), generator=gen).cuda()
            pos = torch.cat([torch.arange(S // 2), torch.arange(S - S // 2)])[None].expand(2, S).cuda()
            loss = model(input_ids=ids, position_ids=pos, labels=ids).loss
            loss.backward()
            out.append(loss.item())
        losses[impl] = out
        grads[impl] = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        stats = compile_stats()
        assert stats["graph_breaks"] == 0 and stats["unique_graphs"] <= 4, (impl, stats)
    assert losses["flex"] == pytest.approx(losses["sdpa"], rel=1e-4)
    assert grads["flex"].keys() == grads["sdpa"].keys() and len(grads["sdpa"]) == 2 * 2 * 7
    for n, g in grads["sdpa"].items():
        within(float((grads["flex"][n] - g).norm()), 1e-3 * float(g.norm()), f"seed {seed}: gradient {n}")


def test_sdpa_cudnn_equals_sdpa_where_cudnn_is_unavailable(seed):
    """`sdpa_cudnn` is transformers' SDPA with a backend priority: same masks, same outputs off the GPU (where
    PyTorch falls back to the backend plain SDPA uses), plain and padded batches, compiled without a break."""
    model = prepare_model(tiny(), QLoRAConfig(r=4, init_lora_weights="random"))
    ids, pos, mask = _packed_and_padded()
    out = _hidden_by_backend(
        model, ("sdpa", "sdpa_cudnn"), dict(input_ids=ids), dict(input_ids=ids, attention_mask=mask)
    )
    assert model.config._attn_implementation == CUDNN
    torch.testing.assert_close(out["sdpa_cudnn"][0], out["sdpa"][0], rtol=0, atol=0)
    valid = mask.bool()
    torch.testing.assert_close(out["sdpa_cudnn"][1][valid], out["sdpa"][1][valid], rtol=0, atol=0)
    reset_compile_stats()
    compile_model(model.eval(), CompileConfig(backend="aot_eager", loss=False, norm=False))
    with torch.no_grad():
        got = model.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, out["sdpa"][0], rtol=1e-5, atol=1e-5)
    assert compile_stats()["graph_breaks"] == 0


@pytest.mark.gpu
def test_gpu_sdpa_cudnn_runs_cudnn_kernel_in_compiled_layer(seed):
    """On a GPU the compiled layer's graph calls cuDNN's attention kernel (forward and backward), and the training
    loss and LoRA gradients match plain SDPA (flash) in bf16."""
    from torch.profiler import ProfilerActivity, profile

    from quickloris.parallel.compose import CheckpointConfig, build_training_model

    dense = tiny(head_dim=64).to("cuda", torch.bfloat16)
    ids = torch.randint(0, V, (2, 512), device="cuda")
    res = {}
    for impl in ("sdpa", "sdpa_cudnn"):
        torch.manual_seed(0)
        model = build_training_model(
            copy.deepcopy(dense),
            QLoRAConfig(r=4, init_lora_weights="random", attention=impl),
            checkpointing=CheckpointConfig(),
            compile=CompileConfig(),
        )
        model(input_ids=ids, labels=ids).loss.backward()  # compile
        model.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.cuda.synchronize()
        names = " ".join(e.key for e in prof.key_averages()).lower()
        res[impl] = (loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}, names)
    assert "cudnn" in res["sdpa_cudnn"][2] and "sdpa" in res["sdpa_cudnn"][2]
    assert res["sdpa_cudnn"][0] == pytest.approx(res["sdpa"][0], rel=1e-2)
    for n, g in res["sdpa"][1].items():
        assert float((res["sdpa_cudnn"][1][n] - g).norm() / g.norm().clamp_min(1e-12)) < 5e-2, n
