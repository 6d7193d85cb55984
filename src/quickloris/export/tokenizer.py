"""A Hugging Face tokenizer as GGUF metadata (the keys llama.cpp builds its tokenizer from).

Supported: byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen2, SmolLM, ...) as
`tokenizer.ggml.model = "gpt2"` with the vocabulary, merges and token types, and SentencePiece BPE
tokenizers (Llama-2, Vicuna, Mistral 7B v0.1, ...) as `tokenizer.ggml.model = "llama"` with tokens,
scores and token types (`quickloris.export.tokenizer_spm`); both with the special token ids, whether
BOS/EOS are added, and the chat template. Other kinds (Unigram, WordPiece, ...) are refused.

llama.cpp splits text with a fixed pre-tokenizer regex chosen by `tokenizer.ggml.pre`; we pick it
by recognising the HF pre-tokenizer (its regex and digit handling), not by name, and refuse to guess
when it is unknown (a wrong one tokenizes numbers or whitespace differently without any error):
pass `pre=` to override.
"""

from __future__ import annotations

import json
from typing import Any

from quickloris.export import tokenizer_spm as _spm
from quickloris.export.writer import GGUFValueType as V

# token types (llama_token_type)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


def detect_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for a tokenizer.json's pre-tokenizer; ValueError if unknown."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # GPT-2 regex after splitting every digit
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == _LLAMA3_REGEX:
            return "llama-bpe"
        if regex == _QWEN2_REGEX:
            return "qwen2"
    raise ValueError(
        f"unrecognised pre-tokenizer {json.dumps(pre)[:300]}; pass tokenizer_pre= (llama.cpp's "
        "tokenizer.ggml.pre name) if you know which one matches"
    )


def _merges(model: dict[str, Any]) -> list[str]:
    out = []
    for merge in model.get("merges", []):
        if isinstance(merge, str):
            out.append(merge)
        else:  # [left, right] (tokenizers >= 0.20); a space inside a part is stored as U+0120 + 256
            left, right = ("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in merge)
            out.append(f"{left} {right}")
    return out


def _int_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def special_token_ids(tokenizer: Any, config: Any = None, generation_config: Any = None) -> dict[str, int]:
    """bos/eos/unk/pad ids: the tokenizer's, except that the model's (generation) config decides EOS.

    HF `generate` stops on the config's eos ids, so an EOS the tokenizer names but the config does
    not (seen with tokenizers rebuilt from GGUF files) yields to the config's first one.
    """
    ids: dict[str, int] = {}
    for kind in ("bos", "unk", "pad"):
        value = getattr(tokenizer, f"{kind}_token_id", None)
        if value is None and config is not None:
            value = getattr(config, f"{kind}_token_id", None)
        if isinstance(value, int):
            ids[kind] = value
    cfg_eos = _int_ids(getattr(generation_config, "eos_token_id", None)) or _int_ids(
        getattr(config, "eos_token_id", None)
    )
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if cfg_eos and tok_eos not in cfg_eos:
        ids["eos"] = cfg_eos[0]
    elif tok_eos is not None:
        ids["eos"] = int(tok_eos)
    return ids


def _byte_level_vocab(tj: dict[str, Any], vocab_size: int, pre: str) -> list[tuple[str, V, Any, V | None]]:
    """The vocabulary entries of a byte-level BPE: tokens, types (added tokens: control if special, else
    user-defined; ids up to `vocab_size` the tokenizer leaves empty: unused `[PAD<i>]`), merges."""
    model = tj["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    for tid, tok in added.items():
        vocab[tok["content"]] = tid
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens but the model only {vocab_size} embedding rows")
    tokens: list[str | None] = [None] * vocab_size
    types = [NORMAL] * vocab_size
    for text, tid in vocab.items():
        tokens[tid] = text
    for tid, tok in added.items():
        types[tid] = CONTROL if tok.get("special") else USER_DEFINED
    for tid in range(vocab_size):
        if tokens[tid] is None:
            tokens[tid] = f"[PAD{tid}]"
            types[tid] = UNUSED
    return [
        ("tokenizer.ggml.model", V.STRING, "gpt2", None),
        ("tokenizer.ggml.pre", V.STRING, pre, None),
        ("tokenizer.ggml.tokens", V.ARRAY, tokens, V.STRING),
        ("tokenizer.ggml.token_type", V.ARRAY, types, V.INT32),
        ("tokenizer.ggml.merges", V.ARRAY, _merges(model), V.STRING),
    ]


def tokenizer_metadata(
    tokenizer: Any,
    *,
    vocab_size: int,
    config: Any = None,
    generation_config: Any = None,
    pre: str | None = None,
    chat_template: str | None = None,
) -> list[tuple[str, V, Any, V | None]]:
    """(key, type, value, array element type) entries describing `tokenizer` for llama.cpp.

    `vocab_size` is the model's embedding rows: the token list is padded with unused `[PAD<i>]`
    tokens up to it (llama.cpp requires one token per embedding row). `chat_template`: stored instead of the
    tokenizer's (e.g. the tool template a run was trained with).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"GGUF export needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    tj = json.loads(backend.to_str())
    model = tj.get("model") or {}
    byte_level = model.get("type") == "BPE" and "ByteLevel" in json.dumps(tj.get("decoder"))
    if byte_level:
        kv = _byte_level_vocab(tj, vocab_size, pre or detect_pre_tokenizer(tj))
    elif _spm.is_sentencepiece_bpe(tj):
        if pre is not None:
            raise ValueError("tokenizer_pre (--tokenizer-pre) applies to byte-level BPE tokenizers, not SentencePiece")
        tokens, scores, types = _spm.sentencepiece_vocab(tokenizer, tj, vocab_size)
        kv = [
            ("tokenizer.ggml.model", V.STRING, "llama", None),
            ("tokenizer.ggml.pre", V.STRING, "default", None),
            ("tokenizer.ggml.tokens", V.ARRAY, tokens, V.STRING),
            ("tokenizer.ggml.scores", V.ARRAY, scores, V.FLOAT32),
            ("tokenizer.ggml.token_type", V.ARRAY, types, V.INT32),
        ]
        prefix = _spm.whitespace_scheme(tj)
        # llama.cpp's default is true; said when the tokenizer sets it (as llama.cpp's converter does) or must be false
        if (getattr(tokenizer, "init_kwargs", None) or {}).get("add_prefix_space") is not None or not prefix:
            kv.append(("tokenizer.ggml.add_space_prefix", V.BOOL, bool(prefix), None))
        # whether a pair of texts gets a separator between them (llama.cpp's reranking / embedding inputs)
        sep = getattr(tokenizer, "sep_token_id", None)
        kv.append(
            ("tokenizer.ggml.add_sep_token", V.BOOL, sep is not None and sep in tokenizer("a", "b")["input_ids"], None)
        )
    else:
        raise ValueError(
            "GGUF export supports byte-level BPE and SentencePiece BPE tokenizers; this one is "
            f"{_spm.describe(tj)} ({type(tokenizer).__name__})"
        )

    ids = special_token_ids(tokenizer, config, generation_config)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = "bos" in ids and len(probe) > len(plain) and probe[0] == ids["bos"]
    add_eos = "eos" in ids and len(probe) > len(plain) and probe[-1] == ids["eos"]

    for kind, key in (
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("unk", "unknown_token_id"),
        ("pad", "padding_token_id"),
    ):
        if kind in ids:
            kv.append((f"tokenizer.ggml.{key}", V.UINT32, ids[kind], None))
    kv += [
        ("tokenizer.ggml.add_bos_token", V.BOOL, add_bos, None),
        ("tokenizer.ggml.add_eos_token", V.BOOL, add_eos, None),
    ]
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: "default" is the main one
        for tname, text in template.items():
            key = "tokenizer.chat_template" if tname == "default" else f"tokenizer.chat_template.{tname}"
            kv.append((key, V.STRING, text, None))
    elif isinstance(template, str) and template:
        kv.append(("tokenizer.chat_template", V.STRING, template, None))
    return kv
