"""The ``families`` part of `quickloris bench train`: other model families than Llama, the same protocol.

Each shape copies the public config of a released checkpoint (random init, nothing downloaded); fields that equal
transformers' config defaults are left out, and the rest are set to the checkpoint's values:

* ``gemma3-1b`` (``Gemma3ForCausalLM``, google/gemma-3-1b-pt): vocab 262144, hidden 1152, intermediate 6912,
  4 query heads / 1 key-value head of 256, sliding window 512 on five layers of each six (layer types written out),
  RoPE base 1e4 on sliding / 1e6 on global layers, 32768 positions; defaults kept: 26 layers, head_dim 256,
  query_pre_attn_scalar 256, rms_norm_eps 1e-6, gelu_pytorch_tanh, no attention / final-logit softcap, tied
  embeddings. 999,885,952 parameters, as the checkpoint. Default batch 4 x 2048: the 262k vocabulary makes HF's
  full-logits loss large (part of the comparison).
* ``phi3-mini`` (``Phi3ForCausalLM``, microsoft/Phi-3-mini-4k-instruct): transformers' Phi3Config defaults are
  this checkpoint (vocab 32064, hidden 3072, intermediate 8192, 32 layers, 32 / 32 heads, RoPE base 1e4, 4096
  positions, untied, rms_norm_eps 1e-5) except its sliding window, 2047 (set); LoRA on the fused ``qkv_proj``,
  ``o_proj``, ``gate_up_proj``, ``down_proj``. 3,821,079,552 parameters. Default batch 2 x 2048.

``--family-shapes NAME[:BxS],...`` picks shapes and (optionally) batch x sequence; ``--family-stacks`` the stacks;
``--family-attention`` the quickloris stacks' attention (default flex: quickloris' FlexAttention, block-sparse
per layer type's window; the HF stacks run transformers' SDPA with its sliding-window masks).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_GEMMA3_LAYERS = 26
GEMMA3_1B = dict(
    vocab_size=262144,
    hidden_size=1152,
    intermediate_size=6912,
    num_attention_heads=4,
    num_key_value_heads=1,
    sliding_window=512,
    max_position_embeddings=32768,
    layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(_GEMMA3_LAYERS)],
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
    },
)
PHI3_MINI_4K = dict(sliding_window=2047)
# CPU tests: the same features at toy size (a window shorter than the tiny sequence; Gemma's two layer types),
# matrices drawn at std TINY_STD, larger than the 0.02 of the real shapes, so that attention patterns move the loss
TINY_STD = 0.08
TINY_GEMMA3 = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=16,
    max_position_embeddings=256,
    layer_types=["sliding_attention", "full_attention"],
)
TINY_PHI3 = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    sliding_window=31,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)  # Phi3Config's default ids (32000) are outside a tiny vocabulary


@dataclass(frozen=True)
class FamilyShape:
    architecture: str  # transformers *ForCausalLM class
    source: str  # the public checkpoint whose config the shape copies
    config: dict[str, Any] = field(hash=False)
    tiny: dict[str, Any] = field(hash=False)
    batch: int = 1
    seq: int = 2048
    params: int = 0  # the checkpoint's parameter count (checked against the built skeleton by the tests)


FAMILY_SHAPES = {
    "gemma3-1b": FamilyShape("Gemma3ForCausalLM", "google/gemma-3-1b-pt", GEMMA3_1B, TINY_GEMMA3, 4, 2048, 999_885_952),
    "phi3-mini": FamilyShape(
        "Phi3ForCausalLM", "microsoft/Phi-3-mini-4k-instruct", PHI3_MINI_4K, TINY_PHI3, 2, 2048, 3_821_079_552
    ),
}
DEFAULT_FAMILY_SHAPES = "gemma3-1b,phi3-mini"
TINY_BATCH, TINY_SEQ = 2, 64


def parse_shapes(text: str) -> list[tuple[str, int | None, int | None]]:
    """``gemma3-1b,phi3-mini:1x4096`` -> [(name, batch or None, seq or None)]; one-line ValueError naming
    ``--family-shapes`` for anything else."""
    out = []
    for item in [t for t in text.split(",") if t]:
        name, _, bxs = item.partition(":")
        if name not in FAMILY_SHAPES:
            raise ValueError(f"--family-shapes: unknown shape {name!r}; choose from {','.join(FAMILY_SHAPES)}")
        batch = seq = None
        if bxs:
            b, x, s = bxs.partition("x")
            if not (x and b.isdigit() and s.isdigit() and int(b) > 0 and int(s) > 1):
                raise ValueError(f"--family-shapes: {item!r}: write batch x sequence as NAME:BxS, e.g. {name}:2x2048")
            batch, seq = int(b), int(s)
        out.append((name, batch, seq))
    if not out:
        raise ValueError(f"--family-shapes: name at least one of {','.join(FAMILY_SHAPES)}")
    return out


def part_families(tm, env: dict[str, Any], args, stack_runs: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Per shape: one shared NF4 base, the stacks of ``--family-stacks`` on it (`stack_runs`: ``--family-steps``
    steps each on the same batches, per-step losses vs ``hf_eager``); a shape that fails records its error and the
    next one still runs. ``--tiny``: the shapes' toy configs in fp32 on CPU (the stacks then differ only in the
    order of their floating-point sums: the tests compare their losses tightly); otherwise bf16."""
    import torch

    dtype = torch.float32 if args.tiny else torch.bfloat16
    sub = argparse.Namespace(**{**vars(args), "steps": args.family_steps})
    out: dict[str, Any] = {}
    for name, batch, seq in parse_shapes(args.family_shapes):
        shape = FAMILY_SHAPES[name]
        if args.tiny:
            cfg, batch, seq = shape.tiny, TINY_BATCH, TINY_SEQ
        else:
            cfg, batch, seq = shape.config, batch or shape.batch, seq or shape.seq
        rec: dict[str, Any] = {
            "architecture": shape.architecture,
            "source": shape.source,
            "config": cfg,
            "batch": batch,
            "seq": seq,
            "dtype": str(dtype).removeprefix("torch."),
            "steps": sub.steps,
            "seed": args.seed,
            "ql_attention": args.family_attention,
            "hf_attention": "sdpa",
        }
        print(f"  {name} ({shape.architecture}), {batch}x{seq}, {sub.steps} steps", flush=True)
        torch._dynamo.reset()  # drop the previous shape's compiled graphs (their guards hold its modules)
        t0 = time.perf_counter()
        base = None
        try:
            base = tm.build_base(
                cfg,
                device=env["device"],
                architecture=shape.architecture,
                dtype=dtype,
                seed=args.seed,
                **({"std": TINY_STD} if args.tiny else {}),
            )
            rec.update(
                build_base_s=round(time.perf_counter() - t0, 1), lora_targets=base.targets(), params=base.param_count()
            )
            runs = stack_runs(
                tm,
                base,
                env,
                sub,
                [(s, [seq], batch) for s in args.family_stacks],
                base.config.vocab_size,
                attention=args.family_attention,
                keep_going=True,
            )
            rec["runs"] = runs[f"{batch}x{seq}"]
        except Exception as e:  # keep the other shapes' numbers; the error is part of the record
            rec["error"] = f"{type(e).__name__}: {e}"
            print(f"  {name} failed: {rec['error']}", flush=True)
        del base
        tm.release(env["device"])
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        out[name] = rec
    return out


def failed(res: Any) -> bool:
    """Whether the families part's record holds an error (the part's, a shape's or a stack's)."""
    if not isinstance(res, dict):
        return False
    return "error" in res or any(
        isinstance(r, dict)
        and ("error" in r or any(isinstance(s, dict) and "error" in s for s in (r.get("runs") or {}).values()))
        for r in res.values()
    )


def summary_lines(res: Any, table: Callable[[str, dict[str, Any]], list[str]]) -> list[str]:
    """The summary's lines for the families part: `table` (label, {batch x seq: {stack: run}}) per shape."""
    if not isinstance(res, dict):
        return []
    if "error" in res:
        return [f"families: {res['error']}"]
    lines: list[str] = []
    for name, r in res.items():
        lines += [f"{name}: {r['error']}"] if "error" in r else table(name, {f"{r['batch']}x{r['seq']}": r["runs"]})
    return lines
