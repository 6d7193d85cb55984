"""Step 3 of `quickloris.train.run.run_train`: the tokenizer and the data, tokenized, and the held-out problems.

`prepare_run_data` reads --eval-data, loads the tokenizer and prepares the run's examples: a causal LM's
(`quickloris.data.config.prepare_data`: line-numbered format errors, a dataset with nothing to train on), a
sequence classifier's ``{"text", "label"}`` rows (`quickloris.data.config.prepare_classification_data`, the class
weights of --class-weights) or a vision-language model's (`quickloris.train.vision`); it prints what was read and
checks that --max-steps leaves a resumed run something to do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from quickloris.config import ConfigError
from quickloris.data.config import (
    DataConfig,
    PreparedData,
    prepare_classification_data,
    prepare_data,
    read_chat_template,
    task_name,
)
from quickloris.train.config import EvalConfig, ModelConfig, TrainConfig
from quickloris.train.loop import total_steps
from quickloris.train.runtime import load_eval_examples
from quickloris.train.setup import RunSetup


@dataclass
class RunData:
    """The prepared data of a run and what scoring it needs."""

    tokenizer: Any
    prepared: Any  # PreparedData, or the classification / vision equivalent
    examples_eval: Any  # the held-out problems (None: no evaluation)
    chat_template: str | None
    total: int  # the run's optimizer steps
    loading_started: float  # `time.perf_counter()` before the tokenizer was loaded
    processing: Any = None  # a VLM's processor parts (`quickloris.train.vision.load_vision_parts`)
    weights: Any = None  # a classifier's class weights (None: unweighted)


def prepare_run_data(
    setup: RunSetup, model_cfg: ModelConfig, data_cfg: DataConfig, train_cfg: TrainConfig, eval_cfg: EvalConfig
) -> RunData:
    """The tokenizer, the run's examples and held-out problems (see the module docstring)."""
    from quickloris.models.loading import load_tokenizer
    from quickloris.train import vision as vlm
    from quickloris.train.checkpoint import checkpoint_step

    echo, classify, vision, limit = setup.echo, setup.classify, setup.vision, setup.limit
    preloaded = None
    if eval_cfg.eval_data is not None and not classify and not vision:  # a VLM's: read with its images, below
        from quickloris.data.shapes import parse_columns

        preloaded = load_eval_examples(eval_cfg.eval_data, parse_columns(data_cfg.data_columns))
    chat_template = read_chat_template(data_cfg.chat_template)
    echo(f"model: {setup.source.describe()}")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(setup.source)
    weights = processing = None
    if classify:
        from quickloris.train.classify import resolve_class_weights, tokenize_eval_rows

        prepared = prepare_classification_data(
            data_cfg, tokenizer, seed=train_cfg.seed, eval_data=eval_cfg.eval_data, max_position_embeddings=limit
        )
        weights = resolve_class_weights(train_cfg.class_weights, prepared.labels, prepared.examples)
        _check_adapter_labels(model_cfg, prepared.labels)
        examples_eval = tokenize_eval_rows(tokenizer, prepared.eval_rows, prepared.labels, limit)
        eval_what = prepared.eval_source
    elif vision:
        processing, chat_template = vlm.load_vision_parts(setup.source, tokenizer, chat_template)
        prepared, examples_eval, eval_what = vlm.prepare_vision_data(
            data_cfg, setup.vision_cfg, eval_cfg, processing, chat_template, train_cfg.seed
        )
    else:
        prepared = prepare_data(
            data_cfg,
            tokenizer,
            seed=train_cfg.seed,
            max_position_embeddings=limit,
            progress=None if train_cfg.progress else False,
        )
        examples_eval, eval_what = _eval_examples(data_cfg, eval_cfg, prepared, preloaded)
        chat_template = prepared.chat_template  # --task tools may bring quickloris' tool template
        for note in prepared.notes:
            echo(f"note: {note}")
    st = prepared.stats
    if classify:
        echo(
            f"data: {prepared.source}: {st.kept} texts, labels {', '.join(prepared.labels)} ({st.dropped_too_long} "
            f"longer than --max-seq-len dropped), {st.tokens} tokens, longest {st.longest}"
            + (", packed" if data_cfg.packing else "")
        )
    else:
        echo(prepared.header(packing=data_cfg.packing))
    if classify and weights is not None:
        echo("class weights: " + ", ".join(f"{n} {w:.4g}" for n, w in zip(prepared.labels, weights)))
    echo(f"eval: {eval_what}")
    total = total_steps(prepared.examples, train_cfg, packing=data_cfg.packing, max_seq_len=data_cfg.max_seq_len)
    if setup.ckpt is not None and total < checkpoint_step(setup.ckpt):
        raise ConfigError(
            TrainConfig,
            "max_steps",
            f"gives {total} steps, fewer than the {checkpoint_step(setup.ckpt)} the resumed run has done already",
        )
    return RunData(tokenizer, prepared, examples_eval, chat_template, total, t0, processing, weights)


def _eval_examples(data_cfg: DataConfig, eval_cfg: EvalConfig, prepared: PreparedData | None, preloaded: list | None):
    if preloaded is not None:
        return preloaded, f"--eval-data {eval_cfg.eval_data}"
    if data_cfg.data is None and prepared is not None:
        task = task_name(DataConfig, data_cfg.task, "causal_lm")
        return prepared.eval_examples, f"{len(prepared.eval_examples)} held-out problems of task {task!r}"
    return None, "no evaluation: training on --data without --eval-data"


def _check_adapter_labels(model_cfg: ModelConfig, labels: list[str]) -> None:
    """A classification run started from --adapter: the adapter's classes must be the data's."""
    if model_cfg.adapter is None:
        return
    from quickloris.models.adapters import read_labels

    try:
        theirs = read_labels(model_cfg.adapter)
    except FileNotFoundError as e:
        raise ConfigError(ModelConfig, "adapter", f": {e}") from None
    if theirs != labels:
        raise ConfigError(
            ModelConfig,
            "adapter",
            f"{model_cfg.adapter!r} classifies {', '.join(theirs)}, but the data's labels are {', '.join(labels)}",
        )
