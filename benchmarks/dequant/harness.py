"""The specification's `test_dequantize` harness (challenge part A), one implementation per process.

`quickloris bench dequant` runs this module as a script once per implementation and round: Unsloth patches
transformers (and more) when imported, and no implementation should run in a process another has warmed or
patched. Implementations (`FUNCTIONS`): quickloris' `dequantize_nf4`, Unsloth's real
`unsloth.kernels.utils.fast_dequantize` (its process gets ``PYTHONPATH=$QUICKLORIS_UNSLOTH_SITE``; without it the
record says so, there is no imitation), bitsandbytes' `dequantize_4bit`, PEFT's `dequantize_module_weight`, and
the harness' own floor (`torch.empty` in place of a dequantization: Python and synchronisation only). The
correctness checks the harness runs before timing compare every implementation with bitsandbytes'
`dequantize_4bit` (the specification compares with Unsloth's, which is bit-exact with it).

Floor of the whole harness: the `torch.empty` run plus the bytes every dequantization must move (packed n/2 +
absmax n/64 + absmax2 + output 2n per matrix, `harness_bytes`) at the device's measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.dequant.configs import HARNESS_CONFIGS

FUNCTIONS = (
    "quickloris",
    "unsloth_fast_dequantize",
    "bnb_dequantize_4bit",
    "peft_dequantize_module_weight",
    "torch_empty_floor",
    "one_launch_floor",
)
SITE_ENV = "QUICKLORIS_UNSLOTH_SITE"
ROOT = Path(__file__).resolve().parents[2]


def harness_bytes(iters: int) -> int:
    """Bytes the harness' dequantizations must read and write: per config and iteration, its three matrices
    (n = hd x m each) as packed codes n/2, uint8 absmax n/64, fp32 absmax2 per 256 blocks, 2-byte output."""
    from benchmarks.dequant.timing import matrix_bytes

    return iters * sum(3 * matrix_bytes(hd, m, 2) for _bsz, _qlen, hd, m, _seed, _dt in HARNESS_CONFIGS)


def function(name: str) -> Callable:
    """The implementation `name` as the harness calls it: ``fx(linear4bit_layer) -> dequantized weight``."""
    import torch

    if name == "quickloris":
        import quickloris

        return lambda layer: quickloris.dequantize_nf4(layer)
    if name == "unsloth_fast_dequantize":
        import unsloth  # noqa: F401 - as its users import it: first, with its patches
        from unsloth.kernels.utils import fast_dequantize

        return lambda layer: fast_dequantize(layer.weight, layer.weight.quant_state)
    if name == "bnb_dequantize_4bit":
        import bitsandbytes.functional as bnbF

        return lambda layer: bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    if name == "peft_dequantize_module_weight":
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight
    if name == "torch_empty_floor":
        return lambda layer: torch.empty(
            layer.weight.quant_state.shape, dtype=layer.weight.quant_state.dtype, device="cuda"
        )
    if name == "one_launch_floor":
        # the torch_empty floor plus one kernel that does nothing, launched from C++ (`torch.cuda._sleep(0)`): what
        # any implementation pays per call to launch a kernel and wait for it, whatever the kernel does
        empty = function("torch_empty_floor")

        def empty_and_launch(layer):
            out = empty(layer)
            torch.cuda._sleep(0)
            return out

        return empty_and_launch
    raise ValueError(f"unknown implementation {name!r}; choose from {', '.join(FUNCTIONS)}")


def run_in_process(name: str, iters: int, repeats: int, timeout: float = 900, *, matrices: bool = False) -> dict:
    """Parent side: `repeats` harness runs of `name` in a fresh process -> {"seconds": [...]} or {"error": ...};
    `matrices`: instead, its per-matrix and host timings (`benchmarks.dequant.timing`) -> {"matrix_us": [...],
    "host_us": ...}."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if name == "unsloth_fast_dequantize":
        site = os.environ.get(SITE_ENV)
        if not site or not Path(site).is_dir():
            return {"error": f"Unsloth is not installed: set {SITE_ENV} to the folder its wheels went into"}
        env.update(PYTHONPATH=site + os.pathsep + env["PYTHONPATH"], HF_HUB_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1")
    cmd = [sys.executable, "-m", "benchmarks.dequant.harness", name, "--iters", str(iters), "--repeats", str(repeats)]
    cmd += ["--matrices"] if matrices else []
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"ran past {timeout} s"}
    last = proc.stdout.strip().splitlines()[-1:] or [""]
    try:
        return json.loads(last[0])
    except json.JSONDecodeError:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)[-400:]}


def harness(dequantize_fx: Callable, reference_fx: Callable, iters: int, check: bool) -> float:
    """The specification's `test_dequantize`, unchanged in what it times (asserts skipped for the floor); its
    correctness checks against `reference_fx` (the specification's is Unsloth's `fast_dequantize`)."""
    import torch
    import torch.nn as nn
    from bitsandbytes.nn import Linear4bit
    from transformers import set_seed
    from transformers.activations import ACT2FN

    class MLP(nn.Module):
        def __init__(self, hd, m, dtype):
            super().__init__()
            mk = lambda i, o: Linear4bit(  # noqa: E731
                i,
                o,
                bias=None,
                compute_dtype=dtype,
                compress_statistics=True,
                quant_type="nf4",
            )
            self.gate_proj, self.up_proj, self.down_proj = mk(hd, m), mk(hd, m), mk(m, hd)
            self.act_fn = ACT2FN["silu"]

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def mlp_forward(X, mlp, fx):
        up = X @ fx(mlp.up_proj).t()
        gate = X @ fx(mlp.gate_proj).t()
        return (mlp.act_fn(gate) * up) @ fx(mlp.down_proj).t()

    def mlp_dequantize(mlp, fx):
        a = fx(mlp.up_proj).t()
        torch.cuda.synchronize()  # noqa: E702
        b = fx(mlp.gate_proj).t()
        torch.cuda.synchronize()  # noqa: E702
        c = fx(mlp.down_proj).t()
        torch.cuda.synchronize()  # noqa: E702
        return a, b, c

    def assert_same(x, y, dtype):
        assert x.dtype == dtype
        torch.testing.assert_close(x, y, check_stride=True)

    elapsed = 0.0
    default_dtype = torch.get_default_dtype()
    try:
        for bsz, qlen, hd, m, seed, dt_name in HARNESS_CONFIGS:
            dt = getattr(torch, dt_name)
            set_seed(seed)
            torch.set_default_dtype(dt)
            mlp = MLP(hd, m, dt).to("cuda")
            X = torch.randn((bsz, qlen, hd), device="cuda")
            torch.cuda.synchronize()
            for _ in range(2):  # warm-up with the specification's correctness checks
                if check:
                    assert_same(mlp_forward(X, mlp, dequantize_fx), mlp(X), dt)
                    a, b, c = mlp_dequantize(mlp, dequantize_fx)
                    A, B, C = mlp_dequantize(mlp, reference_fx)
                    for x, y in ((a, A), (b, B), (c, C)):
                        assert_same(x, y, dt)
                else:
                    mlp_dequantize(mlp, dequantize_fx)
            torch.cuda.synchronize()
            start = time.time()
            for _ in range(iters):
                mlp_dequantize(mlp, dequantize_fx)
            elapsed += time.time() - start
            del mlp, X
            torch.cuda.empty_cache()
    finally:
        torch.set_default_dtype(default_dtype)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one implementation through the specification's harness")
    parser.add_argument("name", choices=FUNCTIONS)
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--matrices", action="store_true", help="per-matrix and host timings instead of the harness")
    ns = parser.parse_args(argv)
    try:
        fx = function(ns.name)
        if ns.matrices:
            from benchmarks.dequant import timing

            rows = timing.matrix_us({ns.name: fx})
            out: dict = {"matrix_us": [r[ns.name] for r in rows], "host_us": timing.host_us({ns.name: fx})[ns.name]}
        else:
            reference = function("bnb_dequantize_4bit")
            check = not ns.name.endswith("_floor")
            out = {"seconds": [round(harness(fx, reference, ns.iters, check), 4) for _ in range(ns.repeats)]}
        if ns.name == "unsloth_fast_dequantize":
            import unsloth

            out["version"] = unsloth.__version__
    except Exception as e:  # noqa: BLE001 - the parent records it; the other implementations still run
        out = {"error": f"{type(e).__name__}: {e}"[:400]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
