"""Make a Hugging Face causal LM ready for QLoRA training: NF4 base weights, LoRA adapters, chunked loss.

`prepare_model(model, QLoRAConfig(...))` changes that one model object through explicit calls (no class is
patched):

1. Finds the model's family (`quickloris.models.families.family_of`): a registered family's ``*ForCausalLM`` or
   ``*ForSequenceClassification`` (Llama, Mistral, Qwen2, Qwen3, Gemma-2, Gemma-3, Phi-3, ...), or the generic path
   for any other decoder-only ``*ForCausalLM``; encoder-decoder models, models without decoder layers and
   decoders with non-``nn.Linear`` projections are refused in one line.
2. Replaces every decoder linear layer named in ``target_modules`` (`resolve_targets`: the family's names; the
   default list means every decoder linear, e.g. Phi-3's fused ``qkv_proj, o_proj, gate_up_proj, down_proj``) by a
   `QLoRALinear` (NF4 base + LoRA), and every other decoder linear by a `QLoRALinear` without adapter (the whole
   decoder is 4-bit, as after a bitsandbytes 4-bit load; lm_head / the score head and embeddings stay 16-bit and
   frozen). The NF4 base comes from
   * a bitsandbytes ``Linear4bit`` (a model loaded with ``BitsAndBytesConfig(load_in_4bit=True, nf4)``): its bytes
     are wrapped, not copied or re-quantized (`NF4Tensor.from_bnb`);
   * a 16-bit ``nn.Linear``: quantized now, bit-exactly as bitsandbytes would on that device (``quantize=True``;
     with ``quantize=False`` a 16-bit target raises, for callers that require a 4-bit model);
   * a pre-quantized ``*-bnb-4bit`` folder: `quickloris.models.prequantized.load_bnb_4bit_model` puts its NF4
     tensors into a model built on the meta device, then `prepare_model` wraps them like bitsandbytes weights.
3. Freezes everything but the LoRA matrices (and a sequence classifier's score head:
   `quickloris.models.classification`); the bitsandbytes quantizer handle (``model.hf_quantizer``) is
   dropped, since no bitsandbytes layer is left (HF ``Trainer`` then sees a model with trainable adapters).
4. Computes a causal LM's training loss chunked (`quickloris.models.chunked_loss`: no [tokens, vocab] logits),
   gradient in forward (one head matmul fewer; the head is frozen). A sequence classifier keeps its own loss.
5. Sets the attention backend (`quickloris.models.attention`: ``sdpa``, ``sdpa_cudnn`` or ``flex``) and
   ``use_cache=False``. A family whose attention caps its scores (Gemma-2) gets ``flex`` where ``sdpa`` was asked
   (SDPA has no softcap: it would silently drop it), with a warning.
6. Gives the object a ``save_pretrained`` that writes the adapter in PEFT's format
   (`quickloris.models.adapters`), so ``Trainer.save_model`` and checkpoints produce PEFT adapter folders.

The generic path (an unregistered family) is steps 1-6 without the fast path: SDPA (eager where the model has no
SDPA) instead of flex, no regional compile (`quickloris.parallel.compile` leaves such a model eager), and the
chunked loss only after a check that the model's logits are its plain linear head applied to the decoder's last
hidden state (one forward of 4 tokens; otherwise the model's own loss). It says so in one warning line
(`FamilyWarning`).

Every change is made through `quickloris.models.surgery` and listed in ``model.quickloris_edits``.

Checkpointing and compilation come after, in `quickloris.parallel.compose` (quantize/LoRA -> checkpointing ->
compile).
"""

from __future__ import annotations

import dataclasses
import os
import types
from typing import Any, Literal

import torch
from torch import nn

from quickloris.config import Config, ConfigError, at_least, comma_list, field, in_range
from quickloris.models import adapters as adapters_mod
from quickloris.models import surgery
from quickloris.models.families import STATE as FAMILY
from quickloris.models.families import (
    FamilySpec,
    FamilyWarning,  # noqa: F401 - re-exported: prepare_model's warning
    family_of,
    supported_line,
    warn,
)
from quickloris.nn.qlora_linear import QLoRALinear, lora_scaling
from quickloris.tensor.nf4_tensor import NF4Tensor
from quickloris.utils.progress import progress

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEP = "prepare"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _targets(names: list[str]) -> str | None:
    if not names:
        return "must name at least one layer"
    if "lm_head" in names or "embed_tokens" in names:
        return (
            f"got {names}: LoRA on lm_head / embed_tokens is not supported; target decoder linears such as "
            f"{','.join(DEFAULT_TARGETS)}"
        )
    return None


@dataclasses.dataclass
class QLoRAConfig(Config):
    """How `prepare_model` turns a causal LM into a QLoRA model (LoRA fields mean what PEFT's LoraConfig's do)."""

    r: int = field(16, help="LoRA rank", check=at_least(1))
    lora_alpha: float = field(
        32.0,
        help="LoRA alpha: updates are scaled by alpha / r (alpha / sqrt(r) with rsLoRA)",
        check=in_range(0.0, low_open=True),
    )
    lora_dropout: float = field(
        0.0,
        help="dropout probability on the input of the LoRA branch (training only)",
        check=in_range(0.0, 1.0, high_open=True),
    )
    use_rslora: bool = field(False, help="rank-stabilised LoRA: scale by alpha / sqrt(r)")
    target_modules: list[str] = field(
        list(DEFAULT_TARGETS),
        help="names of the decoder linear layers that get LoRA "
        "(comma-separated), or all-linear; the default means every decoder linear, "
        "under the family's names (Phi-3: qkv_proj,o_proj,gate_up_proj,down_proj)",
        convert=comma_list(),
        check=_targets,
    )
    quantize: bool = field(
        True,
        help="quantize 16-bit target layers to NF4; with --no-quantize the model must "
        "already hold 4-bit (bitsandbytes NF4) weights",
    )
    blocksize: int = field(64, help="NF4 block size when quantizing (bitsandbytes' default 64)", check=at_least(1))
    double_quant: bool = field(True, help="quantize the NF4 block scales too (bitsandbytes' compress_statistics)")
    lora_dtype: Literal["float32", "bfloat16", "float16"] = field(
        "float32", help="dtype of the LoRA parameters (the math runs in the activations' dtype)"
    )
    init_lora_weights: Literal["default", "gaussian", "random"] = field(
        "default", help="LoRA init: default = PEFT's (A Kaiming-uniform, B zero); random: B random too (tests)"
    )
    attention: Literal["sdpa", "sdpa_cudnn", "flex", "eager", "keep"] = field(
        "sdpa",
        help="attention backend: sdpa, sdpa_cudnn (SDPA trying cuDNN's kernel first: fastest on H100), flex "
        "(quickloris' FlexAttention with document masks, sliding windows and softcapping; used instead of sdpa for "
        "Gemma-2, whose attention softcap SDPA cannot apply), eager, keep",
    )
    chunked_loss: bool = field(True, help="compute the training loss without materialising [tokens, vocab] logits")
    train_vision: bool = field(
        False,
        help="vision-language models: LoRA also on the vision tower's and projector's linears (over their frozen "
        "16-bit weights); off: they stay frozen",
    )

    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)


def check_architecture(model: Any) -> FamilySpec:
    """The family of `model`; raises unless it is a plain transformers model quickloris can prepare."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        raise TypeError(
            "pass the plain transformers model, not a PEFT model: quickloris adds its own LoRA layers "
            "(load existing PEFT adapters with prepare_model(model, adapter=folder))"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a transformers model, got {type(model).__name__}; {supported_line()}")
    spec = family_of(model)
    spec.layers_of(model)  # raises if the decoder layers are not where the spec says
    return spec


def is_classifier(model: nn.Module, spec: FamilySpec) -> bool:
    """Whether `model` is the family's *ForSequenceClassification (else its *ForCausalLM)."""
    return bool(spec.sequence_classification) and any(
        k.__name__ == spec.sequence_classification for k in type(surgery.unwrap(model)).__mro__
    )


def resolve_targets(spec: FamilySpec, targets: list[str]) -> list[str]:
    """`targets` (``--target-modules``) in the names of `spec`'s decoder linears.

    ``all-linear`` stays. The default list (`DEFAULT_TARGETS`, in any order) means every decoder linear: the
    family's `FamilySpec.default_targets` (Phi-3: ``qkv_proj, o_proj, gate_up_proj, down_proj``; the generic
    path: ``all-linear``). On a family with fused projections, naming every part of a fused layer (``q_proj,
    k_proj, v_proj``) means the fused layer (``qkv_proj``); naming only some is refused, since LoRA adapts the
    fused weight as a whole. Other names must be linears of the family (unknown for a config-only generic spec:
    then checked when the model is prepared). Errors are `ConfigError`s of ``target_modules``.
    """
    targets = list(dict.fromkeys(targets))
    if targets == ["all-linear"]:
        return targets
    if "all-linear" in targets:
        raise ConfigError(QLoRAConfig, "target_modules", f"={','.join(targets)}: all-linear stands alone")
    if sorted(targets) == sorted(DEFAULT_TARGETS):
        return list(spec.default_targets()) if spec.registered else ["all-linear"]
    for fused, parts in spec.fused.items():
        named = [p for p in parts if p in targets]
        if named and len(named) < len(parts):
            raise ConfigError(
                QLoRAConfig,
                "target_modules",
                f"names {','.join(named)}, but {spec.causal_lm} "
                f"computes {','.join(parts)} in one fused layer, {fused} (LoRA adapts the fused "
                f"weight): name {fused} instead",
            )
        if named:
            at = min(targets.index(p) for p in named)  # where the first part was named
            targets = [t for t in targets if t not in parts]
            targets.insert(at, fused)
    if spec.linears:
        unknown = [t for t in targets if t not in spec.linears]
        if unknown:
            raise ConfigError(
                QLoRAConfig,
                "target_modules",
                f"names {', '.join(unknown)}, not a linear layer of this "
                f"model's decoder ({','.join(spec.linears)}, or all-linear)",
            )
    return targets


def _is_4bit(module: nn.Module) -> bool:
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None or isinstance(
        getattr(module, "weight", None), NF4Tensor
    )


def _linear_kind(module: nn.Module) -> str | None:
    if isinstance(module, QLoRALinear):
        return "qlora"
    if _is_4bit(module):  # bitsandbytes Linear4bit, or a Linear holding an NF4Tensor (pre-quantized folders)
        return "4bit"
    if type(module) is nn.Linear:
        return "dense"
    cls = type(module).__name__
    if "Linear" in cls and hasattr(module, "weight"):  # bitsandbytes 8-bit, other quantizers: refuse clearly
        return "other"
    return None


def _nf4_of(module: nn.Module, cfg: QLoRAConfig, name: str) -> NF4Tensor:
    weight = module.weight
    if isinstance(weight, NF4Tensor):
        return weight
    qs = getattr(weight, "quant_state", None)
    if qs is not None:
        if getattr(qs, "quant_type", None) != "nf4":
            raise ValueError(
                f"{name}: only NF4 4-bit weights are supported, got quant_type={getattr(qs, 'quant_type', None)!r}"
            )
        return NF4Tensor.from_bnb(weight)
    return NF4Tensor.from_float(weight.detach(), blocksize=cfg.blocksize, double_quant=cfg.double_quant)


def _init_arg(cfg: QLoRAConfig) -> bool | str:
    return {"default": True, "gaussian": "gaussian", "random": False}[cfg.init_lora_weights]


def replace_linears(model: nn.Module, cfg: QLoRAConfig, spec: FamilySpec | None = None) -> dict[str, QLoRALinear]:
    """Swap the decoder layers' linears for `QLoRALinear`s; returns them by module path (LoRA ones only).

    `cfg.target_modules` are names as `resolve_targets` gives them (the family's names, or all-linear)."""
    spec = spec or family_of(model)
    prefix = spec.layers_path(model)
    targets = set(cfg.target_modules)
    all_linear = targets == {"all-linear"}
    found: dict[str, QLoRALinear] = {}
    seen_targets: set[str] = set()
    lora = dict(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        use_rslora=cfg.use_rslora,
        lora_dtype=_DTYPES[cfg.lora_dtype],
        init_lora_weights=_init_arg(cfg),
    )
    plan: list[tuple[nn.Module, str, str, nn.Module, bool]] = []
    for path, module in spec.layers_of(model).named_modules():
        for child_name, child in module.named_children():
            kind = _linear_kind(child)
            if kind is None:
                continue
            full = f"{prefix}.{path + '.' if path else ''}{child_name}"
            is_target = all_linear or child_name in targets
            if kind == "qlora":
                raise ValueError(f"{full} is already a QLoRALinear: the model was prepared already")
            if kind == "other":
                raise TypeError(
                    f"{full} is a {type(child).__name__}: only 16-bit nn.Linear and bitsandbytes NF4 "
                    "Linear4bit layers are supported"
                )
            if is_target:
                seen_targets.add(child_name)
                if kind == "dense" and not cfg.quantize:
                    raise ValueError(
                        f"{full} holds 16-bit weights but quantize=False requires a model with 4-bit "
                        "weights (load it with BitsAndBytesConfig(load_in_4bit=True, "
                        "bnb_4bit_quant_type='nf4'), or set quantize=True)"
                    )
                plan.append((module, child_name, full, child, True))
            elif kind == "4bit" or cfg.quantize:  # the whole decoder is 4-bit, as a bitsandbytes load makes it
                plan.append((module, child_name, full, child, False))
    missing = targets - seen_targets - {"all-linear"}
    if missing:
        raise ValueError(f"target_modules {sorted(missing)} match no linear layer of the decoder")
    if not plan or not any(t for *_, t in plan):
        raise ValueError("no decoder linear layer matches target_modules")
    dense = [_linear_kind(child) == "dense" for *_, child, _ in plan]
    with progress(total=sum(dense), desc="NF4 quantize", unit="layer", enabled=None if any(dense) else False) as bar:
        for (parent, child_name, full, child, is_target), quantized in zip(plan, dense):
            nf4 = _nf4_of(child, cfg, full)
            bias = child.bias.detach() if getattr(child, "bias", None) is not None else None
            new = QLoRALinear(nf4, bias, **(lora if is_target else dict(r=0)))
            setattr(parent, child_name, new)
            if is_target:
                found[full] = new
            bar.update(int(quantized))
    return found


def head_is_plain(model: nn.Module, spec: FamilySpec) -> bool:
    """Whether `model`'s logits are ``head(h)`` (capped by the spec's final softcap) with ``h`` the decoder's last
    hidden state and ``head`` a plain nn.Linear: what the chunked loss computes. Checked by one no-grad forward
    of 4 tokens (the generic path: a family may scale its logits after the head, as Granite does)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return False
    seen: dict[str, torch.Tensor] = {}

    def keep(key: str, value: torch.Tensor) -> None:  # a hook returning a value would replace the output
        seen.setdefault(key, value)

    hooks = [
        head.register_forward_hook(lambda m, i, o: keep("x", i[0])),
        spec.decoder(model).register_forward_hook(lambda m, i, o: keep("h", o[0])),
    ]
    ids = (torch.arange(4, device=head.weight.device) % head.weight.shape[0]).view(1, 4)
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    except Exception:  # a forward that needs more than token ids: not one the chunked loss can stand in for
        return False
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    x, h = seen.get("x"), seen.get("h")
    if x is None or h is None or x.shape != h.shape or not torch.equal(x, h):
        return False
    with torch.no_grad():
        z = torch.nn.functional.linear(x, head.weight, head.bias)
        cap = spec.logit_softcap(model.config)
        if cap is not None:
            z = torch.tanh(z / cap) * cap
    return z.shape == logits.shape and torch.allclose(z.float(), logits.float(), rtol=1e-5, atol=0)


def _attention_choice(model: nn.Module, spec: FamilySpec, wanted: str, notes: list[str]) -> str:
    """The backend to set: `wanted`, unless the family cannot take it (see the module docstring)."""
    if wanted == "keep":
        return wanted
    if not spec.fast_path and wanted == "flex":
        wanted = "sdpa"
    if not getattr(spec, "flex", True) and wanted == "flex":  # a VLM family flex cannot express (Mllama)
        notes.append(f"flex attention cannot express {spec.name}'s cross-attention masks: attention='sdpa' is used")
        wanted = "sdpa"
    if wanted in ("sdpa", "sdpa_cudnn") and not getattr(model, "_supports_sdpa", True):
        wanted = "eager"
    softcap = spec.attention_softcap(model.config)
    if softcap is not None and wanted in ("sdpa", "sdpa_cudnn"):
        notes.append(
            f"its attention caps scores at {spec.attention.logit_softcap}={softcap:g}, which SDPA cannot "
            "apply: attention='flex' is used instead"
        )
        wanted = "flex"
    return wanted


def prepare_model(
    model: nn.Module, config: QLoRAConfig | None = None, *, adapter: str | None = None, **overrides: Any
) -> nn.Module:
    """Turn `model` into a QLoRA model in place (see the module docstring); returns it.

    `adapter`: a PEFT LoRA adapter folder to start from: its rank, alpha, dropout, rsLoRA and targets become the
    config (explicit `overrides` must agree) and its weights are loaded. Every change is recorded in
    ``model.quickloris_edits`` (`quickloris.models.surgery`).
    """
    if isinstance(model, nn.Module) and surgery.applied(model, STEP):
        raise ValueError("this model was already prepared by quickloris.prepare_model")
    spec = check_architecture(model)
    cfg = config or QLoRAConfig()
    if adapter is not None:
        cfg = config_from_adapter(adapter, cfg)
        if getattr(spec, "vision_modules", None) is not None:
            cfg = _vision_from_adapter(model, spec, adapter, cfg)
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    cfg = dataclasses.replace(cfg, target_modules=resolve_targets(spec, cfg.target_modules))
    classifier = is_classifier(model, spec)
    layers = replace_linears(model, cfg, spec)
    # ---- vision-language models (quickloris.models.vision): vision tower frozen / LoRA, Mllama's image rows ----
    if getattr(spec, "vision_modules", None) is not None:
        from quickloris.models.vision import prepare_vision

        prepare_vision(model, spec, cfg, lora_dtype=_DTYPES[cfg.lora_dtype], init=_init_arg(cfg))
    elif cfg.train_vision:
        raise ConfigError(QLoRAConfig, "train_vision", f"needs a vision-language model; {type(model).__name__} is not")
    # ----
    surgery.record(
        model,
        STEP,
        f"model.{spec.layers_path(model)}.*",
        f"decoder linears -> QLoRALinear: NF4 base, "
        f"LoRA r={cfg.r} on {len(layers)} ({','.join(cfg.target_modules)}); the 16-bit weights are dropped",
    )
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    surgery.record(model, STEP, "model.parameters()", "frozen but the LoRA matrices")
    if getattr(model, "hf_quantizer", None) is not None:  # every bitsandbytes layer is now a quickloris NF4 layer
        surgery.set_attribute(
            model, STEP, model, "hf_quantizer", None, "bitsandbytes quantizer handle dropped", path="model"
        )
    surgery.set_attribute(model, STEP, model.config, "use_cache", False, "no KV cache in training", path="model.config")
    surgery.set_state(model, STEP, cfg)
    surgery.set_state(model, FAMILY, spec)
    notes: list[str] = []
    loss = "its own loss" if classifier else "the chunked loss"
    if classifier:  # trainable score head + pooled classification loss (no vocabulary head)
        from quickloris.models.classification import enable_classification

        enable_classification(model, head_dtype=_DTYPES[cfg.lora_dtype])
        loss = "the pooled classification loss"
    elif cfg.chunked_loss:
        if spec.fast_path or head_is_plain(model, spec):
            from quickloris.models.chunked_loss import enable_chunked_loss

            enable_chunked_loss(model, grad_in_forward=True)
        else:
            loss = "its own loss (its logits are not a plain linear head of the last hidden state)"
    attention = _attention_choice(model, spec, cfg.attention, notes)
    if attention != "keep":
        from quickloris.models.attention import set_attention

        set_attention(model, attention)
    if not spec.fast_path:
        notes.insert(
            0,
            f"not a registered family: generic path (NF4 + LoRA on its decoder linears "
            f"{','.join(spec.linears)}; {attention} attention; {loss}); the fast path (regional compile, "
            "flex attention, compiled loss) is off",
        )
    surgery.set_attribute(
        model,
        STEP,
        model,
        "save_pretrained",
        types.MethodType(adapters_mod.save_pretrained, model),
        "writes the LoRA adapter (PEFT format), not the model",
        path="model",
    )
    if adapter is not None:
        adapters_mod.load_adapter(model, adapter)
    if notes:
        warn(f"{type(model).__name__}: {'; '.join(notes)}")
    return model


def config_from_adapter(folder, base: QLoRAConfig | None = None) -> QLoRAConfig:
    """A `QLoRAConfig` with the adapter folder's rank, alpha, dropout, rsLoRA and target layers."""
    cfg = adapters_mod.read_adapter_config(folder)
    targets = cfg["target_modules"]
    targets = ["all-linear"] if targets == "all-linear" else sorted(targets)
    return dataclasses.replace(
        base or QLoRAConfig(),
        r=int(cfg["r"]),
        lora_alpha=float(cfg["lora_alpha"]),
        lora_dropout=float(cfg.get("lora_dropout", 0.0)),
        use_rslora=bool(cfg.get("use_rslora", False)),
        target_modules=targets,
    )


def _vision_from_adapter(model: nn.Module, spec: FamilySpec, folder, cfg: QLoRAConfig) -> QLoRAConfig:
    """A VLM adapter with LoRA tensors under the vision tower or projector was trained with --train-vision: the config
    gets ``train_vision`` and keeps the decoder's target names (PEFT's one target list also names the vision linears,
    e.g. CLIP's ``out_proj`` / ``fc1``, which are not decoder linears)."""
    from safetensors import safe_open

    weights = os.path.join(os.fspath(folder), adapters_mod.WEIGHTS_NAME)
    if not os.path.isfile(weights):
        return cfg  # load_adapter says what is missing
    with safe_open(weights, framework="pt") as f:
        keys = list(f.keys())
    parts = [f"{adapters_mod.PREFIX}{path}." for path in spec.vision_parts(surgery.unwrap(model))]
    if not any(k.startswith(tuple(parts)) for k in keys):
        return cfg
    targets = cfg.target_modules
    if targets != ["all-linear"] and spec.linears:
        targets = [t for t in targets if t in spec.linears]
    return dataclasses.replace(cfg, train_vision=True, target_modules=targets)


def qlora_config(model: nn.Module) -> QLoRAConfig:
    """The config `model` was prepared with (ValueError if it was not prepared)."""
    cfg = surgery.state(model, STEP)
    if cfg is None:
        raise ValueError(f"{type(model).__name__} was not prepared by quickloris.prepare_model")
    return cfg


def is_prepared(model: nn.Module) -> bool:
    return surgery.state(model, STEP) is not None


def prepared_family(model: nn.Module) -> FamilySpec | None:
    """The family spec `prepare_model` found for `model` (None: not prepared)."""
    return surgery.state(model, FAMILY)
