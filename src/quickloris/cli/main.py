"""`quickloris` entry point: one subcommand per module in `quickloris.cli`.

Each command module defines `register(subparsers)` which adds its parser and sets `func`.
Modules are imported lazily per command so `quickloris --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("quickloris.cli.bench", "benchmarks that write results with provenance"),
    "export": ("quickloris.cli.export", "export a fine-tuned model (GGUF for llama.cpp / Ollama / LM Studio)"),
    "train": ("quickloris.cli.train", "QLoRA fine-tuning (default: the embedded SmolLM2 on an embedded task)"),
    "eval": ("quickloris.cli.eval", "exact-match accuracy of a model (+ adapter) on held-out problems"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quickloris", description="Fast, memory-lean QLoRA fine-tuning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        if wanted == name:
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
