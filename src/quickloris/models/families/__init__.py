"""Model families as data: one module per family (``families/<name>.py`` defining ``SPEC``, a `FamilySpec`).

A spec says what quickloris must know about a family: where its decoder layers are and their class, its
attention features (sliding windows model-wide or per layer, logit softcapping, sinks, q/k norm, RoPE layout), its
norm kind, fused projections and how LoRA target names map onto them, tied / scaled embeddings, a final-logit
softcap, llama.cpp's architecture name, and whether the fast path (regional compile, flex attention, compiled loss)
is supported. Adding a family is adding one module here (it is found by name, nothing to list) and its row in
``tests/models/test_families.py``.

* `family_of(model_or_config)`: the spec of a model (its class, or a base class, is a registered ``causal_lm`` or
  ``sequence_classification``), of a config object or a config.json dict (``architectures`` / ``model_type``).
  Any other decoder-only ``*ForCausalLM`` model gets a **generic** spec built from the model (`generic_spec`: decoder
  layers found by shape, their linear layers by name, ``fast_path=False``); a config of one gets `GENERIC`. What
  cannot work is refused in one line (ValueError / TypeError): encoder-decoder models, no decoder layers, decoder
  projections that are not ``nn.Linear`` (GPT-2's Conv1D, MoE expert tensors).
* `decoder_layers(model)`: the decoder-layer ``ModuleList`` of any supported model - the one entry point the
  rest of quickloris (checkpointing, FSDP2, compile) uses to find them.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from quickloris.models.families._spec import LLAMA_LINEARS, Attention, FamilySpec

STATE = "family"  # the key under which prepare_model records a model's spec (`quickloris.models.surgery`)
GENERIC = FamilySpec(
    name="generic",
    causal_lm="*ForCausalLM",
    sequence_classification="",
    model_types=(),
    decoder_layer="",
    layers="",
    linears=(),
    fast_path=False,
    registered=False,
)


class FamilyWarning(UserWarning):
    """One line about how quickloris runs a model (the generic path, or a backend it had to change)."""


def warn(message: str) -> None:
    """Issue `message` as a `FamilyWarning` that prints as one line: ``quickloris: FamilyWarning: <message>`` (no
    source line is quoted, since the location is not a file). Filters on the category or this module apply."""
    import warnings

    warnings.warn_explicit(message, FamilyWarning, filename="quickloris", lineno=0, module=__name__)


@functools.cache
def registered() -> dict[str, FamilySpec]:
    """{family name: spec} of every module in this package defining ``SPEC``."""
    out: dict[str, FamilySpec] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        spec = getattr(importlib.import_module(f"{__name__}.{info.name}"), "SPEC", None)
        if not isinstance(spec, FamilySpec):
            raise TypeError(f"{__name__}.{info.name} must define SPEC = FamilySpec(...)")
        if spec.name in out:
            raise ValueError(f"two family specs are named {spec.name!r}")
        out[spec.name] = spec
    return out


@functools.cache
def _by_class() -> dict[str, FamilySpec]:
    return {cls: spec for spec in registered().values() for cls in spec.classes}


@functools.cache
def _by_model_type() -> dict[str, FamilySpec]:
    return {t: spec for spec in registered().values() for t in spec.model_types}


def registered_classes(kind: str = "causal_lm") -> list[str]:
    """The registered class names of one kind (``causal_lm`` or ``sequence_classification``)."""
    return [getattr(spec, kind) for spec in registered().values()]


def supported_line() -> str:
    return (
        f"quickloris supports {', '.join(registered_classes())} (and their *ForSequenceClassification) and, "
        "without the fast path, other decoder-only *ForCausalLM models"
    )


def _unwrap(model: Any) -> Any:
    for _ in range(4):  # PEFT and similar wrappers
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        if inner is model:
            break
        model = inner
    return model


def _registered_spec_of_class(cls: type) -> FamilySpec | None:
    for klass in cls.__mro__:  # FSDP2's FSDP<Class>, subclasses
        spec = _by_class().get(klass.__name__)
        if spec is not None:
            return spec
    return None


def _config_spec(config: Any) -> FamilySpec:
    get = config.get if isinstance(config, Mapping) else (lambda key, default=None: getattr(config, key, default))
    archs = list(get("architectures", None) or [])
    model_type = get("model_type", None)
    for arch in archs:
        if arch in _by_class():
            return _by_class()[arch]
    if not archs and model_type in _by_model_type():
        return _by_model_type()[model_type]
    what = archs[0] if archs else f"model_type {model_type!r}" if model_type else "model without an architecture"
    if get("is_encoder_decoder", False):
        raise ValueError(f"{what}: an encoder-decoder model; {supported_line()}")
    if archs and not archs[0].endswith("ForCausalLM"):
        raise ValueError(f"{what}: not a decoder-only *ForCausalLM; {supported_line()}")
    return GENERIC


def family_of(obj: Any) -> FamilySpec:
    """The `FamilySpec` of a model (or the model inside a PEFT wrapper), a config object or a config.json dict."""
    from torch import nn

    if isinstance(obj, nn.Module):
        from quickloris.models import surgery

        model = _unwrap(obj)
        spec = surgery.state(model, STATE)  # what prepare_model found (its layers are QLoRA layers now)
        if spec is not None:
            return spec
        spec = _registered_spec_of_class(type(model))
        if spec is not None:
            return spec
        return generic_spec(model)
    return _config_spec(obj)


def decoder_layers(model: Any) -> Any:
    """The decoder-layer ``nn.ModuleList`` of `model` (any model `family_of` accepts)."""
    model = _unwrap(model)
    return family_of(model).layers_of(model)


# ---- the generic path --------------------------------------------------------------------------------------


def _refuse(model: Any, why: str) -> ValueError:
    return ValueError(f"{type(model).__name__} cannot be trained: {why}")


def _find_layers(model: Any, base: Any) -> tuple[str, Any]:
    """The shallowest ModuleList of ``num_hidden_layers`` modules of one class inside `base`."""
    from torch import nn

    n = getattr(model.config, "num_hidden_layers", None)
    found = [
        (path, m)
        for path, m in base.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) and len({type(x) for x in m}) == 1 and (n is None or len(m) == n)
    ]
    if not found:
        raise _refuse(
            model,
            f"no decoder layers found (a ModuleList of {n or 'N'} identical blocks in model.{model.base_model_prefix})",
        )
    return min(found, key=lambda item: item[0].count("."))


def _linear_names(model: Any, layers_path: str, layers: Any) -> tuple[str, ...]:
    """The child names of the decoder layers' linears; refuses weights held by anything else."""
    from torch import nn

    from quickloris.nn.qlora_linear import QLoRALinear

    names: set[str] = set()
    for i, layer in enumerate(layers):
        for path, module in layer.named_modules():
            if isinstance(module, (nn.Linear, QLoRALinear)):
                names.add(path.rsplit(".", 1)[-1])
                continue
            if isinstance(module, nn.Embedding):
                continue
            for pname, p in module.named_parameters(recurse=False):
                if p.dim() >= 2:
                    raise _refuse(
                        model,
                        f"{layers_path}.{i}.{path}.{pname} is a {p.dim()}-D parameter of "
                        f"{type(module).__name__}, not an nn.Linear weight: quickloris quantizes and "
                        "adapts nn.Linear layers only",
                    )
    if not names:
        raise _refuse(model, f"its decoder layers ({layers_path}) hold no nn.Linear layer")
    return tuple(sorted(names))


def generic_spec(model: Any) -> FamilySpec:
    """A spec for an unregistered decoder-only ``*ForCausalLM``, read off the model (fast path off)."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{name} is not a transformers model (no .config); {supported_line()}")
    if getattr(config, "is_encoder_decoder", False):
        raise _refuse(model, f"it is an encoder-decoder model; {supported_line()}")
    if not name.endswith("ForCausalLM"):
        raise _refuse(
            model,
            f"it is not a decoder-only *ForCausalLM (nor a registered family's "
            f"*ForSequenceClassification); {supported_line()}",
        )
    base = GENERIC.decoder(model)
    path, layers = _find_layers(model, base)
    layers_path = f"{model.base_model_prefix}.{path}"
    softcap = "final_logit_softcapping" if hasattr(config, "final_logit_softcapping") else None
    return FamilySpec(
        name="generic",
        causal_lm=name,
        sequence_classification="",
        model_types=(getattr(config, "model_type", ""),),
        decoder_layer=type(layers[0]).__name__,
        layers=path,
        linears=_linear_names(model, layers_path, layers),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        final_logit_softcap=softcap,
        fast_path=False,
        registered=False,
    )


__all__ = [
    "FamilySpec",
    "Attention",
    "FamilyWarning",
    "warn",
    "GENERIC",
    "LLAMA_LINEARS",
    "STATE",
    "registered",
    "registered_classes",
    "family_of",
    "decoder_layers",
    "generic_spec",
    "supported_line",
]
