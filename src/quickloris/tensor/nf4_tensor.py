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
``w.packed`` etc. (what `quickloris.ops.qlora_linear` does) with no graph break.

FSDP2 (`quickloris.parallel.fsdp`). ``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` implement FSDP2's
all-gather extension: a rank's shard is rows ``[r·out/N, (r+1)·out/N)``, i.e. a slice of the packed bytes, the
absmax codes and the absmax2 scales, which is a valid NF4 weight of its own when it holds whole groups of
`shard_unit` = 64·256 values (one absmax2 scale); the all-gather moves exactly those tensors (uint8, uint8, fp32:
never cast) and the gathered weight views the gathered buffers, so it is bit-identical to the unsharded one. The
per-tensor ``offset`` and the code tables are the same on every rank and are not gathered. The views
``fully_shard`` takes at init (chunk, new_zeros, narrow, view(-1), as_strided, pin_memory) are in
`quickloris.tensor.nf4_views`, which registers them with `implements`.

`__torch_dispatch__` implements, explicitly, only what moving a frozen parameter around needs:

* ``detach`` / ``alias`` (``nn.Parameter``, ``requires_grad_``): the same bytes, a new wrapper;
* ``_to_copy`` (``.to(device)``, ``module.to(...)``): the bytes move; a *dtype* change relabels the dtype the
  weight dequantizes to (the 4-bit data is untouched, so ``model.to(torch.bfloat16)`` never silently inflates the
  weights to a dense copy); get dense values with `dequantize` / ``quickloris.dequantize_nf4(w)``;
* ``clone`` (``copy.deepcopy``): copies of the inner tensors; ``copy_`` from another NF4Tensor of the same format.
* the FSDP2 views above (whole-row ranges on group boundaries, flat or 2-D relabels of all values).

Every other op raises NotImplementedError naming the op: arithmetic on a 4-bit weight is a bug (use `QLoRALinear`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from quickloris.kernels.nf4_quantize import quantize_nf4
from quickloris.quant.nf4 import (
    FLOAT_DTYPES,
    NESTED_BLOCKSIZE,
    NF4State,
    Rounding,
    as_packed_uint8,
    state_from_bnb,
    state_from_checkpoint,
    state_to_checkpoint,
)

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
        return torch.Tensor._make_wrapper_subclass(
            cls, state.shape, dtype=state.dtype, device=packed.device, requires_grad=False
        )

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
            raise ValueError(
                "this bitsandbytes weight was repacked in place by bitsandbytes' CPU kernel (an "
                "eval-mode forward on CPU); its bytes are no longer in the NF4 layout"
            )
        return cls(as_packed_uint8(param.data), state_from_bnb(quant_state))

    @classmethod
    def from_checkpoint(cls, tensors: Mapping[str, torch.Tensor], prefix: str) -> NF4Tensor:
        """Read weight `prefix` (e.g. ``"model.layers.0.mlp.up_proj.weight"``) of a ``*-bnb-4bit`` state dict."""
        packed, state = state_from_checkpoint(tensors, prefix)
        return cls(packed, state)

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        rounding: Rounding | None = None,
        dtype: torch.dtype | None = None,
    ) -> NF4Tensor:
        """Quantize a float weight (bit-exact with bitsandbytes on that device); `dtype`: dequantization dtype."""
        if isinstance(weight, NF4Tensor):
            raise TypeError("weight is already an NF4Tensor")
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(
                f"weight must be a 2-D [out, in] tensor, got "
                f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}"
            )
        packed, state = quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant, rounding=rounding)
        if dtype is not None:
            state.dtype = check_dtype(dtype)
        return cls(packed, state)

    # -- access ------------------------------------------------------------------------------------------------

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    def nf4_state(self) -> NF4State:
        """The quantization state (cached: one object per tensor, which lets the dequant kernel reuse its launch)."""
        if self._state is None:
            self._state = NF4State(
                shape=self.shape,
                dtype=self.dtype,
                blocksize=self.blocksize,
                absmax=self.absmax,
                code=self.code,
                offset=self.offset,
                absmax2=self.absmax2,
                code2=self.code2,
                nested_blocksize=self.nested_blocksize,
            )
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
            state2 = QuantState(
                absmax=self.absmax2, code=self.code2, blocksize=self.nested_blocksize, dtype=torch.float32
            )
        qs = QuantState(
            absmax=self.absmax,
            shape=self.shape,
            code=self.code,
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.dtype,
            offset=self.offset,
            state2=state2,
        )
        return bnb.nn.Params4bit(
            self.packed,
            requires_grad=False,
            quant_state=qs,
            blocksize=self.blocksize,
            compress_statistics=self.nested,
            quant_type="nf4",
            bnb_quantized=True,
            module=None,
        )

    def inner_nbytes(self) -> int:
        """Bytes actually stored (packed data + state), vs ``numel * element_size`` for the dense weight."""
        return sum(t.numel() * t.element_size() for t in self._inner_tensors().values())

    def __repr__(self, *, tensor_contents=None) -> str:  # no dispatch: printing must not dequantize
        return (
            f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
            f"blocksize={self.blocksize}, double_quant={self.nested})"
        )

    # -- tracing protocol --------------------------------------------------------------------------------------

    def _inner_tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in _INNER if getattr(self, k) is not None}

    def __tensor_flatten__(self):
        names = [k for k in _INNER if getattr(self, k) is not None]
        return names, (self.dtype, self.blocksize, self.nested_blocksize)

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], ctx, outer_size, outer_stride):
        dtype, blocksize, nested_blocksize = ctx
        return NF4Tensor(
            inner["packed"],
            state_of(inner, torch.Size(outer_size), dtype, blocksize, nested_blocksize),
            _validate=False,
        )

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
            raise ValueError(
                f"NF4 weight of shape {list(outer_size)} cannot be all-gathered from {world} shards of "
                f"{list(self.shape)}: FSDP2 needs equal shards of whole {self.shard_unit}-value groups; "
                "shard with quickloris.parallel.fsdp.shard_model, which replicates such weights"
            )
        inputs = (self.packed, self.absmax) + ((self.absmax2,) if self.nested else ())
        meta = (
            tuple(int(s) for s in outer_size),
            self.blocksize,
            self.nested_blocksize,
            self.code,
            self.offset,
            self.code2,
        )
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
        state = NF4State(
            shape=torch.Size(shape),
            dtype=check_dtype(param_dtype),
            blocksize=blocksize,
            absmax=absmax,
            code=code,
            offset=offset,
            absmax2=absmax2,
            code2=code2,
            nested_blocksize=nested_blocksize,
        )
        return NF4Tensor(packed, state, _validate=False), tuple(outputs)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None:
            # NotImplementedError, not TypeError: Python turns a TypeError in `w + 1` into a vaguer message.
            raise NotImplementedError(
                f"NF4Tensor does not support {func}: it is a frozen 4-bit weight. Use it through "
                "quickloris.nn.QLoRALinear, or get dense values with .dequantize()"
            )
        return handler(*args, **kwargs)


# aten op -> handler, filled below and by `quickloris.tensor.nf4_views` (the views FSDP2 takes) through
# `implements`; the package's __init__ imports both modules, so the table is complete whenever NF4Tensor is usable.
_HANDLERS: dict[Any, Any] = {}


def implements(*ops):
    """Register the decorated function as NF4Tensor's handler of the aten `ops`."""

    def register(fn):
        for op in ops:
            _HANDLERS[op] = fn
        return fn

    return register


def check_dtype(dtype: Any) -> torch.dtype:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"an NF4 weight dequantizes to one of {FLOAT_DTYPES}, got {dtype}")
    return dtype


def state_of(
    inner: Mapping[str, torch.Tensor],
    shape: torch.Size,
    dtype: torch.dtype,
    blocksize: int,
    nested_blocksize: int = NESTED_BLOCKSIZE,
) -> NF4State:
    return NF4State(
        shape=shape,
        dtype=dtype,
        blocksize=blocksize,
        absmax=inner["absmax"],
        code=inner["code"],
        offset=inner.get("offset"),
        absmax2=inner.get("absmax2"),
        code2=inner.get("code2"),
        nested_blocksize=nested_blocksize,
    )


def rebuild(t: NF4Tensor, fn, dtype: torch.dtype | None = None) -> NF4Tensor:
    """A new NF4Tensor whose inner tensors are `fn(inner)` (same format, optionally another dtype)."""
    inner = {k: fn(v) for k, v in t._inner_tensors().items()}
    return NF4Tensor(
        inner["packed"], state_of(inner, t.shape, dtype or t.dtype, t.blocksize, t.nested_blocksize), _validate=False
    )


def _detach(t: NF4Tensor) -> NF4Tensor:
    return rebuild(t, lambda v: v)


def _to_copy(
    t: NF4Tensor, *, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False, memory_format=None
) -> NF4Tensor:
    if layout not in (None, torch.strided):
        raise TypeError(f"NF4Tensor only has the strided layout, got {layout}")
    if dtype is not None:
        check_dtype(dtype)
    move = (lambda v: v.to(device=device, non_blocking=non_blocking)) if device is not None else (lambda v: v)
    if pin_memory:
        base = move
        move = lambda v: base(v).pin_memory()  # noqa: E731
    return rebuild(t, move, dtype)


def _clone(t: NF4Tensor, *, memory_format=None) -> NF4Tensor:
    return rebuild(t, lambda v: v.clone())


def _copy_(dst: NF4Tensor, src: Any, non_blocking: bool = False) -> NF4Tensor:
    if not isinstance(src, NF4Tensor):
        raise TypeError(
            f"can only copy an NF4Tensor into an NF4Tensor (got {type(src).__name__}); quantize with "
            "NF4Tensor.from_float first"
        )
    if (src.shape, src.blocksize, src.nested) != (dst.shape, dst.blocksize, dst.nested):
        raise ValueError(f"NF4 formats differ: {src!r} -> {dst!r}")
    for k, v in dst._inner_tensors().items():
        v.copy_(getattr(src, k), non_blocking=non_blocking)
    return dst


_HANDLERS.update(
    {
        aten.detach.default: _detach,
        aten.alias.default: _detach,
        aten._to_copy.default: _to_copy,
        aten.clone.default: _clone,
        aten.copy_.default: _copy_,
    }
)


def is_nf4(t: Any) -> bool:
    return isinstance(t, NF4Tensor)


def nf4_fields(w: NF4Tensor) -> dict[str, Any]:
    """The op arguments of a weight; reads attributes only, so it also works inside a compiled region."""
    return dict(
        packed=w.packed,
        absmax=w.absmax,
        absmax2=w.absmax2,
        code2=w.code2,
        offset=w.offset,
        code=w.code,
        shape=[int(s) for s in w.shape],
        blocksize=int(w.blocksize),
    )


def replace_dtype(w: NF4Tensor, dtype: torch.dtype) -> NF4Tensor:
    """The same bytes, dequantizing to `dtype`."""
    return rebuild(w, lambda v: v, check_dtype(dtype))


__all__ = ["NF4Tensor", "is_nf4", "nf4_fields", "replace_dtype", "implements", "rebuild", "state_of", "check_dtype"]
