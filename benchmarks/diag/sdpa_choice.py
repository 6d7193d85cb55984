"""Which SDPA backend PyTorch picks by default on this GPU for the bench's causal GQA shapes (1B 4x2048 head 64,
8B 1x8192 and 1x131072 head 128), read from the CUDA kernels of one forward + backward; cuDNN's version and the
priority order. Writes sdpa_choice.json (with provenance) to --out:
``bash scripts/device/run.sh py:benchmarks/diag/sdpa_choice.py``."""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile


def kernels(b: int, s: int, hq: int, hkv: int, d: int) -> list[str]:
    q = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()  # warm
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
        torch.cuda.synchronize()
    names = sorted(
        {
            e.key
            for e in prof.key_averages()
            if "sdpa" in e.key.lower()
            or "flash" in e.key.lower()
            or "fmha" in e.key.lower()
            or "attention" in e.key.lower()
        }
    )
    return names


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    out = p.parse_args().out
    from quickloris.utils.provenance import environment

    res = {
        "environment": environment(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "gpu": torch.cuda.get_device_name(0),
        "TORCH_CUDNN_SDPA_DEPRIORITIZED": os.environ.get("TORCH_CUDNN_SDPA_DEPRIORITIZED"),
    }
    for name, shape in {
        "1b_4x2048": (4, 2048, 32, 8, 64),
        "8b_1x8192": (1, 8192, 32, 8, 128),
        "8b_1x131072": (1, 131072, 32, 8, 128),
    }.items():
        res[name] = kernels(*shape)
    res["priority_order_after"] = list(torch._C._get_sdp_priority_order())
    print(json.dumps(res, indent=1))
    with open(os.path.join(out, "sdpa_choice.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
