"""Checkpointed layer inputs kept in pinned CPU memory, copied on a side stream, prefetched one layer ahead.

With activation checkpointing a decoder layer keeps only its input for backward: ``tokens x hidden`` bf16 per
layer (Llama-3.1-8B at 8192 tokens: 64 MiB x 32 layers = 2 GiB; at 256K tokens 64 GiB). `OffloadedCheckpoint` is
transformers' checkpoint function slot (``layer._gradient_checkpointing_func``) filled with non-reentrant
``torch.utils.checkpoint`` under saved-tensor hooks that move those inputs off the GPU:

* **pack** (forward, when the checkpoint saves the layer's inputs): a tensor that needs a gradient and holds at
  least `min_bytes` (the hidden states; not the rotary tables or masks, which every layer shares and which would
  otherwise be copied once per layer) is copied to a pinned host buffer on a copy stream that first waits for the
  compute stream; ``record_stream`` keeps the allocator from handing its GPU memory to anyone before the copy has
  read it. The compute stream never waits: the copy overlaps the next layers' forward.
* **unpack** (backward, when the checkpoint replays the layer): the tensor comes back on the copy stream and the
  compute stream waits for that copy only. The same call starts copying back the input packed just before this
  one (the next layer backward replays), so each copy overlaps a whole layer's recompute and backward: two layer
  inputs are on the GPU at a time, against all of them without offload.

transformers' own ``gradient_checkpointing_enable(offload=True)`` wraps the checkpoint in
``torch.autograd.graph.save_on_cpu``, whose copies run on the compute stream: every layer's forward waits for its
input's device-to-host copy and every backward for the host-to-device one, and it copies the shared rotary
tables once per layer.

Buffers come from PyTorch's caching host allocator (``pin_memory=True``), which reuses a freed buffer only after the
copies that used it have finished. It rounds each buffer up to a power of two (a 3 GiB layer input would take
4 GiB), so a tensor is held in up to four pieces (`pinned_pieces`: wasting under 1/7 of its bytes). Pinned memory
cannot be swapped: pinning more than the host has free gets the process killed by the kernel with no message, so
before the pool grows, `CudaCopies` checks the host's free memory (`quickloris.utils.hostmem`) and raises
`HostMemoryError` (one line) unless 10 % of it would still be free. How much the pool grows: a freed buffer serves
only a request of its own rounded size, and the allocator's statistics give one total of free bytes, so with
lengths that change (a 4 GiB buffer cannot hold a 2 GiB piece) that total says "no growth" while the pool grows;
one process-wide `PinnedLedger` counts the pieces' buffers per size. A handle that dies without its backward (the
graph was dropped) frees its buffers.

**For CUDA graphs** (``hold``; `quickloris.parallel.compile.compile_model` still refuses offload with a CUDA-graph
mode: this is not yet verified on a GPU) the layer inputs live in the graphs' memory pool, and a graph's replay
writes wherever its recording did: it does not see ``record_stream``, so an input freed after packing could be
overwritten by the next layer's replay before its copy has read it; and the graph trees refuse pool memory with
pending stream uses when they record. So a held input gets no ``record_stream``: it stays on the GPU until the next
one is packed, then the compute stream waits for its copy (long done: a whole layer ran meanwhile) and lets it go.
The last layer's input is still held when backward begins and is used as it is, with no round trip. Both the same
at every step, as the graphs' memory bookkeeping requires; the cost is one more layer input on the GPU during the
forward.

The device side (`CudaCopies`) is an object of its own so that the packing order and prefetch logic can be tested
on a CPU with a synchronous stand-in (`tests/parallel/test_offload.py`).
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from quickloris.utils import hostmem

MIN_BYTES = 1 << 20  # smaller saved tensors stay where they are: a copy's fixed cost outweighs their memory
KEEP_FREE = 0.10  # of the host's memory, left to everything else when pinned buffers grow
GiB = 2**30


class HostMemoryError(RuntimeError):
    """Offloaded checkpoints would pin more host memory than is free (one line for the CLI, exit status 1)."""

    exit_code = 1


def pinned_pieces(nbytes: int, most: int = 4) -> list[int]:
    """Sizes (summing to `nbytes`) that hold `nbytes` in buffers of a power-of-two-rounding allocator: the highest
    `most - 1` set bits of `nbytes` exactly, then the rest as one piece. With b the lowest of those bits,
    nbytes >= 7 * 2**b and the rest (< 2**b) rounds up by less than 2**b: under 1/7 of `nbytes` wasted, against up
    to 1/2 for one buffer."""
    pieces, rest = [], nbytes
    while rest and len(pieces) < most - 1:
        top = 1 << (rest.bit_length() - 1)
        pieces.append(top)
        rest -= top
    return pieces + ([rest] if rest else [])


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class PinnedLedger:
    """The pinned pool's buffers that offloaded pieces use, per rounded (power-of-two) size.

    The caching host allocator keeps a freed buffer for later requests of the same rounded size only. Per size
    the ledger counts the buffers alive now and the most ever alive at once (what the pool holds for us, as it
    never shrinks by itself): a request's growth is the bytes its sizes' free buffers cannot serve. One ledger
    serves the process (`LEDGER`), as one pool does. Emptying the pool's cache (``torch.accelerator.
    empty_host_cache``) must be followed by `reset`; `CudaCopies` also takes the larger of this and the growth the
    allocator's own total implies. It assumes the allocator's defaults: ``pinned_max_round_threshold`` or
    ``pinned_max_cached_size`` in ``PYTORCH_ALLOC_CONF`` change how buffers are rounded and kept.

    Thread-safe and re-entrant: pieces die in autograd's backward threads, and the garbage collector can free one
    (calling `_freed`) inside `growth` or `hold` on the same thread."""

    def __init__(self) -> None:
        self._held: Counter[int] = Counter()
        self._alive: Counter[int] = Counter()
        self._lock = threading.RLock()

    def reset(self) -> None:
        """The pool's free buffers were released (its cache emptied): only the live ones are still held."""
        with self._lock:
            self._held = Counter(self._alive)

    def growth(self, sizes: Iterable[int]) -> int:
        want = Counter(_pow2(n) for n in sizes)
        with self._lock:
            return sum(max(0, k - (self._held[b] - self._alive[b])) * b for b, k in want.items())

    def hold(self, piece: torch.Tensor) -> None:
        """Count `piece` (a freshly pinned buffer) until it is freed."""
        size = _pow2(piece.numel() * piece.element_size())
        with self._lock:
            self._alive[size] += 1
            self._held[size] = max(self._held[size], self._alive[size])
        weakref.finalize(piece, self._freed, size)

    def _freed(self, size: int) -> None:
        with self._lock:
            self._alive[size] -= 1


LEDGER = PinnedLedger()


def empty_pinned_cache() -> None:
    """Give the pinned pool's free buffers back to the host (the caching host allocator never does by itself: a
    longer run would pin beside them) and tell `LEDGER`."""
    names = (
        (torch.accelerator, "empty_host_cache"),
        (torch._C, "_accelerator_emptyHostCache"),  # before the public name existed
        (torch._C, "_host_emptyCache"),
    )
    empty_host = next((getattr(m, n) for m, n in names if hasattr(m, n)), None)
    if empty_host is not None:
        empty_host()
        LEDGER.reset()


def check_host_room(grow: int, memory) -> None:
    """Raise `HostMemoryError` unless pinning `grow` more bytes leaves `KEEP_FREE` of the host's memory free.
    `memory`: `hostmem.HostMemory` or None (unknown: no check)."""
    if grow <= 0 or memory is None or grow <= memory.available - KEEP_FREE * memory.total:
        return
    raise HostMemoryError(
        f"--checkpoint-offload: out of host memory: the offloaded layer inputs need {grow / GiB:.1f} GiB more "
        f"pinned memory, {memory.available / GiB:.1f} GiB of {memory.total / GiB:.0f} GiB is free and "
        f"{KEEP_FREE:.0%} stays free; train on shorter sequences or smaller batches, or without --checkpoint-offload"
    )


class CudaCopies:
    """Device <-> pinned host copies on one side stream per device (events say when each copy is done)."""

    def __init__(self) -> None:
        self._streams: dict[int, torch.cuda.Stream] = {}
        self.ledger = LEDGER

    def __deepcopy__(self, memo: dict) -> CudaCopies:
        # a copied model gets its own side streams; the ledger is the process's (it counts one pinned pool)
        return type(self)()

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = torch.cuda.Stream(device=index)
        return stream

    def offloads(self, t: torch.Tensor) -> bool:
        return t.is_cuda

    def to_host(self, t: torch.Tensor, held: bool = False) -> tuple[Any, Any]:
        """`t` copied (asynchronously) into pinned pieces: ((pieces, shape, dtype), an event set once the copy is
        done). `held`: the caller keeps `t` until the compute stream waited for that event (`done_with`), so `t`
        gets no ``record_stream`` (a contiguous copy of it still does: nobody holds that)."""
        src, t = t, t.contiguous()
        sizes = pinned_pieces(t.numel() * t.element_size())
        stats = torch.cuda.host_memory_stats()
        reusable = stats.get("allocated_bytes.current", 0) - stats.get("active_bytes.current", 0)
        grow = max(self.ledger.growth(sizes), sum(_pow2(n) for n in sizes) - reusable)
        if grow > 0:  # the pool grows: read the host's free memory (skipped once the pool is warm)
            check_host_room(grow, hostmem.host_memory())
        stream = self._stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))  # t is written by work queued there
        flat, pieces, start = t.view(-1).view(torch.uint8), [], 0
        with torch.cuda.stream(stream):
            for n in sizes:
                piece = torch.empty(n, dtype=torch.uint8, pin_memory=True)
                self.ledger.hold(piece)
                piece.copy_(flat[start : start + n], non_blocking=True)
                pieces.append(piece)
                start += n
            copied = torch.cuda.Event()
            copied.record(stream)
        if not held or t is not src:
            t.record_stream(stream)  # t's memory is not reused before this copy has read it
        return (pieces, t.shape, t.dtype), copied

    def to_device(self, host: tuple[list[torch.Tensor], torch.Size, torch.dtype], device: torch.device):
        pieces, shape, dtype = host
        stream = self._stream(device)
        with torch.cuda.stream(stream):  # after the same stream's device-to-host copies into `pieces`
            flat = torch.empty(sum(p.numel() for p in pieces), dtype=torch.uint8, device=device)
            start = 0
            for piece in pieces:
                flat[start : start + piece.numel()].copy_(piece, non_blocking=True)
                start += piece.numel()
            done = torch.cuda.Event()
            done.record(stream)
        return flat.view(dtype).view(shape), done

    def done_with(self, copied: Any, device: torch.device) -> None:
        """`device`'s compute stream waits for a copy to the host (`to_host`'s event) before what follows may reuse
        its source: no ``record_stream``, which CUDA graph trees refuse on their pool's memory."""
        torch.cuda.current_stream(device).wait_event(copied)

    def wait(self, t: torch.Tensor, done: Any) -> None:
        """Make the current (compute) stream wait for `t`'s copy, and keep `t`'s memory until that stream used it."""
        compute = torch.cuda.current_stream(t.device)
        compute.wait_event(done)
        t.record_stream(compute)


class _Offloaded:
    """One saved tensor in host memory (and, once fetched, its device copy; with ``hold``, the original until the
    next one is packed)."""

    __slots__ = ("host", "device", "on_device", "done", "prev", "held", "copied", "__weakref__")

    def __init__(self, host: Any, device: torch.device, prev: weakref.ref | None) -> None:
        self.host, self.device, self.prev = host, device, prev
        self.on_device: torch.Tensor | None = None
        self.done: Any = None
        self.held: torch.Tensor | None = None  # `hold`: the packed tensor itself, still on the device
        self.copied: Any = None  # `hold`: the event of its copy to the host


class OffloadedCheckpoint:
    """transformers' checkpoint function (``layer._gradient_checkpointing_func``): non-reentrant checkpoint whose
    saved layer inputs live in pinned host memory (module docstring). One object serves every layer of a model.

    `hold`: keep each packed tensor on the device until the next is packed (CUDA graphs: module docstring).
    Counters (`packed`, `fetched`, `prefetched`) let tests and benchmarks see what moved.
    """

    def __init__(self, copies: Any = None, min_bytes: int = MIN_BYTES, hold: bool = False) -> None:
        self.copies = copies if copies is not None else CudaCopies()
        self.min_bytes = min_bytes
        self.hold = hold
        self._last: weakref.ref | None = None  # the most recent offloaded handle: the next one's `prev`
        self.packed = self.fetched = self.prefetched = 0
        self._inputs: set[int] | None = None  # in_graph: the call's tensors' addresses, the only ones offloaded

    def __deepcopy__(self, memo: dict) -> OffloadedCheckpoint:
        """A copied model's own checkpoint function (every layer of the copy shares it, through `memo`): fresh
        counters, and no link to the original's last offloaded input (whose layer would be prefetched)."""
        return type(self)(copy.deepcopy(self.copies, memo), self.min_bytes, self.hold)

    def __call__(self, function, *args, **kwargs):
        kwargs.setdefault("use_reentrant", False)
        if kwargs["use_reentrant"]:
            raise ValueError("OffloadedCheckpoint needs the non-reentrant checkpoint (use_reentrant=False)")
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return checkpoint(function, *args, **kwargs)

    def in_graph(self, function, *args, **kwargs):
        """The checkpoint function of a layer whose checkpoint is traced into its compiled graph
        (`quickloris.parallel.compile.checkpoint_in_graph`): no eager checkpoint, the same hooks around the call, and
        of what the compiled region saves for its backward only the call's own tensors (the layer input, as the
        eager checkpoint keeps) go to pinned memory: not the parameters it saves too (their module keeps them on the
        GPU anyway, so a copy would free nothing). What the region computes stays on the GPU: LoRA's ``u``, kept
        attention outputs and, with LoRA dropout, the random draws the in-graph policy saves (for Llama-3.1-8B's
        shapes ~9.5x the layer input per layer, from forward to backward); so do the rotary tables (no gradient)."""
        own = [*args, *getattr(function, "keywords", {}).values(), *kwargs.values()]  # transformers binds a partial
        # By address, not object: CUDA graph trees hand the saved input back as a new tensor over the same memory
        # (without requires_grad). Each address is offloaded once a call.
        self._inputs = {a.data_ptr() for a in own if isinstance(a, torch.Tensor) and a.requires_grad}
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                return function(*args, **kwargs)
        finally:
            self._inputs = None

    def _pack(self, t: torch.Tensor) -> Any:
        if not (
            (t.requires_grad if self._inputs is None else t.data_ptr() in self._inputs)
            and t.numel() * t.element_size() >= self.min_bytes
            and self.copies.offloads(t)
        ):
            return t
        if self._inputs is not None:
            self._inputs.discard(t.data_ptr())
        host, copied = self.copies.to_host(t, held=self.hold)
        self._let_go()
        handle = _Offloaded(host, t.device, self._last)
        if self.hold:
            handle.held, handle.copied = t, copied
        self._last = weakref.ref(handle)
        self.packed += 1
        return handle

    def _let_go(self) -> None:
        """`hold`: the previously packed tensor may go once the compute stream has waited for its copy."""
        last = self._last() if self._last is not None else None
        if last is not None and last.held is not None:
            self.copies.done_with(last.copied, last.device)
            last.held = None

    def _fetch(self, h: _Offloaded) -> None:
        h.on_device, h.done = self.copies.to_device(h.host, h.device)

    def _unpack(self, h: Any) -> torch.Tensor:
        if not isinstance(h, _Offloaded):
            return h
        if h.held is not None:  # `hold`: the last one packed is still on the device, in its original memory
            self._prefetch(h)
            return h.held
        if h.on_device is None:
            self._fetch(h)
            self.fetched += 1
        self._prefetch(h)
        self.copies.wait(h.on_device, h.done)
        return h.on_device

    def _prefetch(self, h: _Offloaded) -> None:
        """Start fetching the tensor packed just before `h`'s: the layer whose backward comes next."""
        prev = h.prev() if h.prev is not None else None
        if prev is not None and prev.on_device is None and prev.held is None:
            self._fetch(prev)
            self.prefetched += 1
