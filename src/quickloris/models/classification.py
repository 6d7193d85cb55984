"""Sequence classification on a QLoRA decoder: NF4 base + LoRA, a trainable score head, last-token pooling.

A ``*ForSequenceClassification`` model of a supported family is a decoder (``model.model``) and a linear head
``score: [C, H]`` (C = ``config.num_labels``). `prepare_model` turns its decoder into NF4 + LoRA as for a causal LM
and calls `enable_classification`, which (through `quickloris.models.surgery`, step ``classify``):

* makes the score head trainable, in fp32 by default (its AdamW update needs fp32 master weights, like the LoRA
  matrices'), and registers it as PEFT's ``modules_to_save`` (`quickloris.models.adapters` saves and loads it with
  the adapter, under PEFT's key ``base_model.model.score.weight``);
* installs an instance ``forward`` on that model object (its class is not touched) that pools and scores.

Pooling. Each *document* is scored on its last token (a decoder's last token is the only one that has seen the
whole text). A document ends at token t of a row iff t is a real token and the next token is padding, or starts a
new document (its position id does not continue by +1: packed rows, as `quickloris.data.packing` makes them), or t
is the row's last token. So

* a padded batch (2-D ``attention_mask``, no ``position_ids``): one document per row, pooled on the row's rightmost
  real token, HF's choice for right and left padding alike (HF finds it from ``input_ids != pad_token_id``; the
  two agree where a text does not end in the pad token, which `quickloris.data.classification` guarantees);
* without a mask or position ids, HF's rule itself (rightmost token that is not ``pad_token_id``);
* a packed row ``[1, N]`` of D documents (position ids restarting at 0): D pooled tokens.

The pooled hidden states ``h_d`` ([D, H], row-major document order) are the only ones scored:
``z_d = W h_d`` ([D, C] in the head's dtype, fp32 by default); nothing of size [tokens, C] or [tokens, vocab] is
made. ``labels`` has one class id per document ([D]; -100 = not scored).

Loss. With class weights ``w`` (none: all 1) and ``ℓ_d = -log softmax(z_d)[y_d]``::

    loss = Σ_d w[y_d] · ℓ_d / N

``N`` = ``num_items_in_batch`` when given (the labelled documents of the whole optimizer step: the quickloris loop
and HF ``Trainer`` pass it, so gradient accumulation and several ranks give one large batch's loss), else this
batch's labelled documents. Without weights this is HF's own ``ForSequenceClassificationLoss`` (the mean
cross-entropy); with weights it is *not* torch's weighted mean ``Σ w ℓ / Σ w``, whose denominator depends on the
batch: balanced weights (``auto``: ``w_c = n / (C · n_c)``) have mean 1 over the training data, so the loss keeps
its scale. Only single-label classification (C >= 2, integer labels) is supported.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quickloris.models import adapters, surgery

STEP = "classify"
HEAD = "score"
IGNORE_INDEX = -100


def is_sequence_classifier(model: nn.Module) -> bool:
    """Whether `model` is a transformers ``*ForSequenceClassification`` with a decoder and a linear ``score`` head."""
    model = surgery.unwrap(model)
    return type(model).__name__.endswith("ForSequenceClassification") and isinstance(
        getattr(model, HEAD, None), nn.Linear
    )


# ------------------------------------------------------------------------------------------------------ pooling


def pooled_positions(
    batch: int,
    seq: int,
    device: Any,
    *,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    pad_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) int64 index tensors [D] of the last token of every document, row-major (module docstring)."""
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape != (batch, seq)):
        raise ValueError(
            f"attention_mask must be a 2-D [batch, seq] = [{batch}, {seq}] mask, got {tuple(attention_mask.shape)}"
        )
    cols = torch.arange(seq, device=device)
    if position_ids is None:
        if attention_mask is not None:
            real = attention_mask.to(device).bool()
        elif input_ids is not None and pad_token_id is not None:
            real = input_ids.to(device) != pad_token_id
        else:
            real = torch.ones(batch, seq, dtype=torch.bool, device=device)
        # The rightmost real token of each row (column 0 for a row of padding only, as HF's argmax gives).
        last = (cols * real).argmax(-1)
        return torch.arange(batch, device=device), last
    if position_ids.dim() != 2 or position_ids.shape[-1] != seq:
        raise ValueError(f"position_ids must be [batch, {seq}], got {tuple(position_ids.shape)}")
    pos = position_ids.to(device).expand(batch, seq)
    real = (
        attention_mask.to(device).bool()
        if attention_mask is not None
        else torch.ones(batch, seq, dtype=torch.bool, device=device)
    )
    ends_next = torch.ones(batch, seq, dtype=torch.bool, device=device)  # the row's last token ends a document
    ends_next[:, :-1] = ~real[:, 1:] | (pos[:, 1:] != pos[:, :-1] + 1)
    rows, last = (real & ends_next).nonzero(as_tuple=True)
    return rows, last


# ------------------------------------------------------------------------------------------------------ loss


def check_class_labels(labels: torch.Tensor, num_labels: int, documents: int) -> torch.Tensor:
    """`labels` as a flat int64 [D] tensor; raises on a wrong count, a float label, or an id outside [0, C)."""
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids (single-label classification), got {labels.dtype}")
    flat = labels.reshape(-1)
    if flat.numel() != documents:
        raise ValueError(
            f"labels has {flat.numel()} entries but the batch has {documents} documents: one class id "
            "per row (padded batch) or per packed document"
        )
    if not torch.compiler.is_compiling():
        bad = (flat != IGNORE_INDEX) & ((flat < 0) | (flat >= num_labels))
        if bool(bad.any()):
            raise ValueError(
                f"labels must be class ids in [0, {num_labels}) or {IGNORE_INDEX}, got {flat[bad][:5].tolist()}"
            )
    return flat.long()


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, weight: torch.Tensor | None = None, num_items: Any = None
) -> torch.Tensor:
    """``Σ_d w[y_d] ℓ_d / N`` over the documents with a label (module docstring); fp32."""
    per_doc = F.cross_entropy(
        logits.float(),
        labels,
        weight=None if weight is None else weight.float(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    count = (labels != IGNORE_INDEX).sum() if num_items is None else torch.as_tensor(num_items, device=logits.device)
    return per_doc.sum() / count.clamp_min(1)


def _classify_forward(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    **kwargs,
):
    """The classifier's forward: decoder, last token of each document, score head, loss (module docstring)."""
    from transformers.modeling_outputs import SequenceClassifierOutputWithPast

    state = surgery.state(self, STEP)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    num_items = kwargs.pop("num_items_in_batch", None)
    decoder = getattr(self, self.base_model_prefix)
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        **kwargs,
    )
    hidden = out[0]
    B, S = hidden.shape[:2]
    pad = getattr(self.config.get_text_config(), "pad_token_id", None)
    rows, cols = pooled_positions(
        B,
        S,
        hidden.device,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        pad_token_id=pad,
    )
    head = getattr(self, HEAD)
    logits = head(hidden[rows, cols].to(head.weight.dtype))
    loss = None
    if labels is not None:
        targets = check_class_labels(labels.to(logits.device), logits.shape[-1], logits.shape[0])
        weight = state["class_weights"]
        loss = classification_loss(
            logits, targets, num_items=num_items, weight=None if weight is None else weight.to(logits.device)
        )
    result = SequenceClassifierOutputWithPast(
        loss=loss,
        logits=logits,
        past_key_values=out.past_key_values,
        hidden_states=out.hidden_states,
        attentions=out.attentions,
    )
    return result if return_dict else result.to_tuple()


# ------------------------------------------------------------------------------------------------------ setup


def enable_classification(model: nn.Module, *, head_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Make `model`'s score head trainable (in `head_dtype`), saved as ``modules_to_save``, and install the pooled
    classification forward (module docstring). Called by `prepare_model` for a sequence classifier."""
    if not is_sequence_classifier(model):
        raise TypeError(f"{type(model).__name__} is not a *ForSequenceClassification model with a linear `{HEAD}` head")
    if surgery.applied(model, STEP):
        raise ValueError("classification is enabled on this model already")
    num_labels = int(model.config.num_labels)
    head = getattr(model, HEAD)
    if num_labels < 2 or head.out_features != num_labels:
        raise ValueError(
            f"sequence classification needs num_labels >= 2 matching the {HEAD} head, got num_labels="
            f"{num_labels} and a head of {head.out_features} outputs (regression is not supported)"
        )
    old = head.weight.dtype
    if old != head_dtype:
        head.to(head_dtype)
        surgery.record(
            model,
            STEP,
            f"model.{HEAD}",
            f"cast {old} -> {head_dtype} (trained: full-precision master weights)",
            undo_fn=lambda m: getattr(m, HEAD).to(old),
        )
    for p in head.parameters():
        p.requires_grad_(True)
    surgery.record(
        model,
        STEP,
        f"model.{HEAD}.parameters()",
        "trainable",
        undo_fn=lambda m: [p.requires_grad_(False) for p in getattr(m, HEAD).parameters()],
    )
    adapters.set_modules_to_save(model, [HEAD], STEP)
    surgery.set_state(model, STEP, {"class_weights": None})
    surgery.set_attribute(
        model,
        STEP,
        model,
        "forward",
        types.MethodType(_classify_forward, model),
        "decoder -> last token of each document -> score head -> class-weighted cross-entropy",
        path="model",
    )
    return model


def set_class_weights(model: nn.Module, weights: Sequence[float] | torch.Tensor | None) -> None:
    """Weigh each class's documents in the loss (`weights[c]` for class c; None: all 1)."""
    state = surgery.state(model, STEP)
    if state is None:
        raise ValueError("classification is not enabled on this model (prepare a *ForSequenceClassification model)")
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.float32).flatten()
        C = int(surgery.unwrap(model).config.num_labels)
        if w.numel() != C or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not bool((w > 0).any()):
            raise ValueError(f"class weights must be {C} finite non-negative numbers (not all 0), got {w.tolist()}")
        weights = w
    state["class_weights"] = weights


def class_weights(model: nn.Module) -> torch.Tensor | None:
    state = surgery.state(model, STEP)
    return None if state is None else state["class_weights"]


def classification_enabled(model: nn.Module) -> bool:
    return surgery.state(model, STEP) is not None


def label_config(id2label: Mapping[int, str] | Sequence[str]) -> dict[str, Any]:
    """``num_labels``, ``id2label`` and ``label2id`` (transformers' config fields) of the class names, in id order."""
    names = [id2label[i] for i in range(len(id2label))] if isinstance(id2label, Mapping) else list(id2label)
    if len(names) < 2 or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"classification needs at least 2 distinct, non-empty class names, got {names!r}")
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }


def classifier_from_causal_lm(
    causal: nn.Module,
    labels: Sequence[str],
    *,
    pad_token_id: int | None,
    seed: int = 0,
    init_range: float | None = None,
) -> nn.Module:
    """A ``*ForSequenceClassification`` holding `causal`'s decoder (the same module objects, not a copy) and a new
    score head [C, H], initialised N(0, σ²) from a generator seeded with `seed` (σ: the config's
    ``initializer_range``, as transformers initialises it). `causal`'s lm_head is dropped; `causal` is not usable
    afterwards (its config now describes the classifier)."""
    from transformers import AutoModelForSequenceClassification

    if surgery.edits(causal) is not None:
        raise ValueError("build the classifier from the loaded model, before quickloris prepares it")
    cfg = causal.config
    fields = label_config(labels)
    meta_cfg = copy.deepcopy(cfg)
    meta_cfg.num_labels = fields["num_labels"]
    with torch.device("meta"):  # the class' own decoder is never materialised: it is replaced by `causal`'s
        model = AutoModelForSequenceClassification.from_config(meta_cfg)
    cfg.num_labels = fields["num_labels"]  # one config object for the whole model (the decoder holds `cfg`)
    cfg.id2label, cfg.label2id = fields["id2label"], fields["label2id"]
    cfg.pad_token_id = pad_token_id
    cfg.problem_type = "single_label_classification"
    cfg.architectures = [type(model).__name__]
    model.config = cfg
    decoder = getattr(causal, causal.base_model_prefix)
    setattr(model, model.base_model_prefix, decoder)
    ref = next(decoder.parameters())
    sigma = float(init_range if init_range is not None else getattr(cfg, "initializer_range", 0.02))
    g = torch.Generator().manual_seed(int(seed))
    weight = torch.randn(fields["num_labels"], cfg.get_text_config().hidden_size, generator=g) * sigma
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
    setattr(model, HEAD, head)
    model.num_labels = fields["num_labels"]
    return model.train(causal.training)


def load_classifier(
    source: Any,
    labels: Sequence[str],
    *,
    pad_token_id: int | None,
    seed: int = 0,
    dtype: Any = None,
    device: Any = None,
) -> nn.Module:
    """The sequence classifier of a model source (`quickloris.models.loading.resolve_model`: an HF folder, a
    ``*-bnb-4bit`` folder, a GGUF file, the embedded default): its causal LM loaded as `load_model` does, then
    `classifier_from_causal_lm` with a score head for `labels` seeded with `seed`. In eval mode."""
    from quickloris.models.loading import load_model

    causal = load_model(source, dtype=dtype, device=device)
    return classifier_from_causal_lm(causal, labels, pad_token_id=pad_token_id, seed=seed).eval()


def class_names(model: nn.Module) -> list[str]:
    """The class names of a classifier, in id order (``config.id2label``)."""
    cfg = surgery.unwrap(model).config
    return [str(cfg.id2label[i]) for i in range(int(cfg.num_labels))]


__all__ = [
    "STEP",
    "HEAD",
    "is_sequence_classifier",
    "pooled_positions",
    "check_class_labels",
    "classification_loss",
    "enable_classification",
    "set_class_weights",
    "class_weights",
    "classification_enabled",
    "label_config",
    "classifier_from_causal_lm",
    "load_classifier",
    "class_names",
]
