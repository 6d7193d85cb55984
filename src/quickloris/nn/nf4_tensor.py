"""`NF4Tensor`: a frozen 4-bit weight in bitsandbytes' NF4 layout, as a traceable tensor subclass.

An `NF4Tensor` *looks like* the dense weight it stands for (``shape == [out, in]``, ``dtype`` = the dtype it
dequantizes to, e.g. bf16) but *holds* only the quantized data, as plain inner tensors:

* ``packed``: uint8 ``[ceil(n/2), 1]`` (two 4-bit codes per byte; bitsandbytes' ``Params4bit.data`` layout),
* ``absmax`` (uint8 codes if nested, else float32), ``code`` (float32 [16]) and, with double quantization,
  ``absmax2`` / ``code2`` / ``offset`` (float32) - the fields of `quickloris.quant.nf4.NF4State`.

Memory: ~4.13 bits per value (0.52 bytes) instead of 2 bytes for bf16. The bytes are never reinterpreted as
floats and never re-quantized: `from_bnb` wraps a bitsandbytes ``Params4bit`` without copying, `from_checkpoint`
reads a ``*-bnb-4bit`` state dict, `from_float` quantizes a 16/32-bit weight bit-exactly like bitsandbytes.

Why a subclass. `__tensor_flatten__` / `__tensor_unflatten__` make it traceable: `torch.compile` and AOTAutograd
see the inner tensors as graph inputs, so a compiled region can take an `NF4Tensor` parameter and read
``w.packed`` etc. (what `quickloris.ops.qlora_linear` does) with no graph break. The FSDP2 issue extends the same
class with ``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` (all-gathering the uint8 bytes and the state
tensors, never floats) and the few view ops sharding needs.

`__torch_dispatch__` implements, explicitly, only what moving a frozen parameter around needs:

* ``detach`` / ``alias`` (``nn.Parameter``, ``requires_grad_``): the same bytes, a new wrapper;
* ``_to_copy`` (``.to(device)``, ``module.to(...)``): the bytes move; a *dtype* change relabels the dtype the
  weight dequantizes to (the 4-bit data is untouched, so ``model.to(torch.bfloat16)`` never silently inflates the
  weights to a dense copy); get dense values with `dequantize` / ``quickloris.dequantize_nf4(w)``;
* ``clone`` (``copy.deepcopy``): copies of the inner tensors; ``copy_`` from another NF4Tensor of the same format.

Every other op raises NotImplementedError naming the op: arithmetic on a 4-bit weight is a bug (use `QLoRALinear`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from quickloris.quant.nf4 import (
    FLOAT_DTYPES, NESTED_BLOCKSIZE, NF4State, Rounding, as_packed_uint8, quantize_nf4, state_from_bnb,
    state_from_checkpoint, state_to_checkpoint)

aten = torch.ops.aten

# Inner tensors in flatten order; the optional ones (double quantization) are omitted when absent.
_INNER = ("packed", "absmax", "code", "offset", "absmax2", "code2")


class NF4Tensor(torch.Tensor):
    """A frozen NF4 weight (bitsandbytes layout) that presents itself as a ``[out, in]`` tensor of ``dtype``.

    Build it with `from_bnb`, `from_checkpoint`, `from_float` or ``NF4Tensor(packed, state)``. Read its
    quantization data through the attributes ``packed, absmax, code, offset, absmax2, code2, blocksize`` (a
    compiled region may do so), or `nf4_components()` (eager; ``quickloris.dequantize_nf4`` accepts the tensor).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    offset: torch.Tensor | None
    absmax2: torch.Tensor | None
    code2: torch.Tensor | None
    blocksize: int
    nested_blocksize: int

    @staticmethod
    def __new__(cls, packed: torch.Tensor, state: NF4State, *, _validate: bool = True):
        if not isinstance(state, NF4State):
            raise TypeError(f"state must be a quickloris NF4State, got {type(state).__name__}")
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"packed must be a uint8 tensor, got {type(packed).__name__}")
        if _validate:
            state.validate(packed)
            if len(state.shape) != 2:
                raise ValueError(f"NF4Tensor holds a 2-D [out, in] weight, got shape {tuple(state.shape)}")
        elif len(state.shape) not in (1, 2):  # 1-D: the flat view FSDP2 keeps of a shard (`view(-1)`)
            raise ValueError(f"NF4Tensor views are 1-D or 2-D, got shape {tuple(state.shape)}")
        return torch.Tensor._make_wrapper_subclass(cls, state.shape, dtype=state.dtype, device=packed.device,
                                                   requires_grad=False)

    def __init__(self, packed: torch.Tensor, state: NF4State, *, _validate: bool = True):
        self.packed = packed
        self.absmax, self.code, self.offset = state.absmax, state.code, state.offset
        self.absmax2, self.code2 = state.absmax2, state.code2
        self.blocksize, self.nested_blocksize = state.blocksize, state.nested_blocksize
        self._state: NF4State | None = None

    # -- construction ----------------------------------------------------------------------------------------

    @classmethod
    def from_bnb(cls, param: Any) -> NF4Tensor:
        """Wrap a bitsandbytes ``Params4bit`` (or a ``Linear4bit``'s weight): no byte is copied or re-quantized."""
        if isinstance(param, torch.nn.Module):
            param = getattr(param, "weight", None)
        quant_state = getattr(param, "quant_state", None)
        if quant_state is None or not isinstance(param, torch.Tensor):
            raise TypeError(f"expected a bitsandbytes Params4bit with a quant_state, got {type(param).__name__}")
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise ValueError("this bitsandbytes weight was repacked in place by bitsandbytes' CPU kernel (an "
                             "eval-mode forward on CPU); its bytes are no longer in the NF4 layout")
        return cls(as_packed_uint8(param.data), state_from_bnb(quant_state))

    @classmethod
    def from_checkpoint(cls, tensors: Mapping[str, torch.Tensor], prefix: str) -> NF4Tensor:
        """Read weight `prefix` (e.g. ``"model.layers.0.mlp.up_proj.weight"``) of a ``*-bnb-4bit`` state dict."""
        packed, state = state_from_checkpoint(tensors, prefix)
        return cls(packed, state)

    @classmethod
    def from_float(cls, weight: torch.Tensor, *, blocksize: int = 64, double_quant: bool = True,
                   rounding: Rounding | None = None, dtype: torch.dtype | None = None) -> NF4Tensor:
        """Quantize a float weight (bit-exact with bitsandbytes on that device); `dtype`: dequantization dtype."""
        if isinstance(weight, NF4Tensor):
            raise TypeError("weight is already an NF4Tensor")
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D [out, in] tensor, got "
                             f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
        packed, state = quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant, rounding=rounding)
        if dtype is not None:
            state.dtype = _check_dtype(dtype)
        return cls(packed, state)

    # -- access ------------------------------------------------------------------------------------------------

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    def nf4_state(self) -> NF4State:
        """The quantization state (cached: one object per tensor, which lets the dequant kernel reuse its launch)."""
        if self._state is None:
            self._state = NF4State(shape=self.shape, dtype=self.dtype, blocksize=self.blocksize, absmax=self.absmax,
                                   code=self.code, offset=self.offset, absmax2=self.absmax2, code2=self.code2,
                                   nested_blocksize=self.nested_blocksize)
        return self._state

    def nf4_components(self) -> tuple[torch.Tensor, NF4State]:
        """``(packed, state)``: what ``quickloris.dequantize_nf4`` reads."""
        return self.packed, self.nf4_state()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # type: ignore[override]
        """The dense ``[out, in]`` weight in `dtype` (default: this tensor's dtype), bit-exact with bitsandbytes."""
        from quickloris.kernels.nf4_dequant import dequantize_nf4

        return dequantize_nf4(self.packed, self.nf4_state(), dtype=dtype or self.dtype)

    def to_checkpoint(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors bitsandbytes writes for this weight in a ``*-bnb-4bit`` state dict."""
        return state_to_checkpoint(self.packed, self.nf4_state(), prefix)

    def to_bnb(self):
        """A bitsandbytes ``Params4bit`` holding these very bytes and state tensors (no copy)."""
        import bitsandbytes as bnb
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.nested:
            state2 = QuantState(absmax=self.absmax2, code=self.code2, blocksize=self.nested_blocksize,
                                dtype=torch.float32)
        qs = QuantState(absmax=self.absmax, shape=self.shape, code=self.code, blocksize=self.blocksize,
                        quant_type="nf4", dtype=self.dtype, offset=self.offset, state2=state2)
        return bnb.nn.Params4bit(self.packed, requires_grad=False, quant_state=qs, blocksize=self.blocksize,
                                 compress_statistics=self.nested, quant_type="nf4", bnb_quantized=True,
                                 module=None)

    def inner_nbytes(self) -> int:
        """Bytes actually stored (packed data + state), vs ``numel * element_size`` for the dense weight."""
        return sum(t.numel() * t.element_size() for t in self._inner_tensors().values())

    def __repr__(self, *, tensor_contents=None) -> str:  # no dispatch: printing must not dequantize
        return (f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"blocksize={self.blocksize}, double_quant={self.nested})")

    # -- tracing protocol --------------------------------------------------------------------------------------

    def _inner_tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in _INNER if getattr(self, k) is not None}

    def __tensor_flatten__(self):
        names = [k for k in _INNER if getattr(self, k) is not None]
        return names, (self.dtype, self.blocksize, self.nested_blocksize)

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], ctx, outer_size, outer_stride):
        dtype, blocksize, nested_blocksize = ctx
        return NF4Tensor(inner["packed"], _state(inner, torch.Size(outer_size), dtype, blocksize, nested_blocksize),
                         _validate=False)

    # -- FSDP2 (torch.distributed.fsdp.fully_shard) -------------------------------------------------------------

    @property
    def shard_unit(self) -> int:
        """Values per self-contained group: 64 * 256 = 16384 (one absmax2 scale) nested, the blocksize otherwise.

        Rows ``[a, b)`` of the weight, with ``a * in`` a multiple of this, own whole bytes, absmax codes and absmax2
        scales: they are themselves a valid NF4 weight that dequantizes to exactly those rows.
        """
        return self.blocksize * (self.nested_blocksize if self.nested else 1)

    def shardable(self, world_size: int) -> bool:
        """Whether FSDP2 can split this weight on dim 0 into `world_size` equal self-contained shards."""
        rows = int(self.shape[0])
        if world_size == 1:
            return True
        return rows > 0 and rows % world_size == 0 and (self.numel() // world_size) % self.shard_unit == 0

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """What FSDP2 all-gathers for this shard: its packed bytes, absmax codes and absmax2 scales, as they are.

        The per-tensor scalar ``offset`` and the code tables are identical on every rank (replicated): they travel
        in the metadata, not through the collective. Never cast (the mixed-precision policy only relabels the dtype
        the gathered weight dequantizes to, in `fsdp_post_all_gather`).
        """
        world, rows = mesh.size(), int(outer_size[0])
        if rows % world or int(self.shape[0]) != rows // world or (world > 1 and self.numel() % self.shard_unit):
            # The same condition on every rank: all raise before the collective instead of one hanging.
            raise ValueError(f"NF4 weight of shape {list(outer_size)} cannot be all-gathered from {world} shards of "
                             f"{list(self.shape)}: FSDP2 needs equal shards of whole {self.shard_unit}-value groups; "
                             "shard with quickloris.parallel.fsdp.shard_model, which replicates such weights")
        inputs = (self.packed, self.absmax) + ((self.absmax2,) if self.nested else ())
        meta = (tuple(int(s) for s in outer_size), self.blocksize, self.nested_blocksize, self.code, self.offset,
                self.code2)
        return inputs, meta

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        """The unsharded weight over the gathered bytes (views, no copy), dequantizing to `param_dtype`."""
        shape, blocksize, nested_blocksize, code, offset, code2 = metadata
        packed, absmax = outputs[0], outputs[1]
        absmax2 = outputs[2] if len(outputs) > 2 else None
        if out is not None:
            # FSDP2 re-gathers into the same buffers each step; `out` (its unsharded parameter) views them already.
            for mine, got in ((out.packed, packed), (out.absmax, absmax), (out.absmax2, absmax2)):
                if mine is not None and mine.data_ptr() != got.data_ptr():
                    mine.copy_(got)
            return None
        state = NF4State(shape=torch.Size(shape), dtype=_check_dtype(param_dtype), blocksize=blocksize,
                         absmax=absmax, code=code, offset=offset, absmax2=absmax2, code2=code2,
                         nested_blocksize=nested_blocksize)
        return NF4Tensor(packed, state, _validate=False), tuple(outputs)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None:
            # NotImplementedError, not TypeError: Python turns a TypeError in `w + 1` into a vaguer message.
            raise NotImplementedError(f"NF4Tensor does not support {func}: it is a frozen 4-bit weight. Use it through "
                            "quickloris.nn.QLoRALinear, or get dense values with .dequantize()")
        return handler(*args, **kwargs)


def _check_dtype(dtype: Any) -> torch.dtype:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"an NF4 weight dequantizes to one of {FLOAT_DTYPES}, got {dtype}")
    return dtype


def _state(inner: Mapping[str, torch.Tensor], shape: torch.Size, dtype: torch.dtype, blocksize: int,
           nested_blocksize: int = NESTED_BLOCKSIZE) -> NF4State:
    return NF4State(shape=shape, dtype=dtype, blocksize=blocksize, absmax=inner["absmax"], code=inner["code"],
                    offset=inner.get("offset"), absmax2=inner.get("absmax2"), code2=inner.get("code2"),
                    nested_blocksize=nested_blocksize)


def _rebuild(t: NF4Tensor, fn, dtype: torch.dtype | None = None) -> NF4Tensor:
    """A new NF4Tensor whose inner tensors are `fn(inner)` (same format, optionally another dtype)."""
    inner = {k: fn(v) for k, v in t._inner_tensors().items()}
    return NF4Tensor(inner["packed"], _state(inner, t.shape, dtype or t.dtype, t.blocksize, t.nested_blocksize),
                     _validate=False)


def _detach(t: NF4Tensor) -> NF4Tensor:
    return _rebuild(t, lambda v: v)


def _to_copy(t: NF4Tensor, *, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False,
             memory_format=None) -> NF4Tensor:
    if layout not in (None, torch.strided):
        raise TypeError(f"NF4Tensor only has the strided layout, got {layout}")
    if dtype is not None:
        _check_dtype(dtype)
    move = (lambda v: v.to(device=device, non_blocking=non_blocking)) if device is not None else (lambda v: v)
    if pin_memory:
        base = move
        move = lambda v: base(v).pin_memory()  # noqa: E731
    return _rebuild(t, move, dtype)


def _clone(t: NF4Tensor, *, memory_format=None) -> NF4Tensor:
    return _rebuild(t, lambda v: v.clone())


def _copy_(dst: NF4Tensor, src: Any, non_blocking: bool = False) -> NF4Tensor:
    if not isinstance(src, NF4Tensor):
        raise TypeError(f"can only copy an NF4Tensor into an NF4Tensor (got {type(src).__name__}); quantize with "
                        "NF4Tensor.from_float first")
    if (src.shape, src.blocksize, src.nested) != (dst.shape, dst.blocksize, dst.nested):
        raise ValueError(f"NF4 formats differ: {src!r} -> {dst!r}")
    for k, v in dst._inner_tensors().items():
        v.copy_(getattr(src, k), non_blocking=non_blocking)
    return dst


# -- the views FSDP2 takes of a parameter (fully_shard's init: chunk, new_zeros, narrow, view(-1), as_strided) --
# NF4 data is a flat row-major stream, so a view is a relabelled shape and a row range is a slice of each inner
# tensor, provided it starts on a group boundary (`NF4Tensor.shard_unit`); anything else raises.


def _make(t: NF4Tensor, inner: dict[str, torch.Tensor], shape, dtype: torch.dtype | None = None) -> NF4Tensor:
    return NF4Tensor(inner["packed"], _state(inner, torch.Size(shape), dtype or t.dtype, t.blocksize,
                                             t.nested_blocksize), _validate=False)


def _cols(t: NF4Tensor) -> int:
    return int(t.shape[1]) if t.dim() == 2 else 1


def _rows(t: NF4Tensor, start: int, stop: int) -> NF4Tensor:
    """Rows [start, stop) as views of the inner tensors (a shard of FSDP2)."""
    cols, unit, rows = _cols(t), t.shard_unit, int(t.shape[0])
    n0, n1 = start * cols, stop * cols
    if n0 % unit or (n1 % unit and stop != rows):
        raise ValueError(f"NF4Tensor {list(t.shape)}: rows [{start}, {stop}) do not start and end on whole groups of "
                         f"{unit} values (blocksize {t.blocksize}" + (" x 256 absmax per absmax2 scale" if t.nested
                         else "") + "), so their bytes and scales would not be self-contained. Shard NF4 models with "
                         "quickloris.parallel.fsdp.shard_model, which replicates weights that cannot be split")
    bs = t.blocksize
    blocks0, blocks1 = n0 // bs, -(-n1 // bs)
    inner = dict(t._inner_tensors(), packed=t.packed[n0 // 2:(n1 + 1) // 2], absmax=t.absmax[blocks0:blocks1])
    if t.nested:
        nb = t.nested_blocksize
        inner["absmax2"] = t.absmax2[blocks0 // nb:-(-blocks1 // nb)]
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
        raise NotImplementedError(f"NF4Tensor does not support viewing {list(t.shape)} as {list(size)}: only as a 1-D "
                                  f"or 2-D tensor of the same {t.numel()} values")
    return torch.Size(size)


def _view(t: NF4Tensor, size) -> NF4Tensor:
    return _make(t, t._inner_tensors(), _shape_of(t, size))


def _as_strided(t: NF4Tensor, size, stride, storage_offset=None) -> NF4Tensor:
    shape = _shape_of(t, size)
    contiguous = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    if [int(s) for s in stride] != contiguous or (storage_offset or 0) != 0:
        raise NotImplementedError(f"NF4Tensor does not support as_strided with size {list(size)}, stride "
                                  f"{list(stride)}, offset {storage_offset}: only a contiguous view of all values")
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
    inner.update(packed=torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=dev),
                 absmax=zeros(nblocks, t.absmax))
    if t.nested:
        inner["absmax2"] = zeros(-(-nblocks // t.nested_blocksize), t.absmax2)
    out = _make(t, inner, shape, None if dtype is None else _check_dtype(dtype))
    return _rebuild(out, lambda v: v.pin_memory()) if pin_memory else out


def _pin(t: NF4Tensor, device=None) -> NF4Tensor:
    return _rebuild(t, lambda v: v.pin_memory())


def _is_pinned(t: NF4Tensor, device=None) -> bool:
    return t.packed.is_pinned()


_HANDLERS = {
    aten.detach.default: _detach,
    aten.alias.default: _detach,
    aten._to_copy.default: _to_copy,
    aten.clone.default: _clone,
    aten.copy_.default: _copy_,
    aten.split.Tensor: _split,
    aten.split_with_sizes.default: _split_sizes,
    aten.slice.Tensor: _slice,
    aten.view.default: _view,
    aten.as_strided.default: _as_strided,
    aten.new_zeros.default: _new_zeros,
    aten.new_empty.default: _new_zeros,
    aten._pin_memory.default: _pin,
    aten.is_pinned.default: _is_pinned,
}


def is_nf4(t: Any) -> bool:
    return isinstance(t, NF4Tensor)


def nf4_fields(w: NF4Tensor) -> dict[str, Any]:
    """The op arguments of a weight; reads attributes only, so it also works inside a compiled region."""
    return dict(packed=w.packed, absmax=w.absmax, absmax2=w.absmax2, code2=w.code2, offset=w.offset, code=w.code,
                shape=[int(s) for s in w.shape], blocksize=int(w.blocksize))


def replace_dtype(w: NF4Tensor, dtype: torch.dtype) -> NF4Tensor:
    """The same bytes, dequantizing to `dtype`."""
    return _rebuild(w, lambda v: v, _check_dtype(dtype))


__all__ = ["NF4Tensor", "is_nf4", "nf4_fields", "replace_dtype"]
