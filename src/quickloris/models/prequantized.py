"""Load a pre-quantized ``*-bnb-4bit`` folder (bitsandbytes NF4 safetensors) without bitsandbytes.

The folder is a transformers model folder whose ``config.json`` has ``quantization_config.quant_method ==
"bitsandbytes"`` with ``load_in_4bit`` and NF4, and whose safetensors hold, per quantized linear weight ``W``:
``W`` (packed uint8), ``W.absmax``, ``W.quant_map``, ``W.nested_absmax``, ``W.nested_quant_map`` and
``W.quant_state.bitsandbytes__nf4`` (JSON: shape, dtype, blocksize, offset). `load_bnb_4bit_model`:

1. builds the architecture on the meta device (no weight memory);
2. turns each quantized linear's weight into an `NF4Tensor` read straight from those tensors
   (`quickloris.quant.nf4.state_from_checkpoint`: the bytes are used as stored, not re-quantized);
3. assigns every other tensor (embeddings, norms, lm_head, biases) as stored, casts them to `dtype`, ties
   tied weights and rebuilds the rotary tables (non-persistent buffers) on `device`.

The result holds `NF4Tensor` weights inside plain ``nn.Linear`` modules: `prepare_model` then wraps them as 4-bit
layers (LoRA on the targets), exactly as for a model bitsandbytes loaded. Without `prepare_model` such a model
cannot run (an NF4Tensor refuses ``F.linear``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from quickloris.tensor.nf4_tensor import NF4Tensor

_QS = ".quant_state.bitsandbytes__"


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{os.fspath(folder)!r} has no config.json")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") != "bitsandbytes" or not q.get("load_in_4bit"):
        raise ValueError(
            f"{path}: not a bitsandbytes 4-bit folder (quantization_config.quant_method="
            f"{q.get('quant_method')!r}, load_in_4bit={q.get('load_in_4bit')!r})"
        )
    if q.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise ValueError(f"{path}: bnb_4bit_quant_type={q.get('bnb_4bit_quant_type', 'fp4')!r}; only nf4 is supported")
    return cfg


def _load_tensors(folder: Path, device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{os.fspath(folder)!r} has no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(os.fspath(f), device=str(device)))
    return tensors


def load_bnb_4bit_model(
    folder: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """The causal LM of a ``*-bnb-4bit`` folder with `NF4Tensor` linear weights (see the module docstring).

    dtype: dtype of the dense parameters and of dequantized weights (default: the config's
    ``bnb_4bit_compute_dtype``, else its ``dtype``, else bfloat16).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    raw = _read_config(folder)
    q = raw["quantization_config"]
    if dtype is None:
        name = q.get("bnb_4bit_compute_dtype") or raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
        dtype = getattr(torch, str(name).removeprefix("torch."))
    config = AutoConfig.from_pretrained(os.fspath(folder))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the model built here is not a bitsandbytes model
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = _load_tensors(folder, device)
    used: set[str] = set()
    for path, module in model.named_modules():
        key = f"{path}.weight"
        if type(module) is not nn.Linear or not any(k.startswith(key + _QS) for k in tensors):
            continue
        nf4 = NF4Tensor.from_checkpoint(tensors, key)
        if tuple(nf4.shape) != (module.out_features, module.in_features):
            raise ValueError(
                f"{key}: quantized shape {tuple(nf4.shape)} does not match the architecture's "
                f"{(module.out_features, module.in_features)}"
            )
        module.weight = nn.Parameter(nf4 if nf4.dtype == dtype else nf4.to(dtype), requires_grad=False)
        used.update(k for k in tensors if k == key or k.startswith(key + "."))
    if not used:
        raise ValueError(f"{os.fspath(folder)!r} holds no bitsandbytes NF4 weight")
    dense = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items() if k not in used}
    result = model.load_state_dict(dense, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"{os.fspath(folder)!r} has tensors the architecture lacks, e.g. {result.unexpected_keys[:3]}")
    model.tie_weights()
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is not None:
        model.model.rotary_emb = type(rotary)(config=model.config).to(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ValueError(f"{os.fspath(folder)!r} lacks weights for {left[:5]}{' ...' if len(left) > 5 else ''}")
    return model.eval()


def save_bnb_4bit_folder(
    model: nn.Module, folder: str | os.PathLike, *, targets: tuple[str, ...] | None = None, blocksize: int = 64
) -> Path:
    """Write `model` (16-bit) as a ``*-bnb-4bit`` folder, decoder linears quantized to NF4 as bitsandbytes would.

    For tests and offline preparation (the hub's ``*-bnb-4bit`` repos have this layout). `targets`: linear layer
    names to quantize (default: every decoder linear).
    """
    from safetensors.torch import save

    from quickloris.utils.atomic import atomic_open

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    quantized: set[str] = set()
    for path, module in model.model.named_modules():
        if type(module) is nn.Linear and (targets is None or path.rsplit(".", 1)[-1] in targets):
            nf4 = NF4Tensor.from_float(module.weight.detach(), blocksize=blocksize)
            tensors.update(nf4.to_checkpoint(f"model.{path}.weight"))
            quantized.add(f"model.{path}.weight")
    for name, t in model.state_dict().items():
        if name not in quantized and name not in tensors:
            tensors[name] = t.detach().contiguous()
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    with atomic_open(out / "model.safetensors", "wb") as f:
        f.write(save(tensors, metadata={"format": "pt"}))
    model.config.to_json_file(os.fspath(out / "config.json.tmp"))
    cfg = json.loads((out / "config.json.tmp").read_text(encoding="utf-8"))
    (out / "config.json.tmp").unlink()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    cfg["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": dtype,
        "bnb_4bit_quant_storage": "uint8",
    }
    from quickloris.utils.atomic import atomic_write_text

    atomic_write_text(out / "config.json", json.dumps(cfg, indent=2) + "\n")
    return out
