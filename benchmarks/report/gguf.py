"""Report layout of benchmarks/gguf_quantize.py (gguf/*.json)."""

from __future__ import annotations

from typing import Any

from benchmarks.report.markdown import num, ratio, table

_METHODS = {
    "ours_q4_k_m": "quickloris Q4_K_M",
    "ggml_q4_k_m": "ggml Q4_K_M",
    "ours_q8_0": "quickloris Q8_0",
    "ours_q8_0_1thread": "quickloris Q8_0, 1 thread",
    "ggml_q8_0": "ggml Q8_0",
    "numpy_q8_0": "`gguf` numpy Q8_0",
}


def what(kind: str, r: dict[str, Any]) -> str:
    return f"gguf_quantize: {r.get('model')}, {r.get('threads')} threads, ggml from {r.get('ggml_library')}"


def protocol(kind: str, r: dict[str, Any]) -> str:
    return (
        f"`benchmarks/gguf_quantize.py` on the CPU, {num(r.get('threads'))} threads: every tensor of the "
        f"model ({r.get('model')}; {num(r.get('parameters'))} parameters, random normal weights generated "
        "outside the timed region) quantized by quickloris' C++ core, by ggml's `ggml_quantize_chunk` (driven by "
        "as many Python threads over row chunks) and, for Q8_0, by the `gguf` package's numpy path; seconds of "
        "quantization only; then the whole Q4_K_M export through the GGUF writer to a file; the bytes of every "
        f"tensor compared with ggml's. ggml library: `{r.get('ggml_library')}`. 1-minute load average at the end: "
        f"{num(r.get('load_average_1min_at_end'))} (the machine was shared)."
    )


def headline(kind: str, r: dict[str, Any]) -> list[str]:
    secs, rate = r.get("seconds") or {}, r.get("mparams_per_second") or {}
    out = table(
        ["quantizer", "seconds", "M parameters / s"], [[_METHODS.get(k, k), v, rate.get(k)] for k, v in secs.items()]
    )
    out += [
        f"- Speed-ups: Q4_K_M vs ggml {ratio(r.get('speedup_q4_k_m_vs_ggml'))}, Q8_0 vs ggml "
        f"{ratio(r.get('speedup_q8_0_vs_ggml'))}, Q8_0 vs `gguf` numpy "
        f"{ratio(r.get('speedup_q8_0_vs_gguf_numpy'))}.",
        f"- Whole Q4_K_M export to a file: {num(r.get('q4_k_m_export_to_file_seconds'))} s, "
        f"{num(r.get('q4_k_m_file_bytes'))} bytes; types by parameters: "
        + ", ".join(f"{k} {num(v)}" for k, v in (r.get("q4_k_m_types_by_parameters") or {}).items())
        + ".",
        f"- Bytes equal to ggml's for every tensor: {num(r.get('bytes_equal_ggml'))}"
        + (f" ({len(r['mismatched_tensors'])} tensors differ)" if r.get("mismatched_tensors") else "")
        + ".",
        "",
    ]
    return out
