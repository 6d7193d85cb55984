"""quickloris.dequantize_nf4 (the fused Triton kernel) against bitsandbytes and the pure-PyTorch reference.

CPU: the kernel runs under TRITON_INTERPRET=1 (the plain twin). GPU (`-m gpu`): the inline-PTX path, the plain
twin and bitsandbytes' CUDA dequantization agree bit-for-bit; one launch per call; no allocation with `out=`.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from torch._dynamo.utils import counters

import quickloris
from quickloris.kernels import nf4_fast, nf4_launch
from quickloris.quant import nf4
from tests.helpers import within

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HALF = [torch.float16, torch.bfloat16]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def bnb_pair(shape, dtype, device=DEVICE, nested=True, blocksize=64):
    w = torch.randn(shape, dtype=dtype, device=device) * 0.05
    return bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")


def linear4bit(in_f, out_f, dtype, device=DEVICE):
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(
        torch.randn(out_f, in_f, dtype=dtype), requires_grad=False, compress_statistics=True, quant_type="nf4"
    )
    if device == "cpu":  # .to("cpu") is a no-op for an unquantized Params4bit; quantize explicitly
        layer.weight = layer.weight._quantize("cpu")
        return layer
    return layer.to(device)


# ------------------------------------------------------------------------------------------------ CPU + GPU


@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
@pytest.mark.parametrize("shape", [(300, 128), (129, 257), (1, 7), (64, 1024), (3, 4096 + 64)])
def test_equals_bitsandbytes(seed, dtype, shape):
    q, qs = bnb_pair(shape, dtype)
    got = quickloris.dequantize_nf4(q, qs)
    assert got.dtype == dtype and got.shape == torch.Size(shape)
    assert torch.equal(bits(got), bits(bnbF.dequantize_4bit(q, qs)))


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize("nested", [True, False])
def test_blocksizes_nested_and_plain(seed, blocksize, nested):
    q, qs = bnb_pair((96, 200), torch.bfloat16, nested=nested, blocksize=blocksize)
    assert torch.equal(bits(quickloris.dequantize_nf4(q, qs)), bits(bnbF.dequantize_4bit(q, qs)))


def test_accepts_params4bit_linear4bit_and_our_state(seed):
    layer = linear4bit(192, 80, torch.float16)
    expected = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    for got in (
        quickloris.dequantize_nf4(layer),
        quickloris.dequantize_nf4(layer.weight),
        quickloris.dequantize_nf4(layer.weight.data, nf4.state_from_bnb(layer.weight.quant_state)),
    ):
        assert torch.equal(bits(got), bits(expected))


def test_out_argument_and_dtype_override(seed):
    q, qs = bnb_pair((130, 192), torch.bfloat16)
    out = torch.full((130, 192), float("nan"), dtype=torch.bfloat16, device=DEVICE)  # poisoned: all must be written
    ret = quickloris.dequantize_nf4(q, qs, out=out)
    assert ret is out
    assert torch.equal(bits(out), bits(bnbF.dequantize_4bit(q, qs)))
    as_fp16 = quickloris.dequantize_nf4(q, qs, dtype=torch.float16)
    ref32 = nf4.dequantize_nf4_reference(q, nf4.state_from_bnb(qs), torch.float32)
    assert torch.equal(bits(as_fp16), bits(ref32.to(torch.float16)))


def test_compiles_fullgraph_without_graph_breaks(seed):
    q, qs = bnb_pair((128, 192), torch.bfloat16)
    state = nf4.state_from_bnb(qs)
    x = torch.randn(5, 192, dtype=torch.bfloat16, device=DEVICE)

    def f(x, packed, absmax, absmax2, code2, offset, code):
        st = nf4.NF4State(
            shape=state.shape,
            dtype=state.dtype,
            blocksize=64,
            absmax=absmax,
            code=code,
            offset=offset,
            absmax2=absmax2,
            code2=code2,
        )
        return x @ quickloris.dequantize_nf4(packed, st).t()

    counters.clear()
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    got = compiled(x, q, state.absmax, state.absmax2, state.code2, state.offset, state.code)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(got, x @ bnbF.dequantize_4bit(q, qs).t())


def test_compiles_fullgraph_through_bitsandbytes_linear4bit_modules(seed):
    """The public entry point users call, inside the challenge's MLP harness: bitsandbytes Linear4bit layers whose
    weights are dequantized by `quickloris.dequantize_nf4(layer.weight)` in a fullgraph-compiled forward (on a GPU
    the op is a triton_op whose body is traced on fake tensors: nothing in it may ask for a data pointer)."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    gate, up, down = linear4bit(256, 384, dtype), linear4bit(256, 384, dtype), linear4bit(384, 256, dtype)

    def mlp(x):
        g = x @ quickloris.dequantize_nf4(gate.weight).t()
        u = x @ quickloris.dequantize_nf4(up.weight).t()
        return (torch.nn.functional.silu(g) * u) @ quickloris.dequantize_nf4(down.weight).t()

    w = [bnbF.dequantize_4bit(m.weight.data, m.weight.quant_state) for m in (gate, up, down)]

    def reference(x):
        return (torch.nn.functional.silu(x @ w[0].t()) * (x @ w[1].t())) @ w[2].t()

    counters.clear()
    torch._dynamo.reset()
    compiled = torch.compile(mlp, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    for rows in (3, 17):
        x = torch.randn(rows, 256, dtype=dtype, device=DEVICE)
        got, ref = compiled(x), reference(x)
        if DEVICE == "cpu":  # aot_eager runs the same kernels as eager: equal bits
            assert torch.equal(got, ref)
            continue
        # Inductor fuses SiLU-gate into one pointwise kernel: h = silu(g) * u rounded to bf16 once, where eager
        # rounds silu(g) and then the product (g, u: the same cuBLAS matmuls in both). With bf16's unit roundoff
        # eps = 2^-8 the two h differ by <= 3 eps |h| per element; through the down projection (fp32 accumulation)
        # that is <= 3 eps (|h| @ |W_down|^T), and each side rounds y to bf16 (<= eps |y| each).
        eps = 2.0**-8
        h = (torch.nn.functional.silu(x @ w[0].t()) * (x @ w[1].t())).float()
        bound = 3 * eps * (h.abs() @ w[2].float().abs().t()) * 1.01 + 2 * eps * ref.float().abs()
        within(((got.float() - ref.float()).abs() / bound).max(), 1.0, "compiled vs eager MLP / rounding bound")
    assert not counters["graph_break"]


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda q, qs: (q[:-1], qs), ValueError, "bytes"),
        (lambda q, qs: (q.view(-1)[::2], qs), ValueError, "bytes|contiguous"),
        (lambda q, qs: (q, "not a state"), TypeError, "quant_state"),
        (lambda q, qs: (q.to("meta"), qs), ValueError, "is on"),
    ],
)
def test_bad_input(mutate, exc, match):
    q, qs = bnb_pair((32, 64), torch.float16)
    with pytest.raises(exc, match=match):
        quickloris.dequantize_nf4(*mutate(q, qs))


def test_bad_input_fp4_out_and_missing_state():
    q, qs = bnbF.quantize_4bit(torch.randn(32, 64, device=DEVICE), quant_type="fp4")
    with pytest.raises(ValueError, match="only NF4"):
        quickloris.dequantize_nf4(q, qs)
    q, qs = bnb_pair((32, 64), torch.float16)
    with pytest.raises(ValueError, match="out must be"):
        quickloris.dequantize_nf4(q, qs, out=torch.empty(64, 32, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="out must be"):
        quickloris.dequantize_nf4(q, qs, out=torch.empty(32, 128, dtype=torch.float16, device=DEVICE)[:, :64])
    with pytest.raises(TypeError, match="cannot find an NF4 quantization state"):
        quickloris.dequantize_nf4(torch.randn(4, 4))
    with pytest.raises(TypeError, match="output dtype"):
        quickloris.dequantize_nf4(q, qs, dtype=torch.int8)


def test_non_contiguous_packed_is_rejected():
    q, qs = bnb_pair((32, 64), torch.float16)
    strided = torch.stack([q, q], dim=1).view(-1, 2)[:, 0:1]  # right size, stride 2
    assert not strided.is_contiguous() and strided.numel() == q.numel()
    with pytest.raises(ValueError, match="contiguous"):
        quickloris.dequantize_nf4(strided, qs)


# ------------------------------------------------------------------------------------------------ GPU only


def _plain_twin(q, qs, dtype):
    """The kernel with the inline-PTX unpack (asm) and with the plain Triton unpack/table step."""
    a, a2, c2, off, code, shape, _, bs = nf4_launch.state_fields(qs)
    outs = []
    for use_asm in (True, False):
        out = torch.full(tuple(shape), float("nan"), dtype=dtype, device=q.device)
        nf4_launch.launch(nf4_launch.nf4_dequant_kernel, q, a, a2, c2, off, code, out, out.numel(), bs, use_asm)
        outs.append(out)
    return outs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(
    "shape",
    [(4096, 1024), (14336, 4096), (8192, 2048), (4096, 14336), (3584, 18944), (5120, 13824), (129, 264), (1000, 1000)],
)
def test_gpu_asm_equals_plain_equals_bitsandbytes(seed, dtype, shape):
    q, qs = bnb_pair(shape, dtype, device="cuda")
    asm, plain = _plain_twin(q, qs, dtype)
    expected = bnbF.dequantize_4bit(q, qs)
    assert torch.equal(bits(plain), bits(expected))
    assert torch.equal(bits(asm), bits(expected))
    assert torch.equal(bits(quickloris.dequantize_nf4(q, qs)), bits(expected))


@pytest.mark.gpu
def test_gpu_one_launch_and_no_allocation_with_out():
    q, qs = bnb_pair((4096, 1024), torch.bfloat16, device="cuda")
    out = torch.empty(qs.shape, dtype=torch.bfloat16, device="cuda")
    quickloris.dequantize_nf4(q, qs, out=out)  # compile + warm up
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        quickloris.dequantize_nf4(q, qs, out=out)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]
    assert "nf4_dequant" in kernels[0].name
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    quickloris.dequantize_nf4(q, qs, out=out)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() == before


@pytest.mark.gpu
def test_gpu_direct_launch_matches_triton_launch(seed):
    """Repeat calls launch through the weight's cached launch; results must not change, and a changed state
    invalidates it."""
    nf4_launch._COMPILED.clear()
    for shape, dtype in [((4096, 1024), torch.bfloat16), ((1000, 1000), torch.float16), ((129, 264), torch.bfloat16)]:
        q, qs = bnb_pair(shape, dtype, device="cuda")
        first = quickloris.dequantize_nf4(q, qs)  # checked path, through triton's launcher
        assert nf4_fast.entry_for(q) is not None
        second = quickloris.dequantize_nf4(q, qs)  # the cached direct launch
        out = torch.empty_like(first)
        third = quickloris.dequantize_nf4(q, qs, out=out)
        assert third is out
        for t in (first, second, third):
            assert torch.equal(bits(t), bits(bnbF.dequantize_4bit(q, qs)))
        qs.absmax = torch.randint(0, 256, qs.absmax.shape, dtype=torch.uint8, device="cuda")  # new state tensor
        assert torch.equal(bits(quickloris.dequantize_nf4(q, qs)), bits(bnbF.dequantize_4bit(q, qs)))


@pytest.mark.gpu
@pytest.mark.parametrize("config", [(16, 2, False), (32, 4, True), (64, 8, True), (128, 4, False)])
def test_gpu_every_swept_config_is_exact(seed, config):
    q, qs = bnb_pair((4096, 1024), torch.bfloat16, device="cuda")
    a, a2, c2, off, code, shape, _, bs = nf4_launch.state_fields(qs)
    out = torch.full(tuple(shape), float("nan"), dtype=torch.bfloat16, device="cuda")
    nf4_launch.launch(nf4_launch.nf4_dequant_kernel, q, a, a2, c2, off, code, out, out.numel(), bs, True, config=config)
    assert torch.equal(bits(out), bits(bnbF.dequantize_4bit(q, qs)))


@pytest.mark.gpu
def test_gpu_cached_launch_of_every_input_form(seed):
    """Linear4bit, Params4bit and NF4Tensor calls are served by their cached launches with bitsandbytes' bits, and
    a Params4bit whose bytes moved (``.data = ...``) is not served from its old address."""
    from quickloris.tensor.nf4_tensor import NF4Tensor

    layer, other = linear4bit(1024, 4096, torch.bfloat16), linear4bit(1024, 4096, torch.bfloat16)
    t = NF4Tensor.from_bnb(linear4bit(1024, 512, torch.float16))
    want = bits(bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    want_t = bits(bnbF.dequantize_4bit(t.packed, t.to_bnb().quant_state))
    for _ in range(3):
        assert torch.equal(bits(quickloris.dequantize_nf4(layer)), want)
        assert torch.equal(bits(quickloris.dequantize_nf4(layer.weight)), want)
        assert torch.equal(bits(quickloris.dequantize_nf4(t)), want_t)
    assert all(nf4_fast.entry_for(x) is not None for x in (layer, layer.weight, t))
    layer.weight.data = other.weight.data.clone()
    layer.weight.quant_state = other.weight.quant_state
    got = quickloris.dequantize_nf4(layer)
    assert torch.equal(bits(got), bits(bnbF.dequantize_4bit(other.weight.data, other.weight.quant_state)))
