"""Base weights and LoRA adapters -> merged float32 weights, one tensor at a time.

For a LoRA adapter on a linear layer with A [r, in], B [out, r]:

    W' = W + s * (B @ A),   s = alpha / r   (rsLoRA: s = alpha / sqrt(r))

and on an embedding (A [r, vocab], B [dim, r]): E' = E + s * (B @ A)^T. Everything is computed in
float32 on copies: the caller's model is never modified (PEFT's merge_and_unload would change it in
place and, for a 4-bit base, re-quantize the result). NF4 base weights (bitsandbytes Params4bit)
are dequantized first by `dequantize_base_weight`.

Adapters come attached (a PEFT `PeftModel`, or a quickloris model from `prepare_model`, whose
`QLoRALinear` layers hold an `NF4Tensor` base and PEFT-style lora_A / lora_B) or as a PEFT folder
(`adapter_config.json` + `adapter_model.safetensors`); `modules_to_save` copies and saved embedding
layers replace the base weights they stand for.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from quickloris.nn.qlora_linear import lora_scaling


@dataclass
class LoraDelta:
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    embedding: bool = False

    def delta(self) -> torch.Tensor:
        d = self.b.detach().float() @ self.a.detach().float()
        return (d.T if self.embedding else d) * self.scale


@dataclass
class AdapterPlan:
    """What to add to (deltas, by module path) or put in place of (replacements, by parameter name) the base."""

    deltas: dict[str, list[LoraDelta]] = field(default_factory=dict)
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)

    def touches(self, param_name: str) -> bool:
        module = param_name.rsplit(".", 1)[0]
        return param_name in self.replacements or (param_name.endswith(".weight") and module in self.deltas)


def dequantize_base_weight(param: torch.Tensor) -> torch.Tensor:
    """A base weight as a new float32 tensor (bitsandbytes NF4/FP4 weights are dequantized).

    Kept small on purpose: the bitsandbytes call is swapped for quickloris' own NF4 reference
    (`quickloris.quant.nf4`) once that lands.
    """
    if _is_nf4_tensor(param):  # quickloris' NF4Tensor (prepare_model): bitsandbytes' bytes, own reference decode
        from quickloris.quant.nf4 import dequantize_nf4_reference

        packed, state = param.nf4_components()
        return dequantize_nf4_reference(packed, state, dtype=torch.float32).to("cpu")
    state = getattr(param, "quant_state", None)
    if state is not None:
        if getattr(state, "packing_format_for_cpu", False):
            return _dequantize_bnb_cpu_packed(param.data, state)
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(param.data, state).to(device="cpu", dtype=torch.float32)
    if param.dtype in (torch.int8, torch.uint8):
        raise ValueError(f"8-bit base weights (dtype {param.dtype}) are not supported by the GGUF export")
    return param.detach().to(device="cpu", dtype=torch.float32, copy=True)


def _is_nf4_tensor(param: Any) -> bool:
    return type(param).__name__ == "NF4Tensor" and hasattr(param, "nf4_components")


def _dequantize_bnb_cpu_packed(packed: torch.Tensor, state: Any) -> torch.Tensor:
    """Decode bitsandbytes' CPU-kernel layout without touching the model.

    On CPUs with AVX512-BF16, bitsandbytes (>= 0.49) repacks a Linear4bit weight in place on its first
    eval-mode forward: 4-bit codes regrouped in tiles of 32 output rows ([N, K/2] bytes, each 64-code
    group stored as 32 low + 32 high nibbles) and absmax dequantized, rounded to bf16 and transposed to
    [K / blocksize, N]. The weight the model computes with from then on is code[q] * absmax_bf16,
    which is what we return (its own inverse would re-quantize absmax in place).
    """
    n, k_half = packed.shape
    k, tile = 2 * k_half, 32
    nibbles = packed.reshape(-1, 32)
    codes = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1)  # [N/32 * K/2, 64]
    codes = codes.reshape(n // tile, k_half, tile, 2).transpose(1, 2).reshape(n, k)
    absmax = state.absmax.to(torch.float32).T  # [N, K / blocksize]
    values = state.code.to(torch.float32)[codes.long()] * absmax.repeat_interleave(state.blocksize, dim=1)
    return values.to(getattr(state, "original_dtype", torch.float32)).to(torch.float32).reshape(tuple(state.shape))


def weight_shape(param: torch.Tensor) -> tuple[int, ...]:
    if _is_nf4_tensor(param):
        return tuple(param.shape)
    state = getattr(param, "quant_state", None)
    return tuple(state.shape) if state is not None else tuple(param.shape)


def _is_peft_model(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


# Name segments added by wrappers (torch.compile, activation checkpointing, FSDP) that HF names lack.
_WRAPPER_PARTS = {"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"}


def _plain(name: str) -> str:
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)


def base_parameters(model: Any) -> dict[str, torch.Tensor]:
    """Parameters of `model` under their plain HF names (PEFT wrappers removed), tied ones included.

    `.base_layer` is dropped, LoRA matrices skipped, and a `modules_to_save` wrapper contributes its
    active trained copy instead of the original module.
    """
    out: dict[str, torch.Tensor] = {}
    saved: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        parts = _plain(name).split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        for wrapped in ("modules_to_save", "original_module"):
            if wrapped in parts:
                i = parts.index(wrapped)
                raw = name.split(".")
                wrapper = model.get_submodule(".".join(raw[: raw.index(wrapped)]))
                use_copy = not wrapper.disable_adapters and bool(_active_adapters(wrapper))
                if wrapped == "original_module" and not use_copy:
                    saved[".".join(parts[:i] + parts[i + 1 :])] = param
                elif wrapped == "modules_to_save" and use_copy and parts[i + 1] == _active_adapters(wrapper)[0]:
                    saved[".".join(parts[:i] + parts[i + 2 :])] = param
                break
        else:
            out[".".join(p for p in parts if p != "base_layer")] = param
    out.update(saved)
    return out


def _active_adapters(module: Any) -> list[str]:
    active = getattr(module, "active_adapters", None) or getattr(module, "active_adapter", None) or []
    return [active] if isinstance(active, str) else list(active)


def plan_from_peft_model(model: Any) -> AdapterPlan:
    """LoRA deltas of the active adapters attached to a PeftModel."""
    from peft.tuners.lora import LoraLayer

    plan = AdapterPlan()
    for name, module in model.get_base_model().named_modules():
        if not isinstance(module, LoraLayer) or module.disable_adapters:
            continue
        for adapter in _active_adapters(module):
            if getattr(module, "merged", False):
                continue  # the base weight already contains this adapter
            if module.use_dora.get(adapter, False):
                raise ValueError(f"{name}: DoRA adapters are not supported by the GGUF export")
            if getattr(module, "lora_bias", {}).get(adapter, False):
                raise ValueError(f"{name}: LoRA bias adapters are not supported by the GGUF export")
            if getattr(module, "fan_in_fan_out", False):
                raise ValueError(f"{name}: fan_in_fan_out (Conv1D) adapters do not occur in Llama-family models")
            scale = module.scaling[adapter]
            if adapter in module.lora_A:
                d = LoraDelta(module.lora_A[adapter].weight, module.lora_B[adapter].weight, scale)
            elif adapter in getattr(module, "lora_embedding_A", {}):
                d = LoraDelta(module.lora_embedding_A[adapter], module.lora_embedding_B[adapter], scale, embedding=True)
            else:
                continue
            plan.deltas.setdefault(_plain(name), []).append(d)
    return plan


def plan_from_qlora_layers(model: Any) -> AdapterPlan:
    """LoRA deltas of quickloris `QLoRALinear` layers (models from `quickloris.prepare_model`)."""
    plan = AdapterPlan()
    for name, module in model.named_modules():
        if type(module).__name__ == "QLoRALinear" and getattr(module, "r", 0) > 0:
            a, b = module.lora_weights
            plan.deltas[_plain(name)] = [LoraDelta(a, b, module.scaling)]
    return plan


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT's rule: a pattern key matches a module path that ends with it at a dot boundary.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def plan_from_folder(path: str | os.PathLike) -> AdapterPlan:
    """LoRA deltas and replacement weights stored in a PEFT adapter folder."""
    from safetensors.torch import load_file

    folder = os.fspath(path)
    cfg_path = os.path.join(folder, "adapter_config.json")
    weights_path = os.path.join(folder, "adapter_model.safetensors")
    for p in (cfg_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"adapter folder {folder!r} has no {os.path.basename(p)}")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter {folder!r} is {cfg.get('peft_type')}; only LoRA adapters can be merged")
    if cfg.get("task_type") == "SEQ_CLS":  # its score head has no place in a causal LM's GGUF file
        raise ValueError(
            f"adapter {folder!r} is a sequence classifier (task_type SEQ_CLS, with a trained score head); a GGUF "
            "file holds a causal language model: only causal-LM adapters can be exported"
        )
    for key, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA bias"), ("fan_in_fan_out", "fan_in_fan_out")):
        if cfg.get(key):
            raise ValueError(f"adapter {folder!r} uses {what}, which the GGUF export does not support")
    if cfg.get("trainable_token_indices") or cfg.get("target_parameters"):
        raise ValueError(f"adapter {folder!r} uses trainable tokens / target_parameters, not supported")
    tensors = load_file(weights_path)
    prefix = "base_model.model."
    plan = AdapterPlan()
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith(prefix):
            raise ValueError(f"unexpected key {key!r} in {weights_path}")
        key = key[len(prefix) :]
        m = re.match(r"^(.*)\.(lora_A|lora_B)\.weight$|^(.*)\.(lora_embedding_A|lora_embedding_B)$", key)
        if m:
            module, kind = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            lora.setdefault(module, {})[kind] = t
        elif ".lora_" in key:
            raise ValueError(f"unsupported adapter tensor {key!r} in {weights_path}")
        else:  # modules_to_save copies and saved (possibly resized) embedding layers
            plan.replacements[key.replace(".base_layer.", ".")] = t
    for module, parts in lora.items():
        emb = "lora_embedding_A" in parts
        kind_a, kind_b = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
        a, b = parts.get(kind_a), parts.get(kind_b)
        if a is None or b is None:
            raise ValueError(f"adapter module {module!r} lacks its A or B matrix")
        r = int(_pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"]))
        if r != a.shape[0]:
            raise ValueError(f"adapter module {module!r}: rank {a.shape[0]} in the weights, {r} in the config")
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"]))
        scale = lora_scaling(r, alpha, bool(cfg.get("use_rslora")))
        plan.deltas[module] = [LoraDelta(a, b, scale, embedding=emb)]
    return plan


def resolve(model: Any, adapter: str | os.PathLike | None) -> tuple[Any, dict[str, torch.Tensor], AdapterPlan]:
    """(HF base model, its plain-named parameters, adapter plan) for an HF or PEFT model."""
    if _is_peft_model(model):
        if adapter is not None:
            raise ValueError("pass either a PeftModel or an adapter folder, not both")
        return model.get_base_model(), base_parameters(model.get_base_model()), plan_from_peft_model(model)
    attached = plan_from_qlora_layers(model)
    if attached.deltas:
        if adapter is not None:
            raise ValueError("the model already carries quickloris LoRA layers; pass no adapter folder")
        return model, base_parameters(model), attached
    plan = plan_from_folder(adapter) if adapter is not None else AdapterPlan()
    return model, base_parameters(model), plan


def merged_weight(
    name: str,
    params: dict[str, torch.Tensor],
    plan: AdapterPlan,
    base_weight: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Parameter `name` with its replacement or LoRA deltas applied, as a new float32 CPU tensor.

    `base_weight(name, param)`: the float32 base weight to merge into (`quickloris.export.merge_base`); default
    the parameter as held (NF4 dequantized)."""
    base = plan.replacements.get(name)
    if base is not None:
        w = base.detach().to(device="cpu", dtype=torch.float32, copy=True)
    else:
        w = (base_weight or (lambda _, p: dequantize_base_weight(p)))(name, params[name])
    if name.endswith(".weight"):
        for d in plan.deltas.get(name[: -len(".weight")], []):
            delta = d.delta().to("cpu")  # computed where the adapter lives (a GPU, if the model is there)
            if delta.shape != w.shape:
                raise ValueError(f"LoRA delta for {name} has shape {tuple(delta.shape)}, weight {tuple(w.shape)}")
            w += delta
    return w
