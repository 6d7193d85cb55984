"""`quickloris` entry point: one subcommand per module in `quickloris.cli`.

Each command module defines `register(subparsers)` which adds its parser and sets `func`.
Modules are imported lazily per command so `quickloris --help` stays fast.

A user error (a bad option value, a missing or malformed file, an unsupported model) prints one line naming the
option or the file and exits with 2; a run that stops for a reason of its own (e.g. a diverging loss) prints one
line and exits with the error's ``exit_code``; Ctrl-C prints where it stopped and exits with 130. No traceback,
unless ``--debug`` is given (anywhere on the command line) or ``QUICKLORIS_DEBUG=1`` is set. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("quickloris.cli.bench", "benchmarks that write results with provenance"),
    "export": ("quickloris.cli.export", "export a fine-tuned model (GGUF for llama.cpp / Ollama / LM Studio)"),
    "train": ("quickloris.cli.train", "QLoRA fine-tuning (default: the embedded SmolLM2 on an embedded task)"),
    "eval": ("quickloris.cli.eval", "exact-match accuracy of a model (+ adapter) on held-out problems"),
}
USAGE_ERROR, INTERRUPTED = 2, 130


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error prints one line (and where to look) instead of the ~60-line usage block."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = Parser(prog="quickloris", description="Fast, memory-lean QLoRA fine-tuning.")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error (anywhere on the command line; or set QUICKLORIS_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        if wanted == name:
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def exit_code(error: BaseException) -> int | None:
    """The exit status of a user-facing error, None for a bug (which keeps its traceback)."""
    code = getattr(error, "exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(error, (ValueError, OSError, ModuleNotFoundError)):  # bad option, file, data or model
        return USAGE_ERROR
    return None


def describe(error: BaseException, args: argparse.Namespace | None) -> str:
    """One line for `error`; a `ConfigError` names the command-line option."""
    from quickloris.config import ConfigError, option_flags

    if isinstance(error, ConfigError):
        return error.render(option_flags(args) if args is not None else None)
    return str(error).strip().replace("\n", " ") or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("QUICKLORIS_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else USAGE_ERROR
    prog = f"quickloris {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        if debug:
            raise
        print(f"{prog}: {e}" if str(e) else f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as e:
        code = exit_code(e)
        if code is None or debug:
            raise
        if not getattr(e, "reported_elsewhere", False):  # e.g. the same error, printed by FSDP rank 0
            print(f"{prog}: error: {describe(e, args)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
