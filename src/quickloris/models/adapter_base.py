"""What a LoRA adapter was trained on, read from files: the NF4 base of the run that wrote it, and whether its
matrices fit a model's layers.

NF4 base. `quickloris train` quantizes every decoder linear layer of the model it loaded (in the run's dtype) to
NF4 with the run's block size and double quantization, on the run's device: bitsandbytes' CUDA and CPU backends
round the nested absmax codes differently (`quickloris.quant.nf4`), so the device picks the rounding. The model
the run trained and scored computes with

    W_base = dequant_NF4(quant_NF4(W.to(dtype)))  in dtype      (decoder linears)
    W_base = W.to(dtype)                                         (embeddings, norms, lm_head)

PEFT's adapter_config.json records none of it; the run's ``config.json`` (next to ``adapter/``, or two levels above
``checkpoints/step-N/``) does: ``qlora.blocksize``, ``qlora.double_quant``, ``resolved.device``, ``resolved.dtype``.
Without it, `NF4Base()` is what ``quickloris eval --adapter`` builds on a CPU: block size 64, double quantization,
float32, the CPU backend's rounding.

Fit. An adapter's ``lora_A`` [r, in] / ``lora_B`` [out, r] must match the [out, in] weight of the layer they name,
and replaced weights (``modules_to_save``) the weight's shape; `check_adapter_fits` says in one line where not.
`model_parameter_shapes` gets the shapes of a Hugging Face folder from its config.json alone (a model built on
the meta device), so the check can run before the weights are loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

_ROUNDING_NAMES = {"bnb-cuda": "CUDA", "bnb-cpu": "CPU"}
_PREFIX = "base_model.model."
# The heads a sequence-classification adapter replaces (PEFT lists these as its SEQ_CLS modules_to_save).
CLASSIFIER_HEADS = ("score", "classifier")


@dataclasses.dataclass(frozen=True)
class NF4Base:
    """How a run's NF4 base was made: block size, double quantization, the dtype the weights were held and
    dequantized in, bitsandbytes' rounding (``bnb-cuda`` or ``bnb-cpu``), and the run config it was read from."""

    blocksize: int = 64
    double_quant: bool = True
    dtype: str = "float32"
    rounding: str = "bnb-cpu"
    origin: str | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]

    def describe(self) -> str:
        what = (
            f"blocksize {self.blocksize}{', double quant' if self.double_quant else ''}, "
            f"{_ROUNDING_NAMES[self.rounding]} rounding, {self.dtype}"
        )
        return f"{what}; " + (
            f"settings from {self.origin}" if self.origin else "no run config next to the adapter: defaults"
        )


def run_config(adapter: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The ``config.json`` of the `quickloris train` run that wrote `adapter` (its ``adapter/`` folder or a
    ``checkpoints/step-N/`` folder), or None if there is none."""
    folder = Path(adapter).resolve()
    candidates = [folder.parent / "config.json"]
    if folder.parent.name == "checkpoints":
        candidates.append(folder.parent.parent / "config.json")
    for path in candidates:
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(cfg, dict) and isinstance(cfg.get("qlora"), dict):
            return path, cfg
    return None


def nf4_base(adapter: str | os.PathLike | None) -> NF4Base:
    """The NF4 base the adapter was trained on (see the module docstring); defaults when no run config is found."""
    found = run_config(adapter) if adapter is not None else None
    if found is None:
        return NF4Base()
    path, cfg = found
    q, resolved = cfg["qlora"], cfg.get("resolved") or {}
    dtype = str(resolved.get("dtype", "float32")).replace("torch.", "")
    device = str(resolved.get("device", "cpu"))
    try:
        base = NF4Base(
            blocksize=int(q.get("blocksize", 64)),
            double_quant=bool(q.get("double_quant", True)),
            dtype=dtype,
            rounding="bnb-cuda" if device.startswith("cuda") else "bnb-cpu",
            origin=str(path),
        )
        base.torch_dtype  # noqa: B018 - validates the dtype name
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: unreadable NF4 settings of the run ({e})") from None
    return base


def model_parameter_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} of an HF causal LM (tied parameters listed under each name)."""
    return {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}


def folder_parameter_shapes(folder: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the Hugging Face model in `folder` from its config.json alone (no weights read): its
    causal LM's, or a vision-language model's ``*ForConditionalGeneration``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from quickloris.models.vision import is_vision_model

    config = AutoConfig.from_pretrained(os.fspath(folder))
    if hasattr(config, "quantization_config"):  # the logical [out, in] shapes are the unquantized model's
        delattr(config, "quantization_config")
    auto = AutoModelForImageTextToText if is_vision_model(config) else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    return model_parameter_shapes(model)


def _adapter_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"adapter folder {str(folder)!r} has no adapter_model.safetensors")
    with safe_open(os.fspath(path), "pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def check_adapter_fits(
    adapter: str | os.PathLike,
    shapes: dict[str, tuple[int, ...]],
    *,
    model: str,
    option: str = "--adapter",
    model_option: str = "--model",
) -> None:
    """Raise ValueError (one line naming `option` and `model_option`) unless every tensor of the adapter folder fits
    the model whose parameter shapes are `shapes`."""
    folder = Path(adapter)
    head = f"{option} {folder} does not fit {model_option} {model}"
    layers = sorted({n.split(".")[2] for n in shapes if n.startswith("model.layers.")}, key=int)
    for key, shape in sorted(_adapter_shapes(folder).items()):
        if not key.startswith(_PREFIX):
            raise ValueError(f"{head}: unexpected tensor {key!r} (PEFT adapters name them {_PREFIX}...)")
        name = key[len(_PREFIX) :].replace(".base_layer.", ".")
        for kind in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            tail = f".{kind}.weight" if kind in ("lora_A", "lora_B") else f".{kind}"
            if name.endswith(tail):
                module = name[: -len(tail)]
                break
        else:
            if name not in shapes:
                module = name.split(".", 1)[0]
                if module in CLASSIFIER_HEADS:
                    raise ValueError(
                        f"{option} {folder} holds a classification head ({module}): load it into a "
                        "sequence classifier (--task-type classification)"
                    )
                raise ValueError(f"{head}: the adapter replaces {name}, which the model does not have")
            if tuple(shapes[name]) != shape:
                raise ValueError(f"{head}: the adapter's {name} is {list(shape)}, the model's {list(shapes[name])}")
            continue
        weight = shapes.get(f"{module}.weight")
        if weight is None:
            hint = f" (the model has {len(layers)} decoder layers)" if module.startswith("model.layers.") else ""
            raise ValueError(f"{head}: the adapter has LoRA weights for {module}, which the model does not have{hint}")
        if len(shape) != 2 or len(weight) != 2:
            raise ValueError(f"{head}: {key} is {list(shape)}, the layer's weight {list(weight)}")
        if kind == "lora_A":
            want, what = (shape[0], weight[1]), f"takes {weight[1]} inputs"
        elif kind == "lora_B":
            want, what = (weight[0], shape[1]), f"has {weight[0]} outputs"
        elif kind == "lora_embedding_A":
            want, what = (shape[0], weight[0]), f"has {weight[0]} rows"
        else:
            want, what = (weight[1], shape[1]), f"has {weight[1]} columns"
        if shape != want:
            raise ValueError(f"{head}: {module} {what}, but the adapter's {kind} is {list(shape)}")
