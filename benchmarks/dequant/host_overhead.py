"""Host time per eager call of `quickloris.dequantize_nf4`, per input form (microseconds per call).

The challenge's harness synchronizes after every matrix, so each call's host time adds to its kernel time.

GPU (default when CUDA is available): wall time per call of `calls` back-to-back calls with no synchronisation in
between (after a warm-up; the GPU keeps up, so this is the host's cost), and the same with a synchronize after every
call as the harness does; `torch.empty` of the output alone as the reference (the one allocation a call needs).

CPU (``--stub``, the default without CUDA): the same calls with the kernel launch stubbed out: the cached launch is
given a stand-in compiled kernel whose `run` does nothing, and torch's CUDA device/stream queries are stand-ins; it
times the Python wrapper up to the launch (Triton's C launcher and the CUDA driver are not in it).

    python -m benchmarks.dequant.host_overhead [--stub] [--calls 20000] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

PARAMS = "Params4bit: dequantize_nf4(layer.weight)"
QSTATE = "QuantState: dequantize_nf4(packed, quant_state)"
WARMUP = 200
SHAPE = (4096, 1024)  # out_features x in_features: the k/v projection of Llama-3-8B (timing.host_us's matrix)


def per_call_us(fn: Callable[[], object], calls: int, sync: bool = False, rounds: int = 7) -> tuple[float, float]:
    """(median, min) over `rounds` of the mean wall microseconds per call of `calls` calls of `fn` (the minimum is
    the least disturbed by other work on a shared machine)."""
    cuda = torch.cuda.is_available()
    for _ in range(WARMUP):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        if sync:
            for _ in range(calls):
                fn()
                torch.cuda.synchronize()
        else:
            for _ in range(calls):
                fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
        if cuda:
            torch.cuda.synchronize()
    return round(statistics.median(times), 3), round(min(times), 3)


def inputs(device: str) -> dict[str, tuple[Callable[[], object], object]]:
    """The public input forms, each as (call, the object whose cached launch it uses)."""
    import bitsandbytes as bnb

    import quickloris
    from quickloris.tensor.nf4_tensor import NF4Tensor

    def linear4bit():
        out_f, in_f = SHAPE
        layer = bnb.nn.Linear4bit(
            in_f, out_f, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4"
        )
        layer.weight = bnb.nn.Params4bit(
            torch.randn(out_f, in_f, dtype=torch.bfloat16) * 0.02,
            requires_grad=False,
            compress_statistics=True,
            quant_type="nf4",
        )
        if device == "cpu":  # .to("cpu") leaves an unquantized Params4bit as it is
            layer.weight = layer.weight._quantize("cpu")
            return layer
        return layer.to(device)

    # a weight of its own per form: a cached launch belongs to the object it was made for
    layer, w, p = linear4bit(), linear4bit().weight, linear4bit().weight
    packed, qs = p.data, p.quant_state
    nf4 = NF4Tensor.from_bnb(linear4bit())
    dq = quickloris.dequantize_nf4
    return {
        "Linear4bit: dequantize_nf4(layer)": (lambda: dq(layer), layer),
        PARAMS: (lambda: dq(w), w),
        QSTATE: (lambda: dq(packed, qs), (packed, qs)),
        "NF4Tensor: dequantize_nf4(nf4_tensor)": (lambda: dq(nf4), nf4),
    }


class _StubCompiled:
    """A compiled kernel whose launcher does nothing (CPU: the host path up to the launch)."""

    function, packed_metadata = object(), object()
    launches = 0  # counted, to show that the timed calls took the cached launch

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, gridX, gridY, gridZ, stream, function, *args):
        _StubCompiled.launches += 1


@contextlib.contextmanager
def stubbed_launches(forms: dict[str, tuple[Callable[[], object], object]]) -> Iterator[dict[str, str]]:
    """Give every input form a cached launch (`quickloris.kernels.nf4_fast`) whose kernel is `_StubCompiled`, as a
    checked call on CUDA would; yields what each form gets."""
    from quickloris.kernels import nf4_dequant as D
    from quickloris.kernels import nf4_fast as F

    saved = (F._current_device, F._raw_stream, D._dequant_into)
    F._current_device = lambda: None  # the CPU device's index
    F._raw_stream = lambda index: 0
    # a call that misses its cached launch takes the checked path; there the launch (`_dequant_into`) is stubbed
    D._dequant_into = lambda packed, absmax, absmax2, code2, offset, code, shape, blocksize, out, **kw: out
    what = {}
    try:
        for name, (_call, obj) in forms.items():
            weight, quant_state = obj if name == QSTATE else (obj, None)
            packed, state = D._resolve(weight, quant_state)
            a, a2, c2, off, code, shape, dtype, bs = D.state_fields(state)
            out = torch.empty(shape, dtype=dtype)
            n, nblocks, nested = out.numel(), a.numel(), a2 is not None
            constexprs = (bs, 64, nested, False, False, False, None, True, True, False)
            # launch()'s argument order: unused nested slots repeat absmax / code
            args = (packed, a, a2 if nested else a, c2 if nested else code, off if nested else code, code, out)
            args = (*args, n, nblocks, *constexprs)
            F.remember(weight, quant_state, packed, state, False, (_StubCompiled(), (nblocks // 64,), args))
            what[name] = "cached launch, launch stubbed" if F.entry_for(weight) else "checked path, launch stubbed"
        yield what
    finally:
        F._current_device, F._raw_stream, D._dequant_into = saved
        F.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stub", action="store_true", help="stub the launch out (the default without CUDA)")
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--out", default=None, help="also write the results to DIR/host-overhead-*.txt")
    ns = parser.parse_args(argv)
    stub = ns.stub or not torch.cuda.is_available()
    device = "cpu" if stub else "cuda"
    forms = inputs(device)
    out_f, in_f = SHAPE
    results: dict = {"mode": "stub (CPU, launch stubbed)" if stub else "cuda", "shape": list(SHAPE), "us": {}}
    results["us_is"] = "[median, min] over 7 rounds of the mean microseconds per call"
    ref = lambda: torch.empty((out_f, in_f), dtype=torch.bfloat16, device=device)  # noqa: E731
    results["us"]["torch.empty of the output (reference)"] = per_call_us(ref, ns.calls)
    with stubbed_launches(forms) if stub else contextlib.nullcontext({}) as what:
        results["path"] = what
        for name, (call, _obj) in forms.items():
            before = _StubCompiled.launches
            results["us"][name] = per_call_us(call, ns.calls)
            if stub:
                per = (_StubCompiled.launches - before) / (WARMUP + 7 * ns.calls)
                what[name] += f" ({per:.2f} stub launches per call)"
            if not stub:
                results["us"][name + " + synchronize"] = per_call_us(call, ns.calls // 4, sync=True)
    if not stub:
        results["us"]["torch.empty + synchronize (the harness floor's call)"] = per_call_us(ref, ns.calls // 4, True)
    for name, (median, least) in results["us"].items():
        print(f"{name:60s} median {median:7.3f} us, min {least:7.3f} us  {results['path'].get(name, '')}")
    if ns.out:  # a .txt, not a .json: benchmarks/report reads every JSON under results/dequant as a bench dequant run
        from quickloris.utils.atomic import atomic_write_text
        from quickloris.utils.provenance import environment

        env = environment()
        stamp = env["date_utc"].replace(":", "").replace("-", "").replace("+0000", "Z")
        path = Path(ns.out) / f"host-overhead-{'cpu-stub' if stub else 'cuda'}-{stamp}.txt"
        atomic_write_text(path, json.dumps({"environment": env, "results": results}, indent=1) + "\n")
        print(f"wrote {path}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
