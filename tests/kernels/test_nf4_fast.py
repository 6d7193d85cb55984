"""The eager fast path (`quickloris.kernels.nf4_fast`): a cached launch per weight object gives the checked path's
bits, and a changed or new weight is never served from a stale entry.

On CPU an entry is made exactly as a checked CUDA call makes it (`launch`'s arguments, `remember`), with a stand-in
compiled kernel whose launcher runs the real kernel under the Triton interpreter on the arguments the cached path
passes (the packed bytes arrive as an address: the stand-in maps it back to the tensor). Counting its launches tells
a cached call from one that took the checked path.
"""

from __future__ import annotations

import gc
import weakref

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch

import quickloris
from quickloris.kernels import nf4_dequant, nf4_fast, nf4_launch
from quickloris.quant import nf4
from quickloris.tensor.nf4_tensor import NF4Tensor

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU stand-in for the CUDA launch")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


class _Interpreted:
    """A compiled kernel whose launcher runs the Triton kernel (interpreted) on the arguments it is given."""

    function, packed_metadata = object(), object()

    def __init__(self, tensors_by_address: dict[int, torch.Tensor]):
        self.tensors, self.launches = tensors_by_address, 0

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, gridX, gridY, gridZ, stream, function, metadata, launch_metadata, enter, leave, packed, *rest):
        self.launches += 1
        packed = self.tensors[packed] if isinstance(packed, int) else packed
        ints, constexprs = rest[:8], rest[8:]
        named = dict(zip(nf4_launch._CONSTEXPR_NAMES, constexprs))
        nf4_launch.nf4_dequant_kernel[(gridX,)](packed, *ints, **named, num_warps=4)


@pytest.fixture
def stub(monkeypatch):
    """CUDA's device and stream queries stood in; every entry's kernel is one `_Interpreted` (`.cache(...)`)."""
    monkeypatch.setattr(nf4_fast, "_current_device", lambda: None)  # the CPU device's index
    monkeypatch.setattr(nf4_fast, "_raw_stream", lambda index: 0)
    kernel = _Interpreted({})

    def cache(weight, quant_state=None, inline_ptx=None, dtype=None, expect=True):
        """What a checked CUDA call of ``dequantize_nf4(weight, quant_state)`` leaves behind."""
        packed, state = nf4_dequant._resolve(weight, quant_state)
        a, a2, c2, off, code, shape, state_dtype, bs = nf4_launch.state_fields(state)
        out = torch.empty(shape, dtype=dtype or state_dtype)
        asm = nf4_launch.use_asm(packed.device, inline_ptx)
        _, grid, args = nf4_launch.launch(
            nf4_launch.nf4_dequant_kernel, packed, a, a2, c2, off, code, out, out.numel(), bs, asm
        )
        kernel.tensors[packed.data_ptr()] = packed  # kept alive: no later tensor reuses its address
        nf4_fast.remember(weight, quant_state, packed, state, asm, (kernel, grid, args))
        assert (nf4_fast.entry_for(weight) is not None) == expect
        return out

    kernel.cache = cache
    yield kernel
    nf4_fast.clear()


def linear4bit(in_f, out_f, dtype=torch.bfloat16):
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(
        torch.randn(out_f, in_f, dtype=dtype), requires_grad=False, compress_statistics=True, quant_type="nf4"
    )
    layer.weight = layer.weight._quantize("cpu")
    return layer


def reference(packed, qs) -> torch.Tensor:
    return bits(bnbF.dequantize_4bit(packed, qs))


def forms():
    """(name, the call's arguments, the reference bits), one weight of its own per form."""
    layer, p, p2 = linear4bit(256, 96), linear4bit(128, 64).weight, linear4bit(192, 80, torch.float16).weight
    t = NF4Tensor.from_float(torch.randn(64, 320, dtype=torch.bfloat16))
    q, qs = bnbF.quantize_4bit(torch.randn(72, 128), compress_statistics=False, quant_type="nf4")
    packed, state = t.nf4_components()
    return [
        ("Linear4bit", (layer,), reference(layer.weight.data, layer.weight.quant_state)),
        ("Params4bit", (p,), reference(p.data, p.quant_state)),
        ("packed + QuantState", (p2.data, p2.quant_state), reference(p2.data, p2.quant_state)),
        ("packed + QuantState, not nested", (q, qs), reference(q, qs)),
        ("NF4Tensor", (t,), bits(nf4.dequantize_nf4_reference(packed, state))),
        ("packed + NF4State", (packed, state), bits(nf4.dequantize_nf4_reference(packed, state))),
    ]


def test_cached_launches_are_bit_identical_to_the_checked_path(seed, stub):
    for name, call, want in forms():
        unchecked = quickloris.dequantize_nf4(*call)  # no entry yet: the checked path
        stub.cache(*call)
        before = stub.launches
        got = quickloris.dequantize_nf4(*call)
        assert stub.launches == before + 1, f"{name}: not served by its cached launch"
        assert got.dtype == unchecked.dtype and got.shape == unchecked.shape, name
        assert torch.equal(bits(got), bits(unchecked)) and torch.equal(bits(got), want), name
        out = torch.full_like(got, float("nan"))
        assert quickloris.dequantize_nf4(*call, out=out) is out and stub.launches == before + 2, name
        assert torch.equal(bits(out), want), name


def _served(stub, *call, **kwargs) -> tuple[torch.Tensor, bool]:
    before = stub.launches
    got = quickloris.dequantize_nf4(*call, **kwargs)
    return got, stub.launches > before


def test_bytes_changed_in_place_are_read_at_launch(seed, stub):
    p = linear4bit(128, 64).weight
    stub.cache(p)
    other = linear4bit(128, 64).weight
    p.data.copy_(other.data)  # same address, new bytes: still the cached launch, and the new bytes
    p.quant_state.absmax.copy_(other.quant_state.absmax)
    p.quant_state.state2.absmax.copy_(other.quant_state.state2.absmax)
    p.quant_state.offset.copy_(other.quant_state.offset)
    got, served = _served(stub, p)
    assert served and torch.equal(bits(got), reference(other.data, other.quant_state))


@pytest.mark.parametrize(
    "change",
    [
        "layer.weight = new Params4bit",
        "p.data = other bytes",
        "p.quant_state = other state",
        "qs.absmax = new tensor (QuantState.to)",
        "qs.state2.absmax = new tensor",
        "qs.offset = new tensor",
        "qs.shape = other shape",
    ],
)
def test_a_changed_bitsandbytes_weight_is_not_served_stale(seed, stub, change):
    layer, other = linear4bit(128, 64), linear4bit(128, 64)
    p, qs, o, oqs = layer.weight, layer.weight.quant_state, other.weight, other.weight.quant_state
    for call in ((layer,), (p,)) if change.startswith("layer") else ((p,), (layer,)):
        stub.cache(*call)
    if change == "layer.weight = new Params4bit":
        layer.weight = o
    elif change == "p.data = other bytes":
        p.data = o.data.clone()
    elif change == "p.quant_state = other state":
        p.quant_state = oqs
    elif change == "qs.absmax = new tensor (QuantState.to)":
        qs.absmax = oqs.absmax.clone()
    elif change == "qs.state2.absmax = new tensor":
        qs.state2.absmax = oqs.state2.absmax.clone()
    elif change == "qs.offset = new tensor":
        qs.offset = oqs.offset.clone()
    else:  # the same bytes read as another [out, in]: a new shape must not reuse the old one
        qs.shape = torch.Size((32, 256))
    cur = layer.weight
    want = reference(cur.data, cur.quant_state)
    for call in ((layer,), (cur,)):
        got, served = _served(stub, *call)
        assert not served, f"{change}: served by a stale cached launch"
        assert got.shape == cur.quant_state.shape and torch.equal(bits(got), want), change


def test_a_changed_nf4_state_is_not_served_stale(seed, stub):
    t = NF4Tensor.from_float(torch.randn(64, 256, dtype=torch.bfloat16))
    packed, state = t.nf4_components()
    stub.cache(packed, state)
    other = NF4Tensor.from_float(torch.randn(64, 256, dtype=torch.bfloat16))
    state.absmax = other.absmax
    got, served = _served(stub, packed, state)
    assert not served
    assert torch.equal(bits(got), bits(nf4.dequantize_nf4_reference(packed, state)))


def test_a_new_nf4_state_over_the_same_tensors_is_served(seed, stub):
    """`quickloris::nf4_matmul` (the training step's NF4 matmul) builds a new NF4State, with a new Size, per call:
    the same tensors are the same launch. A new state that differs in one tensor, the shape or the blocksize is
    not."""
    import dataclasses

    t = NF4Tensor.from_float(torch.randn(64, 256, dtype=torch.bfloat16))
    packed, state = t.nf4_components()
    want = bits(nf4.dequantize_nf4_reference(packed, state))
    stub.cache(packed, state)
    fresh = dataclasses.replace(state, shape=torch.Size(list(state.shape)), blocksize=int(str(state.blocksize)))
    assert fresh is not state and fresh.shape is not state.shape
    got, served = _served(stub, packed, fresh)
    assert served and torch.equal(bits(got), want)
    other = NF4Tensor.from_float(torch.randn(64, 256, dtype=torch.bfloat16))
    for name, changed in (
        ("absmax", dataclasses.replace(state, absmax=other.absmax)),
        ("absmax2", dataclasses.replace(state, absmax2=state.absmax2.clone())),
        ("shape", dataclasses.replace(state, shape=torch.Size((128, 128)))),
    ):
        got, served = _served(stub, packed, changed)
        assert not served, name
        assert torch.equal(bits(got), bits(nf4.dequantize_nf4_reference(packed, changed))), name


def test_other_dtype_out_and_inline_ptx_take_the_checked_path(seed, stub):
    p = linear4bit(128, 64).weight
    stub.cache(p)
    want32 = nf4.dequantize_nf4_reference(p.data, nf4.state_from_bnb(p.quant_state), torch.float32)
    got, served = _served(stub, p, dtype=torch.float32)
    assert not served and got.dtype == torch.float32 and torch.equal(bits(got), bits(want32))
    got, served = _served(stub, p, dtype=torch.bfloat16)  # the entry's own dtype, said explicitly
    assert served and torch.equal(bits(got), reference(p.data, p.quant_state))
    with pytest.raises(ValueError, match="out must be"):  # a wrong `out` still gets its one clear line
        quickloris.dequantize_nf4(p, out=torch.empty(128, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="inline_ptx=True needs a CUDA tensor"):
        quickloris.dequantize_nf4(p, inline_ptx=True)
    got, served = _served(stub, p, inline_ptx=False)  # where no inline PTX can run, False is the default
    assert served and torch.equal(bits(got), reference(p.data, p.quant_state))


def test_no_entry_while_compiling_and_for_attribute_forwarding_modules(seed, stub):
    layer = linear4bit(128, 64)
    stub.cache(layer)
    compiled = torch.compile(lambda: quickloris.dequantize_nf4(layer.weight), fullgraph=True, backend="aot_eager")
    before = stub.launches
    assert torch.equal(bits(compiled()), reference(layer.weight.data, layer.weight.quant_state))
    assert stub.launches == before  # traced through the op, never the cached launch

    class Forwarding(torch.nn.Module):  # like wrappers that forward `.weight` to the layer they wrap
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self._parameters["weight"] = linear4bit(128, 64).weight  # its own, which `.weight` does not return

        def __getattr__(self, name):
            if name == "weight":
                return self.inner.weight
            return super().__getattr__(name)

    wrapper = Forwarding(layer)
    assert wrapper.weight is layer.weight and wrapper._parameters["weight"] is not layer.weight
    stub.cache(wrapper, expect=False)


def test_entries_never_answer_for_an_object_that_reuses_an_id():
    a, b = torch.empty(1), torch.empty(1)
    entry_a, entry_b = nf4_fast._Entry(), nf4_fast._Entry()
    entry_a.ref, entry_b.ref = weakref.ref(a), weakref.ref(b)
    try:
        nf4_fast._ENTRIES[id(a)] = entry_a
        assert nf4_fast.entry_for(a) is entry_a
        nf4_fast._ENTRIES[id(b)] = entry_a  # as if b took a dead a's id
        assert nf4_fast.entry_for(b) is None
        assert nf4_fast.cached(b, None, None, None, None) is None
        nf4_fast._ENTRIES[id(b)] = entry_b
        nf4_fast._forget(id(b), entry_a.ref)  # a's late weakref callback must not drop b's entry
        assert nf4_fast.entry_for(b) is entry_b
        nf4_fast._forget(id(b), entry_b.ref)
        assert id(b) not in nf4_fast._ENTRIES
    finally:
        nf4_fast.clear()


def test_a_freed_weight_takes_its_entry_with_it(seed, stub):
    p = linear4bit(128, 64).weight
    stub.cache(p)
    key = id(p)
    del p
    gc.collect()
    assert key not in nf4_fast._ENTRIES
