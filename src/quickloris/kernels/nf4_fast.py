"""The eager fast path of `quickloris.dequantize_nf4`: one cached launch per weight object.

The challenge's harness synchronizes after every matrix, so each call's host time adds to its kernel time; the
checked path (argument resolution, `Params4bit.data` through bitsandbytes' `__torch_function__`, the state read
and checked, Triton's argument binding) costs more than the kernel on small weights. After a checked call on CUDA
that launched the compiled kernel directly, the call's first argument gets an `_Entry`: the compiled kernel, its
grid and arguments, and the objects they were read from. A later eager call with the same object re-validates by
identity and launches with only a new output tensor: no isinstance chain, no QuantState unpacking, no dispatcher,
no synchronisation, no allocation but the output.

Why an entry may answer (anything else takes the checked path, which replaces the entry):
* the object is the one the entry was made for (a weak reference to it; an `id` is reused after death);
* the objects the launch read are the same objects: for a module its ``weight`` parameter, for a Params4bit its
  ``quant_state``, and the state's tensors, shape, dtype and blocksizes (`_bnb_key` / `_nf4_key`): replacing any
  of them (``layer.weight = ...``, ``p.quant_state = ...``, bitsandbytes' ``QuantState.to`` assigns new tensors)
  invalidates the entry. For a (packed, state) pair the state may be another object of the same class over the
  same tensors (an NF4State's shape and blocksize compared by value): `quickloris::nf4_matmul`, the training
  step's NF4 matmul, builds a new NF4State per call, and took the checked path every time before;
* the packed bytes are at the address the entry launches from (``p.data = ...`` moves them);
* the current CUDA device is the entry's (Triton loaded the kernel in that device's context);
* the output dtype, the `inline_ptx` choice and an `out` tensor match what the kernel was compiled for.
Values are read at launch time, so changing the bytes in place (``copy_``) needs no invalidation. The state tensors
are passed as tensors, so the launcher reads their addresses per launch (FSDP2 re-allocates gathered storages
under the same tensor objects). An entry keeps its state tensors alive until its object is freed or a call
replaces the entry (the object's own state holds them anyway); it keeps neither the packed bytes nor the output.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch

from quickloris.kernels.nf4_kernel import triton
from quickloris.kernels.nf4_launch import use_asm
from quickloris.quant.nf4 import NF4State

# Stand-ins are set here by the CPU stub of `benchmarks/dequant/host_overhead.py` and by the tests.
_current_device = getattr(torch._C, "_cuda_getDevice", None)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
# Params4bit defines `__torch_function__`: its own `data_ptr()` costs ~2 us of Python, ~0.3 us without it.
_no_torch_function = torch._C.DisableTorchFunctionSubclass

_MODULE, _PARAM, _COMPONENTS, _PAIR = "module", "param", "components", "pair"


def _bnb_key(qs: Any) -> tuple:
    """What a launch read from a bitsandbytes QuantState (objects, compared by identity)."""
    s2 = qs.state2
    return (
        qs.absmax,
        qs.code,
        qs.offset,
        qs.shape,
        qs.dtype,
        qs.blocksize,
        qs.quant_type,
        qs.nested,
        s2,
        None if s2 is None else s2.absmax,
        None if s2 is None else s2.code,
        None if s2 is None else s2.blocksize,
    )


def _same_bnb(qs: Any, k: tuple) -> bool:
    s2 = qs.state2
    return (
        qs.absmax is k[0]
        and qs.code is k[1]
        and qs.offset is k[2]
        and qs.shape is k[3]
        and qs.dtype is k[4]
        and qs.blocksize is k[5]
        and qs.quant_type is k[6]
        and qs.nested is k[7]
        and s2 is k[8]
        and (s2 is None or (s2.absmax is k[9] and s2.code is k[10] and s2.blocksize is k[11]))
    )


def _nf4_key(s: NF4State) -> tuple:
    """What a launch read from an NF4State (objects, compared by identity)."""
    return (s.absmax, s.absmax2, s.code2, s.offset, s.code, s.shape, s.dtype, s.blocksize)


def _same_nf4(s: NF4State, k: tuple) -> bool:
    return (
        s.absmax is k[0]
        and s.absmax2 is k[1]
        and s.code2 is k[2]
        and s.offset is k[3]
        and s.code is k[4]
        and s.shape == k[5]  # by value: `quickloris::nf4_matmul` builds a new NF4State (and Size) per call
        and s.dtype is k[6]
        and s.blocksize == k[7]
    )


class _Entry:
    __slots__ = (
        "ref",
        "kind",
        "param",
        "state",
        "key",
        "same",
        "ptr",
        "plain",
        "shape",
        "dtype",
        "default_dtype",
        "device",
        "index",
        "asm",
        "asm_by_default",
        "compiled",
        "grid",
        "head",
        "tail",
    )


# id(first argument) -> its entry. By id because bitsandbytes' QuantState and modules are not usable as weak keys
# cheaply; `_Entry.ref` tells a live object from one that reuses a dead one's id, and the weak reference's callback
# drops the entry only if no newer object took the id meanwhile.
_ENTRIES: dict[int, _Entry] = {}


def _forget(key: int, ref: weakref.ref, entries: dict[int, _Entry] = _ENTRIES) -> None:
    entry = entries.get(key)  # `entries` bound here: at interpreter exit the module's globals may be gone
    if entry is not None and entry.ref is ref:
        del entries[key]


def entry_for(obj: Any) -> _Entry | None:
    """The cached launch of `obj` (None: its next call takes the checked path)."""
    entry = _ENTRIES.get(id(obj))
    return entry if entry is not None and entry.ref() is obj else None


def clear() -> None:
    """Drop every cached launch (the next call of each object takes the checked path again)."""
    _ENTRIES.clear()


def _plain_weight_attribute(module: torch.nn.Module) -> bool:
    """Whether ``module.weight`` is ``module._parameters["weight"]``: no property, instance attribute or
    `__getattr__` / `__getattribute__` override stands in between (wrappers that forward attributes have one)."""
    cls = type(module)
    return (
        cls.__getattr__ is torch.nn.Module.__getattr__
        and cls.__getattribute__ is torch.nn.Module.__getattribute__
        and "weight" not in module.__dict__
        and not any("weight" in vars(k) for k in cls.__mro__)
    )


def remember(weight: Any, quant_state: Any, packed: torch.Tensor, state: Any, asm: bool, launched: tuple) -> None:
    """After a checked call ``dequantize_nf4(weight, quant_state)`` that launched `launched` = (compiled kernel or
    None, grid, arguments) over `packed` and the resolved `state`, cache that launch on `weight`."""
    compiled, grid, args = launched
    out = args[6]
    ptr = packed.data_ptr()
    if compiled is None or ptr % 16 or out.data_ptr() % 16:
        return
    e = _Entry()
    e.param, e.plain = None, type(weight) is torch.Tensor
    if quant_state is not None:
        if isinstance(weight, torch.nn.Module) or not isinstance(weight, torch.Tensor):
            return
        e.kind, e.state = _PAIR, quant_state
    elif isinstance(weight, torch.nn.Module):
        param = weight._parameters.get("weight")
        if param is None or not _plain_weight_attribute(weight) or getattr(param, "quant_state", None) is None:
            return
        e.kind, e.param, e.state = _MODULE, weakref.ref(param), param.quant_state
    elif getattr(weight, "nf4_components", None) is not None:
        e.kind, e.state = _COMPONENTS, state  # `nf4_components()` returns the same state object while unchanged
    elif isinstance(weight, torch.Tensor) and getattr(weight, "quant_state", None) is not None:
        e.kind, e.state = _PARAM, weight.quant_state
    else:
        return
    if isinstance(e.state, NF4State):
        e.key, e.same = _nf4_key(e.state), _same_nf4
    elif getattr(e.state, "quant_type", None) is not None:
        e.key, e.same = _bnb_key(e.state), _same_bnb
    else:
        return
    e.ptr, e.shape, e.dtype, e.device, e.index = ptr, tuple(out.shape), out.dtype, out.device, out.device.index
    e.default_dtype = out.dtype is state.dtype
    e.asm, e.asm_by_default, e.compiled, e.grid = asm, asm is use_asm(out.device), compiled, grid
    e.head, e.tail = args[1:6], args[7:]  # (absmax .. code), then (n, nblocks, constexprs...): packed and out vary
    key = id(weight)
    try:
        e.ref = weakref.ref(weight, functools.partial(_forget, key))
    except TypeError:  # not weak-referenceable: no entry
        return
    _ENTRIES[key] = e


def cached(weight: Any, quant_state: Any, out: Any, dtype: Any, inline_ptx: Any) -> torch.Tensor | None:
    """The output of `weight`'s cached launch if its entry is still valid (module docstring), else None."""
    e = _ENTRIES.get(id(weight))
    if e is None or e.ref() is not weight:
        return None
    kind = e.kind
    if kind is _PAIR:
        # another state object of the same kind over the same tensors describes the same launch
        if quant_state.__class__ is not e.state.__class__ or not e.same(quant_state, e.key):
            return None
        if e.plain:
            ptr = weight.data_ptr()
        else:
            with _no_torch_function():
                ptr = weight.data_ptr()
    elif quant_state is not None:
        return None
    elif kind is _COMPONENTS:
        packed, state = weight.nf4_components()
        if state is not e.state or not e.same(state, e.key):
            return None
        ptr = packed.data_ptr()
    else:
        param = weight._parameters.get("weight") if kind is _MODULE else weight
        if kind is _MODULE and param is not e.param():
            return None
        state = getattr(param, "quant_state", None)
        if state is not e.state or not e.same(state, e.key):
            return None
        with _no_torch_function():
            ptr = param.data_ptr()
    if (
        ptr != e.ptr
        or _current_device() != e.index
        or (e.asm_by_default if inline_ptx is None else bool(inline_ptx) is e.asm) is False
    ):
        return None
    if out is None:
        if not (e.default_dtype if dtype is None else dtype is e.dtype):
            return None
        out = torch.empty(e.shape, dtype=e.dtype, device=e.device)
    elif not (
        out.dtype is e.dtype
        and (dtype is None or dtype is e.dtype)
        and out.shape == e.shape
        and out.is_contiguous()
        and out.data_ptr() % 16 == 0
        and out.device == e.device
    ):
        return None
    runtime = triton.knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    if (enter is not None and getattr(enter, "calls", True)) or (leave is not None and getattr(leave, "calls", True)):
        return None  # a profiler listens: the checked path launches exactly as Triton does, with its metadata
    c = e.compiled
    stream = _raw_stream(e.index)
    # Triton's launcher takes an int as a pointer as it is (a tensor costs a data_ptr() call and a driver query)
    c.run(e.grid[0], 1, 1, stream, c.function, c.packed_metadata, None, None, None, e.ptr, *e.head, out, *e.tail)
    return out
