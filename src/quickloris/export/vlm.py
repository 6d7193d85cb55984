"""GGUF export of vision-language models: the language model (LoRA merged, quantized like any GGUF model) and the
vision tower + projector as llama.cpp's mmproj file (`quickloris.export.vision`).

    export_gguf(vlm, "model.gguf", tokenizer=tok)   # writes model.gguf and model.mmproj.gguf
    llama-mtmd-cli -m model.gguf --mmproj model.mmproj.gguf --image cat.png -p "What is this?"

The family comes from config.json's ``model_type`` (``llava``, ``llava_next``, ``qwen2_vl``, ``qwen2_5_vl``), never from
a Python class name. The parameters are split by name: the language model's (``model.language_model.*`` and
``lm_head``, also transformers 4's ``language_model.model.*`` / ``language_model.lm_head``) are renamed to a causal
LM's (``model.*``, ``lm_head``) and written from ``text_config`` by the text export (Llava: its language model's own
architecture, e.g. ``llama``; Qwen2-VL: ``qwen2vl``); every other parameter must be the vision tower's or the
projector's, and has a tensor in the mmproj or is one that the HF model's image path does not use either (Llava's
blocks past ``vision_feature_layer``). A LoRA delta is merged wherever its weight lands; one on a weight the mmproj
leaves out, on a convolution or an embedding of the vision tower (which the merge cannot fold into the file), or on
the vision tower of a ``text_only`` export is refused, never dropped.

With ``merge_base`` nf4 (the default with an adapter folder) the language model's linear layers are the NF4 base the
run trained on and every other weight, the vision tower's included, is rounded to the run's dtype
(`quickloris.export.merge_base`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import torch

from quickloris.export import merge as _merge
from quickloris.export.archs.llava import Llava
from quickloris.export.archs.qwen2vl import Qwen2VLVision
from quickloris.export.merge_base import resolve_merge_base
from quickloris.export.vision import MMPROJ_TYPES, VisionArch, mmproj_path, read_processor_config, write_mmproj

VISION_ARCHS: dict[str, VisionArch] = {t: a for a in (Llava(), Qwen2VLVision()) for t in a.model_types}

# language-model parameter prefixes of VLMs -> a causal LM's
_LM_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
)


def vision_arch_for(config: Any) -> VisionArch:
    """The mmproj layout of a VLM config (from its model_type), checked; one line naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    arch = VISION_ARCHS.get(model_type)
    if arch is None:
        raise ValueError(
            f"GGUF vision export supports the model types {', '.join(VISION_ARCHS)} (Llava 1.5 / NeXT, Qwen2-VL, "
            f"Qwen2.5-VL); config.json has model_type {model_type!r} (pass text_only / --text-only for its "
            "language model alone, where its architecture is supported)"
        )
    arch.check(config)
    return arch


def processor_config(source: Any):
    """`vision.read_processor_config`, or one line saying where it is missing."""
    found = read_processor_config(source)
    if found is None:
        where = (
            f"{os.fspath(source)} has no preprocessor_config.json or processor_config.json" if source else "none given"
        )
        raise ValueError(
            f"the mmproj needs the image processor's mean and std ({where}): pass the processor's folder, an HF "
            "processor or a dict"
        )
    return found


def lm_name(name: str) -> str | None:
    """A VLM parameter's name in its language model as a causal LM, or None if it is not the language model's."""
    for prefix, new in _LM_PREFIXES:
        if name.startswith(prefix):
            return new + name[len(prefix) :]
    return None


@dataclasses.dataclass
class Split:
    """A VLM's parameters and adapter plan, split into the language model's (causal-LM names) and the vision
    part's (canonical names -> the model's names)."""

    lm_params: dict[str, torch.Tensor]
    lm_plan: _merge.AdapterPlan
    lm_names: dict[str, str]  # causal-LM name -> the model's name
    vision_names: dict[str, str]  # canonical vision name -> the model's name
    vision_touched: set[str]  # the model's names of vision parameters the adapter changes


def split(params: dict[str, torch.Tensor], plan: _merge.AdapterPlan, arch: VisionArch | None) -> Split:
    out = Split({}, _merge.AdapterPlan(), {}, {}, set())
    for name, p in params.items():
        lm = lm_name(name)
        if lm is not None:
            out.lm_params[lm], out.lm_names[lm] = p, name
        elif arch is not None and arch.owns(name):
            out.vision_names[arch.canonical(name)] = name
        elif arch is not None:
            raise ValueError(
                f"parameter {name!r} is neither the language model's nor llama.cpp's {arch.name} vision tower's; "
                "the export refuses to drop weights silently"
            )
    for module, deltas in plan.deltas.items():
        lm = lm_name(module + ".weight")
        if lm is not None:
            out.lm_plan.deltas[lm[: -len(".weight")]] = deltas
        else:
            out.vision_touched.add(module + ".weight")
    for name, t in plan.replacements.items():
        lm = lm_name(name)
        if lm is not None:
            out.lm_plan.replacements[lm] = t
        else:
            out.vision_touched.add(name)
    return out


def check_vision_adapter(
    touched: set[str], deltas: set[str], shapes: dict[str, tuple[int, ...]], arch, dropped: set[str], text_only: bool
) -> None:
    """Refuse (one line) adapter weights on the vision part that the mmproj cannot hold. `touched`: the model's
    names of the vision parameters the adapter changes; `deltas`: the module paths with LoRA deltas; `shapes`:
    the model's parameter shapes."""
    for name in sorted(touched):
        module = name.rsplit(".", 1)[0]
        if text_only:
            raise ValueError(
                f"the adapter changes the vision part ({module}), which a text-only export leaves out: export "
                "without --text-only to write the mmproj too"
            )
        if name not in shapes:
            raise ValueError(f"the adapter refers to {name!r}, which the model does not have")
        if arch.canonical(name) in dropped:
            raise ValueError(
                f"the adapter changes {module}, which llama.cpp's {arch.name} mmproj leaves out (the HF model's image "
                "path does not use it either): its effect would be lost"
            )
        if module in deltas and len(shapes[name]) != 2:
            raise ValueError(
                f"the adapter's LoRA on {module} (a convolution or embedding of the vision tower) cannot be merged "
                f"into llama.cpp's {arch.name} mmproj; adapt the vision tower's linear layers only"
            )


def preflight(
    config: Any, adapter: str | os.PathLike | None, processor: Any, *, text_only: bool, mmproj_quant: str
) -> None:
    """The checks of `export_vlm` that need no weights: the family, the image processor config against the model's,
    and an adapter folder against the model's parameter shapes (from config.json on the meta device)."""
    from safetensors import safe_open

    arch = None if text_only else vision_arch_for(config)
    if arch is not None:
        arch.check_processor(config, processor_config(processor))
    shapes = vlm_parameter_shapes(config)
    dropped = set()
    if arch is not None:
        vision = {arch.canonical(n): shape for n, shape in shapes.items() if lm_name(n) is None and arch.owns(n)}
        dropped = arch.plan(config, vision, mmproj_quant)[1]
    if adapter is None:
        return
    with safe_open(os.path.join(os.fspath(adapter), "adapter_model.safetensors"), "pt") as f:
        keys = [k.removeprefix("base_model.model.").replace(".base_layer.", ".") for k in f.keys()]
    touched, deltas = set(), set()
    for key in keys:
        m = re.match(r"^(.*)\.(lora_A|lora_B)\.weight$|^(.*)\.(lora_embedding_A|lora_embedding_B)$", key)
        module = (m.group(1) or m.group(3)) if m else None
        name = f"{module}.weight" if m else key
        if lm_name(name) is None:
            touched.add(name)
            if module:
                deltas.add(module)
    check_vision_adapter(touched, deltas, shapes, arch, dropped, text_only)


def export_vlm(
    base: Any,
    params: dict[str, torch.Tensor],
    plan: _merge.AdapterPlan,
    path: str | os.PathLike,
    *,
    tokenizer: Any,
    processor: Any,
    quant: str,
    mmproj_quant: str | None,
    text_only: bool,
    threads: int,
    name: str | None,
    tokenizer_pre: str | None,
    merge_base: str | None,
    folder_adapter: bool,
    nf4: Any,
    overwrite: bool,
    log: Any,
):
    """`export_gguf` for a vision-language model (see the module docstring)."""
    from quickloris.export.text import ExportResult, default_name, write_language_model

    config = base.config
    arch = None if text_only else vision_arch_for(config)
    mm_quant = mmproj_quant or {"f32": "f32", "bf16": "bf16"}.get(quant, "f16")
    if mm_quant not in MMPROJ_TYPES:
        raise ValueError(f"mmproj_quant must be one of {', '.join(MMPROJ_TYPES)}, got {mm_quant!r}")
    mm_path = mmproj_path(path)
    if arch is not None and os.path.lexists(mm_path) and not overwrite:
        raise FileExistsError(f"{mm_path} already exists; pass overwrite=True to replace it")
    s = split(params, plan, arch)
    processor_cfg = None
    if arch is not None:
        processor_cfg = processor_config(processor if processor is not None else config._name_or_path or None)
        arch.check_processor(config, processor_cfg)
        shapes = {c: _merge.weight_shape(params[n]) for c, n in s.vision_names.items()}
        tensors, dropped = arch.plan(config, shapes, mm_quant)
    else:
        dropped = set()
    shapes = {n: _merge.weight_shape(p) for n, p in params.items()}
    check_vision_adapter(s.vision_touched, set(plan.deltas), shapes, arch, dropped, text_only)

    how = resolve_merge_base(merge_base, base, params, folder_adapter=folder_adapter, nf4=nf4)
    how = dataclasses.replace(how, linears=frozenset(n for n in how.linears if lm_name(n) is not None))
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config.text_config
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # an HF processor carries its tokenizer
    result = ExportResult(path=os.fspath(path), quant=quant, merge_base=how.describe())
    file_name = name or default_name(config)
    wrote_mmproj = False
    try:
        if arch is not None:
            result.mmproj_tensor_types = write_mmproj(
                mm_path,
                arch,
                config,
                tensors,
                processor_cfg,
                quant=mm_quant,
                name=file_name,
                weight=lambda c: _merge.merged_weight(s.vision_names[c], params, plan, base_weight=how.weight),
                threads=threads,
                overwrite=overwrite,
                log=log,
            )
            wrote_mmproj = True
            result.mmproj_path, result.mmproj_quant = mm_path, mm_quant
            result.notes += arch.notes(config, processor_cfg)
        write_language_model(
            path,
            text_config,
            s.lm_params,
            s.lm_plan,
            lambda n, p: how.weight(s.lm_names[n], p),
            result,
            tokenizer=tok,
            generation_config=getattr(base, "generation_config", None),
            name=file_name,
            tokenizer_pre=tokenizer_pre,
            threads=threads,
            overwrite=overwrite,
            log=log,
        )
    except BaseException:
        if wrote_mmproj:  # the pair is written together or not at all
            os.unlink(mm_path)
        raise
    return result


def load_vlm(folder: str | os.PathLike, tokenizer: str | None = None) -> tuple[Any, Any]:
    """A VLM folder's model (``AutoModelForImageTextToText``, weights in their stored dtype) and tokenizer."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype="auto")
    return model.eval(), AutoTokenizer.from_pretrained(str(tokenizer or folder))


def vlm_parameter_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} of the VLM of `config` as transformers names them in memory (meta device)."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(config)
    return {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
