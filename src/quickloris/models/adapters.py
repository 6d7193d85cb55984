"""LoRA adapters of a quickloris model in PEFT's on-disk format, both ways.

A folder holds ``adapter_config.json`` (PEFT's ``LoraConfig`` fields, written through PEFT's own class so the
installed PEFT reads it back) and ``adapter_model.safetensors`` with PEFT's key names: for the QLoRA layer at
module path ``model.layers.0.self_attn.q_proj``

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   [out, r]

(PEFT drops the adapter name, "default", when saving). Scaling semantics are PEFT's: the layer adds
``s * B @ A @ x`` with ``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``. So
``PeftModel.from_pretrained(hf_model_with_bnb_4bit, folder)`` computes what the quickloris model computed, and
`load_adapter` / ``prepare_model(model, adapter=folder)`` read adapters PEFT trained. Both files are written
atomically. Only what quickloris' layers express is accepted: plain LoRA (no DoRA, LoRA bias, per-layer rank or
alpha patterns, regex targets); anything else raises naming the field.

Modules trained whole (PEFT's ``modules_to_save``: a sequence classifier's ``score`` head, registered by
`quickloris.models.classification` with `set_modules_to_save`) are saved whole, under PEFT's key for them,
``base_model.model.score.weight``, and listed in the config (``modules_to_save: ["score"]``, ``task_type:
"SEQ_CLS"``). A classifier's folder also holds `LABELS_NAME`: its class names (``num_labels``, ``id2label``,
``label2id``, transformers' config fields), which the model must be built with
(``AutoModelForSequenceClassification.from_pretrained(base, num_labels=..., id2label=..., label2id=...)``) before
``PeftModel.from_pretrained(model, folder)``. They are kept out of adapter_config.json because PEFT's config
reader takes unknown keys for a newer PEFT's and warns to upgrade.
"""

from __future__ import annotations

import enum
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quickloris.models.adapter_base import CLASSIFIER_HEADS
from quickloris.nn.qlora_linear import QLoRALinear, lora_scaling
from quickloris.utils.atomic import atomic_open, atomic_write_text

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LABELS_NAME = "labels.json"
PREFIX = "base_model.model."
_SAVED = "modules_to_save"  # the surgery state key of the registered modules


def lora_layers(model: nn.Module) -> dict[str, QLoRALinear]:
    """The QLoRA layers that carry an adapter (and a VLM's 16-bit LoRA vision layers), by module path (PEFT's
    names without the prefix)."""
    from quickloris.nn.lora_linear import LoRALinear

    return {name: m for name, m in model.named_modules() if isinstance(m, (QLoRALinear, LoRALinear)) and m.r > 0}


def set_modules_to_save(model: nn.Module, names: list[str], step: str) -> None:
    """Register the modules `names` (paths from the model) as trained whole and saved with the adapter (PEFT's
    ``modules_to_save``), as part of `step` (its undo forgets them)."""
    from quickloris.models import surgery

    for name in names:
        if name not in CLASSIFIER_HEADS or not isinstance(getattr(surgery.unwrap(model), name, None), nn.Module):
            raise ValueError(f"modules_to_save: {name!r} is not a classification head of {type(model).__name__}")
    surgery.set_state(model, _SAVED, list(names))
    surgery.record(
        model,
        step,
        f"model.{','.join(names)}",
        "saved whole with the adapter (PEFT modules_to_save)",
        undo_fn=lambda m: surgery.edits(m).state.pop(_SAVED, None),
    )


def modules_to_save(model: nn.Module) -> dict[str, nn.Module]:
    """The modules trained whole and saved with the adapter, by path (`set_modules_to_save`)."""
    from quickloris.models import surgery

    target = surgery.unwrap(model)
    return {name: target.get_submodule(name) for name in surgery.state(model, _SAVED, [])}


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole matrix of a parameter: itself, or for an FSDP2 shard (a DTensor) the all-gathered tensor."""
    from torch.distributed.tensor import DTensor

    t = t.detach()
    if not isinstance(t, DTensor):
        return t
    mesh = t.device_mesh
    if t.device.type != mesh.device_type:  # CPU-offloaded shards: gather on the mesh's device
        device = torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else mesh.device_type
        t = DTensor.from_local(
            t.to_local().to(device), mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
        )
    return t.full_tensor()


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for m in lora_layers(model).values() for p in m.lora_weights) or any(
        isinstance(p, DTensor) for m in modules_to_save(model).values() for p in m.parameters()
    )


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{PEFT key: tensor}`` of every LoRA matrix and every parameter of the modules saved whole, on CPU, in the
    parameters' dtype.

    For a model sharded by FSDP2 the matrices are all-gathered: a collective, so every rank must call it."""
    out: dict[str, torch.Tensor] = {}
    for path, m in lora_layers(model).items():
        A, B = m.lora_weights
        out[f"{PREFIX}{path}.lora_A.weight"] = _full(A).to("cpu").contiguous()
        out[f"{PREFIX}{path}.lora_B.weight"] = _full(B).to("cpu").contiguous()
    if not out:
        raise ValueError(f"{type(model).__name__} has no LoRA layers (prepare it with quickloris.prepare_model)")
    for path, module in modules_to_save(model).items():
        for name, p in module.named_parameters():
            out[f"{PREFIX}{path}.{name}"] = _full(p).to("cpu").contiguous()
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def adapter_config(model: nn.Module) -> dict[str, Any]:
    """PEFT ``LoraConfig`` fields describing `model`'s adapters (one rank / alpha / dropout for all layers)."""
    from quickloris.models import surgery

    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers")
    settings = {(m.r, m.lora_alpha, m.use_rslora, m.lora_dropout) for m in layers.values()}
    if len(settings) != 1:
        raise ValueError(
            f"LoRA layers differ in (r, alpha, rslora, dropout): {sorted(settings)}; PEFT's format "
            "written here needs one setting"
        )
    r, alpha, rslora, dropout = settings.pop()
    targets = sorted({path.rsplit(".", 1)[-1] for path in layers})
    cfg = surgery.state(model, "prepare")
    if cfg is not None:
        alpha = cfg.lora_alpha
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    saved = sorted(modules_to_save(model)) or None
    fields = dict(
        r=r,
        lora_alpha=alpha if alpha != int(alpha) else int(alpha),
        lora_dropout=dropout,
        use_rslora=rslora,
        target_modules=targets,
        bias="none",
        task_type="SEQ_CLS" if saved else "CAUSAL_LM",
        modules_to_save=saved,
        base_model_name_or_path=name,
        inference_mode=True,
    )
    try:
        from peft import LoraConfig
    except ImportError:  # pragma: no cover - peft is a dependency; keep a minimal PEFT-readable config anyway
        return _jsonable({"peft_type": "LORA", **fields, "fan_in_fan_out": False})
    return _jsonable(LoraConfig(**fields).to_dict())


def save_adapter(model: nn.Module, folder: str | os.PathLike, *, write: bool | None = None) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` (PEFT format) to `folder`; returns it.

    A model sharded by FSDP2 is gathered first (every rank must call this); `write` (default: on rank 0 only)
    says whether this process writes the files, and the ranks wait for the writer before returning.
    """
    import torch.distributed as dist
    from safetensors.torch import save

    tensors = adapter_state_dict(model)
    sharded = _is_sharded(model)
    if write is None:
        write = not dist.is_initialized() or dist.get_rank() == 0
    out = Path(folder)
    if write:
        config = adapter_config(model)
        out.mkdir(parents=True, exist_ok=True)
        blob = save(tensors, metadata={"format": "pt"})
        with atomic_open(out / WEIGHTS_NAME, "wb") as f:
            f.write(blob)
        atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
        if config.get("task_type") == "SEQ_CLS":
            labels = label_fields(model)
            atomic_write_text(out / LABELS_NAME, json.dumps(labels, indent=2) + "\n")
    if sharded and dist.is_initialized():
        dist.barrier()
    return out


def label_fields(model: nn.Module) -> dict[str, Any]:
    """``num_labels``, ``id2label``, ``label2id`` of a classifier's config (JSON keys: ids as strings, as
    transformers writes them)."""
    from quickloris.models import surgery

    cfg = surgery.unwrap(model).config
    names = [str(cfg.id2label[i]) for i in range(int(cfg.num_labels))]
    return {
        "num_labels": len(names),
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
    }


def read_labels(folder: str | os.PathLike) -> list[str]:
    """The class names (in id order) of a classifier's adapter folder (`LABELS_NAME`)."""
    path = Path(folder) / LABELS_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"adapter folder {os.fspath(folder)!r} has no {LABELS_NAME}: it is not a sequence "
            "classification adapter written by quickloris"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        n = int(data["num_labels"])
        names = [data["id2label"][str(i)] for i in range(n)]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid label file ({type(e).__name__}: {e})") from None
    if n < 2 or len(set(names)) != n or not all(isinstance(x, str) and x for x in names):
        raise ValueError(f"{path}: needs at least 2 distinct, non-empty class names, got {names!r}")
    return names


def save_pretrained(self: nn.Module, save_directory, *args, is_main_process: bool = True, **kwargs) -> None:
    """``model.save_pretrained`` of a prepared model (`quickloris.models.prepare` installs it on the object): the
    LoRA adapter in PEFT's format, not the frozen NF4 base. On a sharded model every rank must call it (HF
    ``Trainer`` does); rank 0 writes when `is_main_process`."""
    import torch.distributed as dist

    sharded = _is_sharded(self)
    if is_main_process or sharded:
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        save_adapter(self, save_directory, write=is_main_process and (rank0 or not sharded))


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The folder's adapter_config.json, checked for what quickloris' LoRA layers can express."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"adapter folder {os.fspath(folder)!r} has no {CONFIG_NAME}")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported, only LORA")
    unsupported = {
        "use_dora": "DoRA",
        "lora_bias": "LoRA bias",
        "fan_in_fan_out": "fan_in_fan_out",
        "rank_pattern": "per-layer ranks (rank_pattern)",
        "alpha_pattern": "per-layer alphas (alpha_pattern)",
        "layers_to_transform": "layers_to_transform",
        "trainable_token_indices": "trainable tokens",
        "target_parameters": "target_parameters",
        "layer_replication": "layer_replication",
    }
    for key, what in unsupported.items():
        if cfg.get(key):
            raise ValueError(f"{path}: {what} ({key}={cfg[key]!r}) is not supported by quickloris' LoRA layers")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={cfg['bias']!r} is not supported (only 'none')")
    other = sorted(set(cfg.get("modules_to_save") or ()) - set(CLASSIFIER_HEADS))
    if other:
        raise ValueError(
            f"{path}: modules_to_save={cfg['modules_to_save']!r}: only a classification head "
            f"({' / '.join(CLASSIFIER_HEADS)}) can be trained whole; {other} cannot"
        )
    targets = cfg.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        raise ValueError(
            f"{path}: target_modules is a regular expression ({targets!r}); quickloris needs a list "
            "of layer names or 'all-linear'"
        )
    return cfg


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Copy a PEFT LoRA adapter's weights into `model`'s QLoRA layers (same layers, rank and scaling required)."""
    from safetensors.torch import load_file

    cfg = read_adapter_config(folder)
    weights = Path(folder) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"adapter folder {os.fspath(folder)!r} has no {WEIGHTS_NAME}")
    tensors = load_file(os.fspath(weights))
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scaling = lora_scaling(r, alpha, bool(cfg.get("use_rslora")))
    layers = lora_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no LoRA layers: prepare it first (prepare_model(model, "
            "adapter=folder) does both)"
        )
    used: set[str] = set()
    for path, m in layers.items():
        if m.r != r or not math.isclose(m.scaling, scaling, rel_tol=1e-6):
            raise ValueError(
                f"{path}: the model's LoRA has r={m.r}, scaling={m.scaling:g} but the adapter has "
                f"r={r}, scaling={scaling:g}"
            )
        for kind, param in zip(("lora_A", "lora_B"), m.lora_weights):
            key = f"{PREFIX}{path}.{kind}.weight"
            t = tensors.get(key)
            if t is None:
                raise ValueError(f"adapter {os.fspath(folder)!r} has no tensor {key!r}")
            if t.shape != param.shape:
                raise ValueError(f"{key}: shape {tuple(t.shape)} in the adapter, {tuple(param.shape)} in the model")
            with torch.no_grad():
                param.copy_(t.to(device=param.device, dtype=param.dtype))
            used.add(key)
    whole = modules_to_save(model)
    listed = set(cfg.get("modules_to_save") or ())
    saved_heads = sorted(
        {
            k[len(PREFIX) :].split(".", 1)[0]
            for k in tensors
            if not k.startswith(f"{PREFIX}model.") and k[len(PREFIX) :].split(".", 1)[0] in CLASSIFIER_HEADS
        }
    )
    if saved_heads and not whole:
        raise ValueError(
            f"adapter {os.fspath(folder)!r} holds a classification head ({', '.join(saved_heads)}): "
            "load it into a sequence classifier (--task-type classification)"
        )
    for path, module in whole.items():
        if path not in listed:
            raise ValueError(
                f"adapter {os.fspath(folder)!r} has no trained {path!r} head (its modules_to_save is "
                f"{cfg.get('modules_to_save')!r}): it is not a sequence classification adapter"
            )
        for name, param in module.named_parameters():
            key = f"{PREFIX}{path}.{name}"
            t = tensors.get(key)
            if t is None:
                raise ValueError(f"adapter {os.fspath(folder)!r} has no tensor {key!r}")
            if t.shape != param.shape:
                raise ValueError(
                    f"{key}: shape {tuple(t.shape)} in the adapter, {tuple(param.shape)} in the model "
                    "(a different number of classes?)"
                )
            with torch.no_grad():
                param.copy_(t.to(device=param.device, dtype=param.dtype))
            used.add(key)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"adapter {os.fspath(folder)!r} has tensors for layers the model lacks, e.g. {extra[:3]}")
    return model
