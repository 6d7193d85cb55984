"""`quickloris eval`: exact-match accuracy of a model (+ an optional LoRA adapter, + an exported GGUF file) on
held-out problems.

Options come from `quickloris.train.config.ModelConfig`, `EvalTaskConfig`, `EvalConfig` and
`quickloris.train.vision.VisionConfig` (vision-language models); the work is `quickloris.train.evaluation.run_eval`.
"""

from __future__ import annotations

import argparse

from quickloris.config import add_dataclass_arguments, dataclass_from_args


def groups() -> list[tuple[str, type]]:
    from quickloris.train.config import EvalConfig, EvalTaskConfig, ModelConfig
    from quickloris.train.vision import VisionConfig

    return [
        ("model", ModelConfig),
        ("task", EvalTaskConfig),
        ("evaluation", EvalConfig),
        ("vision-language models: --eval-data with images, or the embedded --visual-task", VisionConfig),
    ]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="exact-match accuracy of a model (+ adapter) on an embedded task or a JSONL file",
        description="Greedy replies to held-out problems, the first line compared exactly with the answer. With "
        "--adapter the base is quantized to NF4 as in training, so the number equals a train run's "
        "'after' accuracy. --gguf FILE scores an exported file through llama.cpp on the same problems; "
        "with --adapter too, one table shows before / after / exported.",
    )
    for title, cls in groups():
        add_dataclass_arguments(parser, cls, group=title)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from quickloris.cli.console import command_console
    from quickloris.train.evaluation import run_eval

    model_cfg, task_cfg, eval_cfg, vision_cfg = (dataclass_from_args(cls, args) for _, cls in groups())
    with command_console(task_cfg.progress):
        run_eval(model_cfg, task_cfg, eval_cfg, vision_cfg)
    return 0
