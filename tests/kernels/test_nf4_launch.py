"""The eager launch path of the NF4 kernel: the explicit `inline_ptx` switch, the once-per-process check of the
Triton / torch internals the direct launch relies on (any change: the public `kernel[grid](...)` path, same bits),
and (GPU) the per-weight cached launches of `nf4_fast` (their CPU tests: test_nf4_fast.py)."""

from __future__ import annotations

import inspect
import re
import types

import bitsandbytes.functional as bnbF
import pytest
import torch

import quickloris
from quickloris.kernels import nf4_fast, nf4_launch

triton = pytest.importorskip("triton")
from triton.compiler.compiler import CompiledKernel  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def bnb_pair(shape, dtype, device=DEVICE):
    w = torch.randn(shape, dtype=dtype, device=device) * 0.05
    return bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")


# ------------------------------------------------------------------------------------------------ inline_ptx


def test_inline_ptx_switch_where_no_inline_ptx_can_run(seed):
    """CPU (the interpreter or the reference): None and False give bitsandbytes' bits, True says why it cannot."""
    q, qs = bnb_pair((96, 128), torch.bfloat16)
    want = bits(bnbF.dequantize_4bit(q, qs))
    for inline_ptx in (None, False):
        assert torch.equal(bits(quickloris.dequantize_nf4(q, qs, inline_ptx=inline_ptx)), want)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="inline_ptx=True needs a CUDA tensor"):
            quickloris.dequantize_nf4(q, qs, inline_ptx=True)
        compiled = torch.compile(
            lambda q: quickloris.dequantize_nf4(q, qs, inline_ptx=False), fullgraph=True, backend="aot_eager"
        )
        assert torch.equal(bits(compiled(q)), want)  # the op's schema carries the switch


def test_the_environment_variable_no_longer_switches_anything(monkeypatch):
    monkeypatch.setenv("QUICKLORIS_NF4_ASM", "0")
    assert nf4_launch.use_asm(torch.device("cpu")) is False
    assert nf4_launch.use_asm(torch.device("cpu"), False) is False
    src = inspect.getsource(nf4_launch)
    assert "QUICKLORIS_NF4_ASM" not in src and "environ" not in src


# ------------------------------------------------------------------------------------------------ the guard


@pytest.fixture
def raw_stream(monkeypatch):
    """A CPU-only torch build has no CUDA stream function; stand one in so the other checks can be exercised."""
    if not hasattr(torch._C, "_cuda_getCurrentRawStream"):
        monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 0, raising=False)


def test_the_installed_internals_pass_the_check(raw_stream):
    assert nf4_launch.internals_problem() is None


def _jit_run_that_launches_otherwise(self, *args, grid, warmup, **kwargs):  # a stand-in with other source
    return _ORIGINAL_RUN(self, *args, grid=grid, warmup=warmup, **kwargs)


_ORIGINAL_RUN = JITFunction.run


@pytest.mark.parametrize(
    "change, match",
    [
        ("no raw stream", "_cuda_getCurrentRawStream is missing"),
        ("no launch hooks", "launch_enter_hook"),
        ("jit launches otherwise", "JITFunction.run launches compiled kernels differently"),
        ("launch_metadata signature", "launch_metadata.*another signature"),
    ],
)
def test_each_changed_internal_is_named(raw_stream, monkeypatch, change, match):
    if change == "no raw stream":
        monkeypatch.delattr(torch._C, "_cuda_getCurrentRawStream")
    elif change == "no launch hooks":
        monkeypatch.setattr(triton.knobs, "runtime", types.SimpleNamespace(launch_enter_hook=None))
    elif change == "jit launches otherwise":
        monkeypatch.setattr(JITFunction, "run", _jit_run_that_launches_otherwise)
    else:
        monkeypatch.setattr(CompiledKernel, "launch_metadata", lambda self, grid, stream, args: None)
    problem = nf4_launch.internals_problem()
    assert problem is not None and re.search(match, problem), problem


class _Compiled:
    function, packed_metadata = object(), object()

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, gridX, gridY, gridZ, stream, function, *args):
        return None


def test_a_compiled_kernel_is_launched_directly_only_with_the_expected_launcher():
    assert nf4_launch._launchable(_Compiled())
    other = _Compiled()
    other.run = lambda gridX, gridY, gridZ, stream, function, cooperative, *args: None  # one more argument
    assert not nf4_launch._launchable(other)
    other.run = lambda *args: None
    assert not nf4_launch._launchable(other)
    unloaded = _Compiled()
    unloaded.function = None
    assert not nf4_launch._launchable(unloaded)


# ------------------------------------------------------------------------------------------------ GPU only


@pytest.fixture
def fresh_launch_caches():
    def clear():
        nf4_launch.direct_launch_problem.cache_clear()
        nf4_launch._COMPILED.clear()
        nf4_fast.clear()

    clear()
    yield
    clear()


def _launcher_of_another_signature(monkeypatch):
    """Triton's launcher called through `(*args)`: still works for Triton, no longer the signature we call."""
    from triton.backends.nvidia.driver import CudaLauncher

    original = CudaLauncher.__call__

    def call(self, *args):  # no functools.wraps: its __wrapped__ would show the old signature again
        return original(self, *args)

    monkeypatch.setattr(CudaLauncher, "__call__", call)


@pytest.mark.gpu
@pytest.mark.parametrize("change", ["no raw stream", "jit launches otherwise", "launcher signature"])
def test_gpu_changed_internals_take_the_public_launch_and_stay_bit_exact(
    seed, monkeypatch, fresh_launch_caches, change
):
    q, qs = bnb_pair((1000, 1000), torch.bfloat16, device="cuda")
    want = bits(bnbF.dequantize_4bit(q, qs))  # also initialises Triton's driver before anything is patched
    quickloris.dequantize_nf4(q, qs)
    nf4_launch.direct_launch_problem.cache_clear()
    nf4_launch._COMPILED.clear()
    nf4_fast.clear()
    if change == "no raw stream":
        monkeypatch.delattr(torch._C, "_cuda_getCurrentRawStream")
    elif change == "jit launches otherwise":
        monkeypatch.setattr(JITFunction, "run", _jit_run_that_launches_otherwise)
    else:
        _launcher_of_another_signature(monkeypatch)
    public = []
    original = nf4_launch.nf4_dequant_kernel.run
    monkeypatch.setattr(nf4_launch.nf4_dequant_kernel, "run", lambda *a, **k: public.append(1) or original(*a, **k))
    out = torch.empty(qs.shape, dtype=torch.bfloat16, device="cuda")
    results = [
        quickloris.dequantize_nf4(q, qs),
        quickloris.dequantize_nf4(q, qs),
        quickloris.dequantize_nf4(q, qs, out=out),
        quickloris.dequantize_nf4(q, qs, inline_ptx=False),
    ]
    assert len(public) == 4  # every call through Triton's public launcher
    assert not nf4_launch._COMPILED and nf4_fast.entry_for(q) is None
    assert (nf4_launch.direct_launch_problem() is None) == (change == "launcher signature")
    for r in results:
        assert torch.equal(bits(r), want)


@pytest.mark.gpu
def test_gpu_the_direct_launch_is_used_when_nothing_changed(seed, monkeypatch, fresh_launch_caches):
    q, qs = bnb_pair((1000, 1000), torch.bfloat16, device="cuda")
    assert nf4_launch.direct_launch_problem() is None
    public = []
    original = nf4_launch.nf4_dequant_kernel.run
    monkeypatch.setattr(nf4_launch.nf4_dequant_kernel, "run", lambda *a, **k: public.append(1) or original(*a, **k))
    results = [quickloris.dequantize_nf4(q, qs) for _ in range(3)]
    assert len(public) == 1 and nf4_fast.entry_for(q) is not None  # the first call checks, then caches
    want = bits(bnbF.dequantize_4bit(q, qs))
    assert all(torch.equal(bits(r), want) for r in results)


@pytest.mark.gpu
def test_gpu_inline_ptx_switch_and_plans_follow_it(seed, fresh_launch_caches):
    q, qs = bnb_pair((4096, 1024), torch.float16, device="cuda")
    want = bits(bnbF.dequantize_4bit(q, qs))
    for inline_ptx, planned_asm in [
        (None, True),
        (None, True),
        (False, False),
        (False, False),
        (True, True),
        (None, True),
    ]:
        assert torch.equal(bits(quickloris.dequantize_nf4(q, qs, inline_ptx=inline_ptx)), want)
        assert nf4_fast.entry_for(q).asm is planned_asm, inline_ptx
