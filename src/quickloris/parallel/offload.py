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
copies that used it have finished; it rounds sizes up to a power of two, so odd sizes can take up to 2x their
bytes of pinned memory. A handle that dies without its backward (the graph was dropped) frees its buffer.

The device side (`CudaCopies`) is an object of its own so that the packing order and prefetch logic can be tested
on a CPU with a synchronous stand-in (`tests/parallel/test_offload.py`).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

MIN_BYTES = 1 << 20  # smaller saved tensors stay where they are: a copy's fixed cost outweighs their memory


class CudaCopies:
    """Device <-> pinned host copies on one side stream per device (events say when each copy is done)."""

    def __init__(self) -> None:
        self._streams: dict[int, torch.cuda.Stream] = {}

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = torch.cuda.Stream(device=index)
        return stream

    def offloads(self, t: torch.Tensor) -> bool:
        return t.is_cuda

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        stream = self._stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))  # t is written by work queued there
        with torch.cuda.stream(stream):
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
        t.record_stream(stream)  # t's memory is not reused before this copy has read it
        return host

    def to_device(self, host: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Any]:
        stream = self._stream(device)
        with torch.cuda.stream(stream):  # after the same stream's device-to-host copy into `host`
            t = torch.empty(host.shape, dtype=host.dtype, device=device)
            t.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        return t, done

    def wait(self, t: torch.Tensor, done: Any) -> None:
        """Make the current (compute) stream wait for `t`'s copy, and keep `t`'s memory until that stream used it."""
        compute = torch.cuda.current_stream(t.device)
        compute.wait_event(done)
        t.record_stream(compute)


class _Offloaded:
    """One saved tensor in host memory (and, once fetched, its device copy)."""

    __slots__ = ("host", "device", "on_device", "done", "prev", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, prev: weakref.ref | None) -> None:
        self.host, self.device, self.prev = host, device, prev
        self.on_device: torch.Tensor | None = None
        self.done: Any = None


class OffloadedCheckpoint:
    """transformers' checkpoint function (``layer._gradient_checkpointing_func``): non-reentrant checkpoint whose
    saved layer inputs live in pinned host memory (module docstring). One object serves every layer of a model.

    Counters (`packed`, `fetched`, `prefetched`) let tests and benchmarks see what moved.
    """

    def __init__(self, copies: Any = None, min_bytes: int = MIN_BYTES) -> None:
        self.copies = copies if copies is not None else CudaCopies()
        self.min_bytes = min_bytes
        self._last: weakref.ref | None = None  # the most recent offloaded handle: the next one's `prev`
        self.packed = self.fetched = self.prefetched = 0

    def __call__(self, function, *args, **kwargs):
        kwargs.setdefault("use_reentrant", False)
        if kwargs["use_reentrant"]:
            raise ValueError("OffloadedCheckpoint needs the non-reentrant checkpoint (use_reentrant=False)")
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return checkpoint(function, *args, **kwargs)

    def _pack(self, t: torch.Tensor) -> Any:
        if not (t.requires_grad and t.numel() * t.element_size() >= self.min_bytes and self.copies.offloads(t)):
            return t
        handle = _Offloaded(self.copies.to_host(t), t.device, self._last)
        self._last = weakref.ref(handle)
        self.packed += 1
        return handle

    def _fetch(self, h: _Offloaded) -> None:
        h.on_device, h.done = self.copies.to_device(h.host, h.device)

    def _unpack(self, h: Any) -> torch.Tensor:
        if not isinstance(h, _Offloaded):
            return h
        if h.on_device is None:
            self._fetch(h)
            self.fetched += 1
        prev = h.prev() if h.prev is not None else None
        if prev is not None and prev.on_device is None:  # the layer whose backward comes next
            self._fetch(prev)
            self.prefetched += 1
        self.copies.wait(h.on_device, h.done)
        return h.on_device
