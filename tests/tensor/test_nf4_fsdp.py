"""NF4Tensor under FSDP2: row shards on whole 16384-value groups are self-contained NF4 weights, the all-gather
extension moves the bytes as they are (bit-exact round trip), the init-time views FSDP2 takes work, anything
misaligned raises; and real `fully_shard` on 2 gloo ranks gathers bit-identical bytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quickloris.quant.nf4 import dequantize_nf4_reference
from quickloris.tensor.nf4_tensor import NF4Tensor
from tests.parallel.dist_utils import run_ranks


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def deq(t: NF4Tensor, dtype=None) -> torch.Tensor:
    packed, state = t.nf4_components()
    return dequantize_nf4_reference(packed, state, dtype or t.dtype)


class FakeMesh:
    def __init__(self, n: int):
        self.n = n

    def size(self) -> int:
        return self.n


def _inner(t: NF4Tensor) -> dict[str, torch.Tensor]:
    return t._inner_tensors()


def test_shard_unit_and_shardable():
    w = NF4Tensor.from_float(torch.randn(64, 512))
    assert w.shard_unit == 64 * 256
    assert w.shardable(1) and w.shardable(2) and not w.shardable(4)  # 16 x 512 = 8192 values: half a group
    assert NF4Tensor.from_float(torch.randn(63, 500)).shardable(1)  # one shard: the whole weight
    assert not NF4Tensor.from_float(torch.randn(66, 512)).shardable(2)  # 33 x 512: not whole groups
    plain = NF4Tensor.from_float(torch.randn(12, 128), double_quant=False)
    assert plain.shard_unit == 64 and plain.shardable(4) and not plain.shardable(8)  # 8 does not divide 12 rows


@pytest.mark.parametrize(
    "shape,world,nested",
    [((64, 512), 2, True), ((96, 1024), 3, True), ((8, 16384), 8, True), ((10, 192), 5, False), ((5, 16384), 2, True)],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunks_are_self_contained_row_shards(seed, shape, world, nested, dtype):
    t = NF4Tensor.from_float(torch.randn(shape, dtype=dtype), double_quant=nested)
    full = deq(t)
    start = 0
    shards = torch.chunk(t, world, dim=0)  # what fully_shard does first; (5, 16384) over 2: 3 rows + 2 rows
    assert sum(s.shape[0] for s in shards) == shape[0]
    for s in shards:
        assert type(s) is NF4Tensor and s.dtype == dtype and s.shape[1] == shape[1] and s.nested == nested
        s.nf4_state().validate(s.packed)  # a valid NF4 weight of its own
        assert s.packed.untyped_storage().data_ptr() == t.packed.untyped_storage().data_ptr()  # a view, no copy
        assert s.offset is t.offset and s.code is t.code
        assert torch.equal(bits(deq(s)), bits(full[start : start + s.shape[0]]))
        start += s.shape[0]
    sizes = [shape[0] - shape[0] // 2, shape[0] // 2]  # every case here splits in two on a group boundary
    parts = torch.split(t, sizes)
    assert torch.equal(bits(deq(parts[1])), bits(full[sizes[0] :]))


def test_misaligned_rows_raise():
    t = NF4Tensor.from_float(torch.randn(64, 100))
    with pytest.raises(ValueError, match="whole groups of 16384.*shard_model"):
        torch.chunk(t, 2)
    with pytest.raises(ValueError, match="whole groups"):
        t[1:]
    with pytest.raises(NotImplementedError, match="does not support split along dim 1"):
        torch.chunk(NF4Tensor.from_float(torch.randn(64, 512)), 2, dim=1)
    with pytest.raises(NotImplementedError, match="step 2"):
        NF4Tensor.from_float(torch.randn(64, 512))[::2]


def test_views_fully_shard_takes_at_init(seed):
    t = NF4Tensor.from_float(torch.randn(64, 512, dtype=torch.bfloat16))
    shard = torch.chunk(t, 2)[1]
    padded = shard.new_zeros(shard.shape)  # FSDP2 pre-pads every shard into a fresh buffer, then copies in
    assert type(padded) is NF4Tensor and padded.packed.data_ptr() != shard.packed.data_ptr()
    padded.narrow(0, 0, shard.shape[0]).copy_(shard)
    assert torch.equal(bits(deq(padded)), bits(deq(shard)))
    flat = padded.view(-1)  # FSDP2 keeps a flat view of the buffer
    assert flat.shape == (shard.numel(),) and flat.packed is padded.packed
    assert torch.equal(bits(deq(flat)), bits(deq(shard).flatten()))
    same = torch.as_strided(t, t.shape, t.stride(), 0)
    assert same.shape == t.shape and same.packed is t.packed
    assert not t.is_pinned()
    empty = t.new_empty(0)
    assert empty.shape == (0,) and empty.packed.numel() == 0
    assert t.new_zeros(t.shape, dtype=torch.float16).dtype == torch.float16
    with pytest.raises(NotImplementedError, match="as_strided"):
        torch.as_strided(t, (64, 512), (1, 64), 0)
    with pytest.raises(NotImplementedError, match="3-D"):
        t.new_zeros((2, 2, 2))
    with pytest.raises(ValueError, match="2-D"):  # the public constructor still takes [out, in] weights only
        NF4Tensor(flat.packed, flat.nf4_state())


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("nested", [True, False])
def test_all_gather_extension_round_trip_is_bit_exact(seed, world, nested):
    t = NF4Tensor.from_float(torch.randn(128, 512, dtype=torch.bfloat16), double_quant=nested)
    shards = [s.clone() for s in torch.chunk(t, world)]  # each rank holds its own copy
    gathered = [s.fsdp_pre_all_gather(FakeMesh(world), t.shape, t.stride(), None, None) for s in shards]
    inputs = [g[0] for g in gathered]
    assert all(x.dtype in (torch.uint8, torch.float32) for x in inputs[0])  # bytes and fp32 scales, never cast
    assert len(inputs[0]) == (3 if nested else 2)  # packed, absmax (, absmax2): offset and tables are replicated
    outputs = [torch.cat([inp[i] for inp in inputs]) for i in range(len(inputs[0]))]  # what all-gather does
    full, to_free = shards[0].fsdp_post_all_gather(outputs, gathered[0][1], torch.float16)
    assert type(full) is NF4Tensor and full.shape == t.shape and full.dtype == torch.float16  # relabelled only
    for name, v in _inner(t).items():
        assert torch.equal(_inner(full)[name], v), name
    assert full.packed.data_ptr() == outputs[0].data_ptr() and len(to_free) == len(outputs)  # views of the buffers
    assert torch.equal(bits(deq(full)), bits(deq(t, torch.float16)))
    # Later steps: FSDP2 frees the buffers' storage after use and re-gathers into them, passing the same parameter.
    for o in outputs:
        o.untyped_storage().resize_(0)
        o.untyped_storage().resize_(o.numel() * o.element_size())
        o.zero_()
    for i, o in enumerate(outputs):
        o.copy_(torch.cat([inp[i] for inp in inputs]))
    assert shards[0].fsdp_post_all_gather(outputs, gathered[0][1], torch.float16, out=full) is None
    assert torch.equal(bits(deq(full)), bits(deq(t, torch.float16)))
    fresh = [o.clone() for o in outputs]  # buffers `out` does not view: copied into it
    full.packed.zero_()
    shards[0].fsdp_post_all_gather(fresh, gathered[0][1], torch.float16, out=full)
    assert torch.equal(full.packed, t.packed)


def test_pre_all_gather_refuses_unequal_shards():
    t = NF4Tensor.from_float(torch.randn(48, 1024))
    shard = torch.chunk(t, 3)[0]  # 16 rows: whole groups, but 48 rows do not split over 2 ranks
    with pytest.raises(ValueError, match="equal shards of whole 16384-value groups"):
        shard.fsdp_pre_all_gather(FakeMesh(2), torch.Size([33, 1024]), (1024, 1), None, None)


# ------------------------------------------------------------------------------------------------------------
# real fully_shard, 2 gloo ranks


class _Holder(nn.Module):
    def __init__(self, weights):
        super().__init__()
        self.ws = nn.ParameterList([nn.Parameter(w, requires_grad=False) for w in weights])
        self.lin = nn.Linear(8, 8)  # a trainable neighbour in the same FSDP group (uint8/fp32/fp32 all-gather)

    def forward(self, x):
        return self.lin(x)


def _fully_shard_ranks(ctx, seed: int, offload: bool) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    torch.manual_seed(seed)  # the same weights on both ranks
    weights = [NF4Tensor.from_float(torch.randn(s)) for s in ((64, 512), (32, 1024), (128, 256))]
    originals = [w.to(ctx.device) for w in weights]
    module = _Holder(weights).to(ctx.device)
    cuda = ctx.device.type == "cuda"
    fully_shard(
        module,
        mesh=ctx.mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16),
        offload_policy=CPUOffloadPolicy(pin_memory=cuda) if offload else OffloadPolicy(),
    )
    for p, w in zip(module.ws, originals):
        local = p.to_local()
        rows = w.shape[0] // ctx.world_size
        assert type(local) is NF4Tensor and local.shape == (rows, w.shape[1])
        assert local.device.type == ("cpu" if offload else ctx.device.type)
        assert local.is_pinned() == (offload and cuda)
        mine = torch.chunk(w, ctx.world_size)[ctx.rank]
        for name, v in _inner(mine).items():
            assert torch.equal(_inner(local)[name], v), name
    for _ in range(2):  # the first all-gather builds the unsharded parameters, the second refills them in place
        module.unshard()
        for p, w in zip(module.ws, originals):
            assert type(p) is NF4Tensor and p.dtype == torch.bfloat16 and p.shape == w.shape
            assert p.device == ctx.device
            for name, v in _inner(w).items():
                assert torch.equal(_inner(p)[name], v), name
            assert torch.equal(bits(deq(p)), bits(deq(w, torch.bfloat16)))
        module.reshard()


@pytest.mark.parametrize("offload", [False, True])
def test_fully_shard_two_ranks_gathers_identical_bytes(seed, offload):
    run_ranks(_fully_shard_ranks, 2, seed, offload)


@pytest.mark.multigpu
@pytest.mark.parametrize("offload", [False, True])
def test_fully_shard_two_gpus_gathers_identical_bytes(seed, offload):
    run_ranks(_fully_shard_ranks, 2, seed, offload, device="cuda")  # NCCL; offload: pinned CPU shards
