"""Sequence classification in `quickloris train` and `quickloris eval` (``--task-type classification``).

* `Classification`: the training loop's objective (`quickloris.train.loop`): batches from
  `quickloris.data.classification.collate_classification`, a step normalised by its labelled texts ``N``, each
  micro-batch's share ``Σ w[y] ℓ / N`` computed by the classifier's forward (`quickloris.models.classification`).
* `resolve_class_weights`: ``--class-weights`` (none, auto, a list, or label=weight pairs) against the label set.
* `evaluate_classification`: accuracy and macro-F1 of the predicted classes (argmax of the pooled logits) on
  held-out texts, printed as a per-class table. Macro-F1 is the unweighted mean over the classes that occur in the
  labels or the predictions of the F1 = 2PR / (P + R) of each (0 where P + R = 0), as scikit-learn computes it.
* `run_eval_classification`: ``quickloris eval --task-type classification --adapter A``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from quickloris.config import ConfigError
from quickloris.data.chat import IGNORE_INDEX, TokenizedExample
from quickloris.data.classification import class_of, collate_classification
from quickloris.train.config import EvalConfig, EvalTaskConfig, ModelConfig, TrainConfig, parse_class_weights

Echo = Callable[[str], None]


class Classification:
    """The loop's objective for a sequence classifier: one class id per text (`quickloris.train.loop`)."""

    name = "classification"

    def collate(
        self, examples: Sequence[TokenizedExample], batch: Any, *, packing: bool, pad_token_id: int
    ) -> dict[str, Any]:
        return collate_classification(examples, batch, packing=packing, pad_token_id=pad_token_id)

    def count(self, batch: dict[str, Any]) -> int:
        """The micro-batch's labelled texts."""
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def keep(self, batch: dict[str, Any]) -> None:
        return None  # every text is pooled on its own last token: nothing to agree on across ranks

    def loss(
        self, model: torch.nn.Module, batch: dict[str, Any], num_items: torch.Tensor, keep: Any = None
    ) -> torch.Tensor:
        # Run even when this rank's rows have no label: under FSDP every rank must make the same calls.
        return model(**batch, num_items_in_batch=num_items).loss


def resolve_class_weights(spec: str, labels: Sequence[str], examples: Sequence[TokenizedExample]) -> list[float] | None:
    """The weight of each class (in id order) that ``--class-weights`` `spec` gives for `labels`; None: all 1.

    ``auto``: ``w_c = n / (C · n_c)`` over the training `examples` (balanced: mean weight 1 over them). Named
    weights (``label=w``) need not name every class (the others weigh 1); an unknown name raises."""
    value = parse_class_weights(spec)
    C = len(labels)
    if value == "none":
        return None
    if value == "auto":
        counts = [0] * C
        for ex in examples:
            counts[class_of(ex)] += 1
        n = sum(counts)
        return [n / (C * c) if c else 0.0 for c in counts]
    if isinstance(value, list):
        if len(value) != C:
            raise ConfigError(
                TrainConfig,
                "class_weights",
                f"gives {len(value)} weights but the data has {C} labels ({', '.join(labels)}, in this order)",
            )
        return value
    unknown = sorted(set(value) - set(labels))
    if unknown:
        raise ConfigError(
            TrainConfig,
            "class_weights",
            f"names {', '.join(map(repr, unknown))}, not a label of the data ({', '.join(labels)})",
        )
    return [float(value.get(name, 1.0)) for name in labels]


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision / recall / F1 / support and the confusion matrix (rows: label,
    columns: prediction); see the module docstring."""
    C = len(labels)
    confusion = [[0] * C for _ in range(C)]
    for t, p in zip(y_true, y_pred):
        confusion[t][p] += 1
    total = len(y_true)
    correct = sum(confusion[c][c] for c in range(C))
    per_class, f1s = {}, []
    for c, name in enumerate(labels):
        support = sum(confusion[c])
        predicted = sum(confusion[r][c] for r in range(C))
        precision = confusion[c][c] / predicted if predicted else 0.0
        recall = confusion[c][c] / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        if support or predicted:
            f1s.append(f1)
    return {
        "accuracy": correct / total if total else 0.0,
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
        "correct": correct,
        "total": total,
        "per_class": per_class,
        "confusion": confusion,
        "labels": list(labels),
    }


@torch.no_grad()
def predict(
    model: torch.nn.Module, examples: Sequence[TokenizedExample], *, batch_size: int, pad_token_id: int
) -> list[int]:
    """The predicted class of each example (argmax of the pooled logits), `batch_size` right-padded rows a call."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[int] = []
    try:
        for start in range(0, len(examples), batch_size):
            rows = [[i] for i in range(start, min(start + batch_size, len(examples)))]
            batch = collate_classification(examples, rows, packing=False, pad_token_id=pad_token_id)
            batch.pop("labels")
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            out += logits.argmax(-1).tolist()
    finally:
        model.train(was_training)
    return out


def evaluate_classification(
    model: torch.nn.Module,
    examples: Sequence[TokenizedExample],
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    batch_size: int,
    pad_token_id: int,
    label: str,
    echo: Echo,
    num_samples: int = 3,
) -> dict[str, Any]:
    """Score `model` on tokenized held-out `examples` (their `texts` for the samples shown); prints the table."""
    from quickloris.train.runtime import eager_regions

    t0 = time.perf_counter()
    with eager_regions():
        pred = predict(model, examples, batch_size=batch_size, pad_token_id=pad_token_id)
    seconds = time.perf_counter() - t0
    truth = [class_of(ex) for ex in examples]
    m = classification_metrics(truth, pred, labels)
    m["seconds"] = round(seconds, 3)
    m["samples"] = [
        {"text": t, "label": labels[y], "predicted": labels[p], "correct": y == p}
        for t, y, p in list(zip(texts, truth, pred))[:num_samples]
    ]
    for line in format_table(m, label):
        echo(line)
    return m


def format_table(m: dict[str, Any], label: str) -> list[str]:
    """The printed evaluation: a summary line and the per-class table."""
    head = (
        f"eval{' ' + label if label else ''}: accuracy {100 * m['accuracy']:.1f}% ({m['correct']}/{m['total']}), "
        f"macro-F1 {100 * m['macro_f1']:.1f}%" + (f" in {m['seconds']:.1f} s" if "seconds" in m else "")
    )
    width = max(8, *(len(n) for n in m["labels"]))
    lines = [head, f"    {'class':<{width}}  precision  recall      f1  support"]
    for name, c in m["per_class"].items():
        lines.append(
            f"    {name:<{width}}  {100 * c['precision']:8.1f}%  {100 * c['recall']:5.1f}%  "
            f"{100 * c['f1']:5.1f}%  {c['support']:7d}"
        )
    return lines


def tokenize_eval_rows(
    tokenizer: Any, rows: Sequence[Any], labels: Sequence[str], limit: int | None
) -> list[TokenizedExample]:
    """Held-out rows tokenized whole (none dropped: a dropped row would change the score), at most `limit`
    tokens (the model's position limit) each."""
    from quickloris.data.classification import tokenize_classification

    if not rows:
        return []
    label2id = {n: i for i, n in enumerate(labels)}
    examples, _ = tokenize_classification(
        tokenizer,
        rows,
        label2id,
        max_seq_len=limit or 1 << 30,
        overflow="error",
        what="the training data (the adapter's labels)",
    )
    return examples


def run_eval_classification(
    model_cfg: ModelConfig,
    task_cfg: EvalTaskConfig,
    eval_cfg: EvalConfig,
    *,
    quantization: Any = None,
    echo: Echo = lambda m: print(m, flush=True),
) -> dict[str, Any]:
    """``quickloris eval --task-type classification --adapter A`` (`quickloris.train.evaluation.run_eval` calls it):
    accuracy and macro-F1 of the adapter's classifier (NF4 base + LoRA + its score head) on --eval-data or the
    embedded task's held-out texts. `quantization`: the `QLoRAConfig` whose NF4 settings the adapter was trained
    with (`quickloris.train.evaluation.run_quantization`)."""
    from quickloris.data.classification import get_classification_task, label_ids, read_classification_jsonl
    from quickloris.data.config import task_name
    from quickloris.models.adapters import read_labels
    from quickloris.models.classification import load_classifier
    from quickloris.models.loading import load_tokenizer, resolve_model
    from quickloris.models.prepare import QLoRAConfig, prepare_model
    from quickloris.train.runtime import max_position_embeddings, resolve_device, resolve_dtype, resolve_threads
    from quickloris.utils.atomic import atomic_write_json

    if model_cfg.adapter is None:
        raise ConfigError(
            ModelConfig,
            "adapter",
            "is required with --task-type classification: a classifier is "
            "scored with the score head trained with its adapter",
        )
    if task_cfg.nf4 is False:
        raise ConfigError(
            EvalTaskConfig,
            "nf4",
            "is off, but an adapter is evaluated on the NF4 base it was trained on; drop --no-nf4",
        )
    device = resolve_device(model_cfg)
    dtype = resolve_dtype(model_cfg, device)
    threads, why = resolve_threads(model_cfg)
    if device.type == "cpu" or model_cfg.threads is not None:
        torch.set_num_threads(threads)
    try:
        labels = read_labels(model_cfg.adapter)
    except FileNotFoundError as e:
        raise ConfigError(ModelConfig, "adapter", f": {e}") from None
    source = resolve_model(model_cfg.model)
    if eval_cfg.eval_data is not None:
        rows, what = read_classification_jsonl(eval_cfg.eval_data), f"--eval-data {eval_cfg.eval_data}"
    else:
        task = get_classification_task(task_name(EvalTaskConfig, task_cfg.task, "classification"))
        rows = task.rows("heldout", task_cfg.num_eval, task_cfg.seed)
        what = f"{len(rows)} held-out texts of task {task.name!r} (seed {task_cfg.seed})"
    label_ids(rows, {n: i for i, n in enumerate(labels)}, "the adapter")
    echo(
        f"model: {source.describe()} + adapter {model_cfg.adapter} (classifier: {', '.join(labels)}), NF4 base; "
        f"device {device}" + (f", {why}" if device.type == "cpu" else "")
    )
    echo(f"eval: {what}")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(source)
    examples = tokenize_eval_rows(tokenizer, rows, labels, max_position_embeddings(source))
    model = load_classifier(source, labels, pad_token_id=tokenizer.pad_token_id, dtype=dtype, device=device)
    prepare_model(model, quantization or QLoRAConfig(), adapter=model_cfg.adapter)
    model.eval()
    echo(f"loaded in {time.perf_counter() - t0:.1f} s")
    result = evaluate_classification(
        model,
        examples,
        [r.text for r in rows],
        labels,
        batch_size=eval_cfg.eval_batch_size,
        pad_token_id=tokenizer.pad_token_id,
        label="",
        echo=echo,
    )
    result = {"model": str(source.path), "adapter": model_cfg.adapter, "nf4": True, "eval": what, **result}
    if task_cfg.output is not None:
        atomic_write_json(task_cfg.output, result)
        echo(f"result written to {task_cfg.output}")
    return result
