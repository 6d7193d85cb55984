"""`quickloris export gguf`: merge LoRA adapters into the base model and write one GGUF file.

Options come from `quickloris.export.gguf_export.GGUFExportConfig`.
"""

from __future__ import annotations

import argparse

from quickloris.config import add_dataclass_arguments, dataclass_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    from quickloris.export.gguf_export import GGUFExportConfig

    parser = subparsers.add_parser("export", help="export a fine-tuned model (GGUF for llama.cpp / Ollama)")
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    gguf = formats.add_parser(
        "gguf",
        help="one GGUF file: LoRA merged, quantized in C++ (e.g. --quant q4_k_m)",
        description="Merge LoRA adapters into the base weights and write a GGUF file "
        "that llama.cpp, Ollama and LM Studio load. By default the adapter is "
        "merged into the NF4 base it was trained on, so the file answers like "
        "`quickloris eval --adapter`; `quickloris eval --gguf FILE` scores it.",
    )
    add_dataclass_arguments(gguf, GGUFExportConfig, group="export options")
    gguf.set_defaults(func=_run_gguf)


def _run_gguf(args: argparse.Namespace) -> int:
    from quickloris.cli.console import command_console
    from quickloris.export.gguf_export import GGUFExportConfig, export_from_config

    cfg = dataclass_from_args(GGUFExportConfig, args)
    with command_console(cfg.progress):
        result = export_from_config(cfg, echo=lambda m: print(m, flush=True))
    counts: dict[str, int] = {}
    for qtype in result.tensor_types.values():
        counts[qtype] = counts.get(qtype, 0) + 1
    mib = result.tensor_bytes / 2**20
    print(
        f"wrote {result.path}: {len(result.tensor_types)} tensors "
        f"({', '.join(f'{n} {t}' for t, n in sorted(counts.items()))}), {mib:.1f} MiB, {result.quant}, "
        f"{result.seconds:.1f} s after loading"
    )
    print(f"merge base: {result.merge_base}")
    return 0
