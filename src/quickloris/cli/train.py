"""`quickloris train`: QLoRA fine-tuning of a local / embedded model on JSONL or an embedded task.

Options come from the dataclasses `quickloris.train.config.ModelConfig`, `quickloris.data.config.DataConfig`,
`quickloris.models.prepare.QLoRAConfig`, `quickloris.train.config.TrainConfig` (its nested compile and activation
checkpointing configs included), `EvalConfig` and `quickloris.parallel.fsdp.FSDPOptions`, one argument group each
(a new group is one more entry in `groups`). The work is `quickloris.train.run.run_train`.
"""

from __future__ import annotations

import argparse

from quickloris.config import add_dataclass_arguments, dataclass_from_args


def groups() -> list[tuple[str, type]]:
    """(argument-group title, config dataclass), in the order `run_train` takes them."""
    from quickloris.data.config import DataConfig
    from quickloris.models.prepare import QLoRAConfig
    from quickloris.parallel.fsdp import FSDPOptions
    from quickloris.train.config import EvalConfig, ModelConfig, TrainConfig
    from quickloris.train.vision import VisionConfig

    return [
        ("model", ModelConfig),
        ("data", DataConfig),
        ("LoRA and quantization", QLoRAConfig),
        ("training", TrainConfig),
        ("evaluation", EvalConfig),
        ("several GPUs: torchrun --nproc-per-node N -m quickloris train --fsdp ...", FSDPOptions),
        ("vision-language models (Qwen2-VL, Qwen2.5-VL, Llava, LLaVA-NeXT, Pixtral, Llama-3.2-Vision)", VisionConfig),
    ]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="QLoRA fine-tuning (default: the embedded SmolLM2 on the embedded addition task)",
        description="Fine-tune a model with QLoRA: NF4 base, LoRA adapters saved in PEFT's format, response-only "
        "loss, exact-match accuracy before and after. With no options it trains the embedded "
        "SmolLM2-135M-Instruct on the embedded addition task (what `make demo` runs).",
    )
    for title, cls in groups():
        add_dataclass_arguments(parser, cls, group=title)
    parser.set_defaults(func=_run)


def configs_from_args(args: argparse.Namespace) -> list:
    """The config dataclasses of `groups()`, built (and validated) from parsed arguments."""
    return [dataclass_from_args(cls, args) for _, cls in groups()]


def _run(args: argparse.Namespace) -> int:
    from quickloris.cli.console import command_console
    from quickloris.train.config import TrainConfig
    from quickloris.train.run import run_train

    configs = configs_from_args(args)
    with command_console(next(c for c in configs if isinstance(c, TrainConfig)).progress):
        run_train(*configs)
    return 0
