"""The views FSDP2's `fully_shard` takes of an `NF4Tensor` parameter: chunk/split, new_zeros, narrow (slice), view(-1),
as_strided, pin_memory (registered with `quickloris.tensor.nf4_tensor.implements` for its ``__torch_dispatch__``).

NF4 data is a flat row-major stream, so a view is a relabelled shape, and rows ``[a, b)`` of an ``[out, in]``
weight are slices of each inner tensor - bytes ``[a·in/2, b·in/2)``, absmax ``[a·in/B, ⌈b·in/B⌉)``, absmax2
``[a·in/(256B), ...)`` - provided ``a·in`` is a multiple of `NF4Tensor.shard_unit` (B·256 values nested), so the
slice owns whole scale groups and is itself a valid NF4 weight; anything else raises.
"""

from __future__ import annotations

import math

import torch

from quickloris.tensor.nf4_tensor import NF4Tensor, check_dtype, implements, rebuild, state_of

aten = torch.ops.aten


def _make(t: NF4Tensor, inner: dict[str, torch.Tensor], shape, dtype: torch.dtype | None = None) -> NF4Tensor:
    return NF4Tensor(
        inner["packed"],
        state_of(inner, torch.Size(shape), dtype or t.dtype, t.blocksize, t.nested_blocksize),
        _validate=False,
    )


def _cols(t: NF4Tensor) -> int:
    return int(t.shape[1]) if t.dim() == 2 else 1


def _rows(t: NF4Tensor, start: int, stop: int) -> NF4Tensor:
    """Rows [start, stop) as views of the inner tensors (a shard of FSDP2)."""
    cols, unit, rows = _cols(t), t.shard_unit, int(t.shape[0])
    n0, n1 = start * cols, stop * cols
    if n0 % unit or (n1 % unit and stop != rows):
        raise ValueError(
            f"NF4Tensor {list(t.shape)}: rows [{start}, {stop}) do not start and end on whole groups of "
            f"{unit} values (blocksize {t.blocksize}"
            + (" x 256 absmax per absmax2 scale" if t.nested else "")
            + "), so their bytes and scales would not be self-contained. Shard NF4 models with "
            "quickloris.parallel.fsdp.shard_model, which replicates weights that cannot be split"
        )
    bs = t.blocksize
    blocks0, blocks1 = n0 // bs, -(-n1 // bs)
    inner = dict(t._inner_tensors(), packed=t.packed[n0 // 2 : (n1 + 1) // 2], absmax=t.absmax[blocks0:blocks1])
    if t.nested:
        nb = t.nested_blocksize
        inner["absmax2"] = t.absmax2[blocks0 // nb : -(-blocks1 // nb)]
    return _make(t, inner, (stop - start, cols) if t.dim() == 2 else (stop - start,))


def _dim0(dim: int, t: NF4Tensor, op: str) -> None:
    if dim not in (0, -t.dim()):
        raise NotImplementedError(f"NF4Tensor does not support {op} along dim {dim}: whole rows (dim 0) only")


def _split_sizes(t: NF4Tensor, sizes, dim: int = 0) -> list[NF4Tensor]:
    _dim0(dim, t, "split")
    out, start = [], 0
    for size in sizes:
        out.append(_rows(t, start, start + int(size)))
        start += int(size)
    return out


def _split(t: NF4Tensor, split_size, dim: int = 0) -> list[NF4Tensor]:
    rows, size = int(t.shape[0]), int(split_size)
    return _split_sizes(t, [min(size, rows - s) for s in range(0, rows, size)] or [0], dim)


def _slice(t: NF4Tensor, dim: int = 0, start=None, end=None, step: int = 1) -> NF4Tensor:
    _dim0(dim, t, "slicing")
    if step != 1:
        raise NotImplementedError(f"NF4Tensor does not support slicing with step {step}: whole row ranges only")
    start, stop, _ = slice(start, end).indices(int(t.shape[0]))
    return _rows(t, start, max(start, stop))


def _shape_of(t: NF4Tensor, size) -> torch.Size:
    size = [int(s) for s in size]
    if size.count(-1) == 1:
        known = math.prod(s for s in size if s != -1)
        size[size.index(-1)] = t.numel() // known if known else 0
    if math.prod(size) != t.numel() or len(size) not in (1, 2):
        raise NotImplementedError(
            f"NF4Tensor does not support viewing {list(t.shape)} as {list(size)}: only as a 1-D "
            f"or 2-D tensor of the same {t.numel()} values"
        )
    return torch.Size(size)


def _view(t: NF4Tensor, size) -> NF4Tensor:
    return _make(t, t._inner_tensors(), _shape_of(t, size))


def _as_strided(t: NF4Tensor, size, stride, storage_offset=None) -> NF4Tensor:
    shape = _shape_of(t, size)
    contiguous = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
    if [int(s) for s in stride] != contiguous or (storage_offset or 0) != 0:
        raise NotImplementedError(
            f"NF4Tensor does not support as_strided with size {list(size)}, stride "
            f"{list(stride)}, offset {storage_offset}: only a contiguous view of all values"
        )
    return _make(t, t._inner_tensors(), shape)


def _new_zeros(t: NF4Tensor, size, *, dtype=None, layout=None, device=None, pin_memory=None) -> NF4Tensor:
    """An all-zero-bytes NF4 tensor of `size` in `t`'s format (a buffer FSDP2 copies shards into)."""
    shape = torch.Size(int(s) for s in size)
    if len(shape) not in (1, 2):
        raise NotImplementedError(f"NF4Tensor does not support {len(shape)}-D buffers ({list(shape)}): 1-D or 2-D only")
    n, dev = math.prod(shape), device or t.device
    nblocks = -(-n // t.blocksize)
    zeros = lambda k, like: torch.zeros(k, dtype=like.dtype, device=dev)  # noqa: E731
    inner = {k: v.to(dev, copy=True) for k, v in t._inner_tensors().items()}  # tables (code, offset, code2)
    inner.update(packed=torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=dev), absmax=zeros(nblocks, t.absmax))
    if t.nested:
        inner["absmax2"] = zeros(-(-nblocks // t.nested_blocksize), t.absmax2)
    out = _make(t, inner, shape, None if dtype is None else check_dtype(dtype))
    return rebuild(out, lambda v: v.pin_memory()) if pin_memory else out


def _pin(t: NF4Tensor, device=None) -> NF4Tensor:
    return rebuild(t, lambda v: v.pin_memory())


def _is_pinned(t: NF4Tensor, device=None) -> bool:
    return t.packed.is_pinned()


implements(aten.split.Tensor)(_split)
implements(aten.split_with_sizes.default)(_split_sizes)
implements(aten.slice.Tensor)(_slice)
implements(aten.view.default)(_view)
implements(aten.as_strided.default)(_as_strided)
implements(aten.new_zeros.default, aten.new_empty.default)(_new_zeros)
implements(aten._pin_memory.default)(_pin)
implements(aten.is_pinned.default)(_is_pinned)
