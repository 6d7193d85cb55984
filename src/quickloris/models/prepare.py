"""Make a Hugging Face causal LM ready for QLoRA training: NF4 base weights, LoRA adapters, chunked loss.

`prepare_model(model, QLoRAConfig(...))` changes that one model object through explicit calls (no class is
patched):

1. Checks the architecture (`SUPPORTED_ARCHITECTURES`; anything else raises listing them).
2. Replaces every decoder linear layer named in ``target_modules`` by a `QLoRALinear` (NF4 base + LoRA), and
   every other decoder linear by a `QLoRALinear` without adapter (the whole decoder is 4-bit, as after a
   bitsandbytes 4-bit load; lm_head and embeddings stay 16-bit and frozen). The NF4 base comes from
   * a bitsandbytes ``Linear4bit`` (a model loaded with ``BitsAndBytesConfig(load_in_4bit=True, nf4)``): its bytes
     are wrapped, not copied or re-quantized (`NF4Tensor.from_bnb`);
   * a 16-bit ``nn.Linear``: quantized now, bit-exactly as bitsandbytes would on that device (``quantize=True``;
     with ``quantize=False`` a 16-bit target raises, for callers that require a 4-bit model);
   * a pre-quantized ``*-bnb-4bit`` folder: `quickloris.models.prequantized.load_bnb_4bit_model` puts its NF4
     tensors into a model built on the meta device, then `prepare_model` wraps them like bitsandbytes weights.
3. Freezes everything but the LoRA matrices (and a sequence classifier's score head:
   `quickloris.models.classification`); the bitsandbytes quantizer handle (``model.hf_quantizer``) is
   dropped, since no bitsandbytes layer is left (HF ``Trainer`` then sees a model with trainable adapters).
4. Computes the training loss chunked (`quickloris.models.chunked_loss`: no [tokens, vocab] logits), gradient
   in forward (one head matmul fewer; the head is frozen).
5. Sets the attention backend (`quickloris.models.attention`: ``sdpa``, ``sdpa_cudnn`` or ``flex``) and ``use_cache=False``.
6. Gives the object a ``save_pretrained`` that writes the adapter in PEFT's format
   (`quickloris.models.adapters`), so ``Trainer.save_model`` and checkpoints produce PEFT adapter folders.

Every change is made through `quickloris.models.surgery` and listed in ``model.quickloris_edits``.

Checkpointing and compilation come after, in `quickloris.parallel.compose` (quantize/LoRA -> checkpointing ->
compile).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Literal

import torch
from torch import nn

from quickloris.config import Config, at_least, comma_list, field, in_range
from quickloris.models import adapters as adapters_mod, surgery
from quickloris.nn.qlora_linear import QLoRALinear, lora_scaling
from quickloris.tensor.nf4_tensor import NF4Tensor

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEP = "prepare"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _targets(names: list[str]) -> str | None:
    if not names:
        return "must name at least one layer"
    if "lm_head" in names or "embed_tokens" in names:
        return f"got {names}: LoRA on lm_head / embed_tokens is not supported; target decoder linears such as " \
               f"{','.join(DEFAULT_TARGETS)}"
    return None


@dataclasses.dataclass
class QLoRAConfig(Config):
    """How `prepare_model` turns a causal LM into a QLoRA model (LoRA fields mean what PEFT's LoraConfig's do)."""

    r: int = field(16, help="LoRA rank", check=at_least(1))
    lora_alpha: float = field(32.0, help="LoRA alpha: updates are scaled by alpha / r (alpha / sqrt(r) with rsLoRA)",
                              check=in_range(0.0, low_open=True))
    lora_dropout: float = field(0.0, help="dropout probability on the input of the LoRA branch (training only)",
                                check=in_range(0.0, 1.0, high_open=True))
    use_rslora: bool = field(False, help="rank-stabilised LoRA: scale by alpha / sqrt(r)")
    target_modules: list[str] = field(list(DEFAULT_TARGETS), help="names of the decoder linear layers that get LoRA "
                                      "(comma-separated), or all-linear", convert=comma_list(), check=_targets)
    quantize: bool = field(True, help="quantize 16-bit target layers to NF4; with --no-quantize the model must "
                           "already hold 4-bit (bitsandbytes NF4) weights")
    blocksize: int = field(64, help="NF4 block size when quantizing (bitsandbytes' default 64)", check=at_least(1))
    double_quant: bool = field(True, help="quantize the NF4 block scales too (bitsandbytes' compress_statistics)")
    lora_dtype: Literal["float32", "bfloat16", "float16"] = field(
        "float32", help="dtype of the LoRA parameters (the math runs in the activations' dtype)")
    init_lora_weights: Literal["default", "gaussian", "random"] = field(
        "default", help="LoRA init: default = PEFT's (A Kaiming-uniform, B zero); random: B random too (tests)")
    attention: Literal["sdpa", "sdpa_cudnn", "flex", "eager", "keep"] = field(
        "sdpa", help="attention backend: sdpa, sdpa_cudnn (SDPA trying cuDNN's kernel first: fastest on H100), flex "
        "(quickloris' FlexAttention with document masks), eager, keep")
    chunked_loss: bool = field(True, help="compute the training loss without materialising [tokens, vocab] logits")

    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)


def check_architecture(model: Any) -> None:
    """Raise unless `model` is a plain transformers causal LM of a supported architecture."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        raise TypeError("pass the plain transformers model, not a PEFT model: quickloris adds its own LoRA layers "
                        "(load existing PEFT adapters with prepare_model(model, adapter=folder))")
    name = type(model).__name__
    # A sequence classifier of a supported family (its decoder is the causal LM's; the family registry replaces this).
    if name.replace("ForSequenceClassification", "ForCausalLM") not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {name}: quickloris supports {', '.join(SUPPORTED_ARCHITECTURES)}"
                         " and their *ForSequenceClassification")
    if not isinstance(getattr(model, "model", None), nn.Module) or not hasattr(model.model, "layers"):
        raise TypeError(f"{name} has no decoder at model.model.layers")


def _is_4bit(module: nn.Module) -> bool:
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None or isinstance(
        getattr(module, "weight", None), NF4Tensor)


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
            raise ValueError(f"{name}: only NF4 4-bit weights are supported, got quant_type="
                             f"{getattr(qs, 'quant_type', None)!r}")
        return NF4Tensor.from_bnb(weight)
    return NF4Tensor.from_float(weight.detach(), blocksize=cfg.blocksize, double_quant=cfg.double_quant)


def _init_arg(cfg: QLoRAConfig) -> bool | str:
    return {"default": True, "gaussian": "gaussian", "random": False}[cfg.init_lora_weights]


def replace_linears(model: nn.Module, cfg: QLoRAConfig) -> dict[str, QLoRALinear]:
    """Swap the decoder's linear layers for `QLoRALinear`s; returns them by module path (LoRA ones only)."""
    decoder = model.model
    targets = set(cfg.target_modules)
    all_linear = targets == {"all-linear"}
    found: dict[str, QLoRALinear] = {}
    seen_targets: set[str] = set()
    lora = dict(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora,
                lora_dtype=_DTYPES[cfg.lora_dtype], init_lora_weights=_init_arg(cfg))
    plan: list[tuple[nn.Module, str, str, nn.Module, bool]] = []
    for path, module in decoder.named_modules():
        for child_name, child in module.named_children():
            kind = _linear_kind(child)
            if kind is None:
                continue
            full = f"model.{path + '.' if path else ''}{child_name}"
            is_target = all_linear or child_name in targets
            if kind == "qlora":
                raise ValueError(f"{full} is already a QLoRALinear: the model was prepared already")
            if kind == "other":
                raise TypeError(f"{full} is a {type(child).__name__}: only 16-bit nn.Linear and bitsandbytes NF4 "
                                "Linear4bit layers are supported")
            if is_target:
                seen_targets.add(child_name)
                if kind == "dense" and not cfg.quantize:
                    raise ValueError(f"{full} holds 16-bit weights but quantize=False requires a model with 4-bit "
                                     "weights (load it with BitsAndBytesConfig(load_in_4bit=True, "
                                     "bnb_4bit_quant_type='nf4'), or set quantize=True)")
                plan.append((module, child_name, full, child, True))
            elif kind == "4bit" or cfg.quantize:  # the whole decoder is 4-bit, as a bitsandbytes load makes it
                plan.append((module, child_name, full, child, False))
    missing = targets - seen_targets - {"all-linear"}
    if missing:
        raise ValueError(f"target_modules {sorted(missing)} match no linear layer of the decoder")
    if not plan or not any(t for *_, t in plan):
        raise ValueError("no decoder linear layer matches target_modules")
    for parent, child_name, full, child, is_target in plan:
        nf4 = _nf4_of(child, cfg, full)
        bias = child.bias.detach() if getattr(child, "bias", None) is not None else None
        new = QLoRALinear(nf4, bias, **(lora if is_target else dict(r=0)))
        setattr(parent, child_name, new)
        if is_target:
            found[full] = new
    return found


def prepare_model(model: nn.Module, config: QLoRAConfig | None = None, *, adapter: str | None = None,
                  **overrides: Any) -> nn.Module:
    """Turn `model` into a QLoRA model in place (see the module docstring); returns it.

    `adapter`: a PEFT LoRA adapter folder to start from: its rank, alpha, dropout, rsLoRA and targets become the
    config (explicit `overrides` must agree) and its weights are loaded. Every change is recorded in
    ``model.quickloris_edits`` (`quickloris.models.surgery`).
    """
    check_architecture(model)
    if surgery.applied(model, STEP):
        raise ValueError("this model was already prepared by quickloris.prepare_model")
    cfg = config or QLoRAConfig()
    if adapter is not None:
        cfg = config_from_adapter(adapter, cfg)
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    layers = replace_linears(model, cfg)
    surgery.record(model, STEP, "model.model.*", f"decoder linears -> QLoRALinear: NF4 base, LoRA r={cfg.r} on "
                   f"{len(layers)} ({','.join(cfg.target_modules)}); the 16-bit weights are dropped")
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    surgery.record(model, STEP, "model.parameters()", "frozen but the LoRA matrices")
    if getattr(model, "hf_quantizer", None) is not None:  # every bitsandbytes layer is now a quickloris NF4 layer
        surgery.set_attribute(model, STEP, model, "hf_quantizer", None, "bitsandbytes quantizer handle dropped",
                              path="model")
    surgery.set_attribute(model, STEP, model.config, "use_cache", False, "no KV cache in training",
                          path="model.config")
    surgery.set_state(model, STEP, cfg)
    from quickloris.models.classification import enable_classification, is_sequence_classifier

    if is_sequence_classifier(model):  # trainable score head + pooled classification loss (no vocabulary head)
        enable_classification(model, head_dtype=_DTYPES[cfg.lora_dtype])
    elif cfg.chunked_loss:
        from quickloris.models.chunked_loss import enable_chunked_loss

        enable_chunked_loss(model, grad_in_forward=True)
    if cfg.attention != "keep":
        from quickloris.models.attention import set_attention

        set_attention(model, cfg.attention)
    surgery.set_attribute(model, STEP, model, "save_pretrained", types.MethodType(adapters_mod.save_pretrained, model),
                          "writes the LoRA adapter (PEFT format), not the model", path="model")
    if adapter is not None:
        adapters_mod.load_adapter(model, adapter)
    return model


def config_from_adapter(folder, base: QLoRAConfig | None = None) -> QLoRAConfig:
    """A `QLoRAConfig` with the adapter folder's rank, alpha, dropout, rsLoRA and target layers."""
    cfg = adapters_mod.read_adapter_config(folder)
    targets = cfg["target_modules"]
    targets = ["all-linear"] if targets == "all-linear" else sorted(targets)
    return dataclasses.replace(base or QLoRAConfig(), r=int(cfg["r"]), lora_alpha=float(cfg["lora_alpha"]),
                               lora_dropout=float(cfg.get("lora_dropout", 0.0)),
                               use_rslora=bool(cfg.get("use_rslora", False)), target_modules=targets)


def qlora_config(model: nn.Module) -> QLoRAConfig:
    """The config `model` was prepared with (ValueError if it was not prepared)."""
    cfg = surgery.state(model, STEP)
    if cfg is None:
        raise ValueError(f"{type(model).__name__} was not prepared by quickloris.prepare_model")
    return cfg


def is_prepared(model: nn.Module) -> bool:
    return surgery.state(model, STEP) is not None
