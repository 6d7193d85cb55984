"""SentencePiece BPE tokenizers (Llama-2, Vicuna, Mistral 7B v0.1, ...) as llama.cpp's `llama` tokenizer model.

llama.cpp's SentencePiece tokenizer (``tokenizer.ggml.model = "llama"``) splits text into UTF-8 characters, replaces
spaces by "▁", puts one "▁" before the text (``tokenizer.ggml.add_space_prefix``, default true) and then merges,
again and again, the adjacent pair whose concatenation is a token of highest *score* (``tokenizer.ggml.scores``;
ties: the leftmost pair); characters no token holds become their UTF-8 byte tokens ``<0xXX>``. The file carries every
token's text (with "▁"), score and type (normal, unknown, control, user-defined, unused, byte), no merges.

Hugging Face holds these tokenizers as a BPE with byte fallback whose merges are every pair of tokens that
concatenate to a token (transformers orders them by the merged token's id). The scores come from ``tokenizer.model``
(the SentencePiece model: read here with a small protobuf reader, no `sentencepiece` package needed) when the
tokenizer was loaded from a folder holding it, as llama.cpp's converter takes them; else they are made from the
merges (score = minus the rank of the first merge making the token), which orders llama.cpp's merges as HF orders
its own provided the merges are complete and those of one token adjacent (checked; otherwise refused, naming what
is missing).

HF's added tokens (``<s>``, ``</s>``, ``<unk>``, Llava's ``<image>``, ...) are written as control tokens (special)
or user-defined ones (not special: llama.cpp splits them out of any text, as HF does), score -1000. Token ids the
tokenizer does not fill up to the model's embedding rows are unused ``[PAD<i>]`` tokens of score -10000.

Where the two runtimes differ by design (not representable in the file): llama.cpp puts its "▁" before *every* piece
of text, also one starting with a space and one following a special token; transformers 5's Metaspace adds none
before a text that starts with a space, and with ``legacy=False`` (prepend scheme "first") none after a special
token. sentencepiece itself does what llama.cpp does.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# token types (llama_token_type; SentencePiece's ModelProto.SentencePiece.Type has the same numbers)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
ADDED_SCORE, PAD_SCORE = -1000.0, -10000.0
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPM_TYPES = {1: "unigram", 2: "BPE", 3: "word", 4: "char"}


@dataclass
class SentencePieceModel:
    """What the export reads from a ``tokenizer.model``: its pieces (text, score, type), the model type (1 unigram,
    2 BPE, 3 word, 4 char) and whether the normalizer adds a dummy "▁" prefix."""

    pieces: list[tuple[str, float, int]]
    model_type: int = 1
    add_dummy_prefix: bool = True


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message: an int (varint), bytes (length-delimited) or the raw
    4 / 8 bytes of a fixed32 / fixed64 field."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
            if len(value) != n:
                raise ValueError("truncated field")
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + n], pos + n
            if len(value) != n:
                raise ValueError("truncated field")
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def read_sentencepiece_model(path: str | Path) -> SentencePieceModel:
    """Parse a SentencePiece ``ModelProto`` (field numbers of sentencepiece_model.proto: pieces 1 {piece 1, score 2,
    type 3}, trainer_spec 2 {model_type 3}, normalizer_spec 3 {add_dummy_prefix 3}); ValueError naming the file if
    it is not one."""
    model = SentencePieceModel(pieces=[])
    try:
        for number, wire, value in _fields(Path(path).read_bytes()):
            if number == 1 and wire == 2:
                piece, score, kind = "", 0.0, NORMAL
                for n, w, v in _fields(value):
                    if n == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif n == 2 and w == 5:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3 and w == 0:
                        kind = v
                model.pieces.append((piece, score, kind))
            elif number == 2 and wire == 2:
                model.model_type = next((v for n, w, v in _fields(value) if n == 3 and w == 0), 1)
            elif number == 3 and wire == 2:
                model.add_dummy_prefix = bool(next((v for n, w, v in _fields(value) if n == 3 and w == 0), 1))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
    if not model.pieces:
        raise ValueError(f"{path}: not a SentencePiece model (no pieces)")
    return model


def whitespace_scheme(tj: dict[str, Any]) -> bool | None:
    """Whether a tokenizer.json's BPE is SentencePiece-style, and then whether it puts "▁" before the text: True /
    False; None if spaces are not replaced by "▁" (not SentencePiece-style). Two forms exist: a Metaspace
    pre-tokenizer (transformers 5; prepend scheme "always" / "first" or "never"), or the normalizer
    Prepend("▁") + Replace(" ", "▁") of older tokenizer.json files. A Metaspace that splits words is refused."""
    pre = tj.get("pre_tokenizer") or {}
    norm = tj.get("normalizer") or {}
    norms = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    if pre.get("type") == "Metaspace" and pre.get("replacement") == "▁":
        if pre.get("split"):
            raise ValueError(
                "GGUF export: a Metaspace pre-tokenizer that splits words (split=true) has no llama.cpp counterpart"
            )
        return pre.get("prepend_scheme", "always") != "never"
    replaces = any(
        n.get("type") == "Replace" and (n.get("pattern") or {}).get("String") == " " and n.get("content") == "▁"
        for n in norms
    )
    if pre or not replaces:
        return None
    return any(n.get("type") == "Prepend" and n.get("prepend") == "▁" for n in norms)


def _spm_file(tokenizer: Any) -> Path | None:
    """The tokenizer.model the tokenizer was loaded with, if it is still there."""
    for candidate in (
        getattr(tokenizer, "vocab_file", None),
        (getattr(tokenizer, "init_kwargs", None) or {}).get("vocab_file"),
    ):
        if isinstance(candidate, str) and candidate.endswith(".model") and Path(candidate).is_file():
            return Path(candidate)
    folder = getattr(tokenizer, "name_or_path", None)
    if folder and (Path(folder) / "tokenizer.model").is_file():
        return Path(folder) / "tokenizer.model"
    return None


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def scores_from_merges(vocab: dict[str, int], merges: list[tuple[str, str]]) -> dict[str, float]:
    """Scores under which llama.cpp's highest-score-first merging is HF's lowest-rank-first BPE: minus the rank of
    the first merge making each token (0 for tokens no merge makes: llama.cpp never looks up their score).

    Equivalent when every two tokens concatenating to a token are a merge (llama.cpp merges any such pair) and the
    merges making one token are adjacent in rank (so scores keep the ranks' order); ValueError naming the first
    pair or token where this fails."""
    merge_set = set(merges)
    scores: dict[str, float] = {}
    last_result = None
    for rank, (left, right) in enumerate(merges):
        result = left + right
        if result not in vocab:
            raise ValueError(f"merge {rank} ({left!r}, {right!r}) makes {result!r}, which is not a token")
        if result in scores and result != last_result:
            raise ValueError(f"the merges making {result!r} are not adjacent (rank {rank}), unlike SentencePiece's")
        scores.setdefault(result, -float(rank))
        last_result = result
    for token in vocab:
        for cut in range(1, len(token)):
            pair = (token[:cut], token[cut:])
            if pair[0] in vocab and pair[1] in vocab and pair not in merge_set:
                raise ValueError(f"{pair} concatenate to the token {token!r} but are not a merge")
    return {t: scores.get(t, 0.0) for t in vocab}


def sentencepiece_vocab(
    tokenizer: Any, tj: dict[str, Any], vocab_size: int
) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types), `vocab_size` long, of a SentencePiece-style BPE tokenizer (its tokenizer.json
    `tj`); see the module docstring."""
    model = tj["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    added = {int(t["id"]): t for t in tj.get("added_tokens", [])}
    n = max([*vocab.values(), *added]) + 1
    if n > vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens but the model only {vocab_size} embedding rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [PAD_SCORE] * vocab_size
    types = [UNUSED] * vocab_size
    path = _spm_file(tokenizer)
    if path is not None:
        spm = read_sentencepiece_model(path)
        if spm.model_type != 2:
            raise ValueError(
                f"{path}: a SentencePiece {_SPM_TYPES.get(spm.model_type, spm.model_type)} model; GGUF export "
                "supports SentencePiece BPE"
            )
        by_id = {i: t for t, i in vocab.items()} | {i: t["content"] for i, t in added.items()}
        for tid, (piece, score, kind) in enumerate(spm.pieces[:vocab_size]):
            if tid in by_id and by_id[tid] != piece:
                raise ValueError(
                    f"{path}: piece {tid} is {piece!r} but the tokenizer's token {tid} is {by_id[tid]!r} (a "
                    "tokenizer.model of another tokenizer?)"
                )
            tokens[tid], scores[tid] = piece, score
            # SentencePiece's user-defined pieces are matched like any other by llama.cpp (llama.cpp's converter
            # does the same); HF's, its added tokens, are typed below
            types[tid] = NORMAL if kind == USER_DEFINED else kind
    else:
        derived = scores_from_merges(vocab, _merge_pairs(model))
        for text, tid in vocab.items():
            tokens[tid], scores[tid] = text, derived[text]
            types[tid] = BYTE if _BYTE_TOKEN.fullmatch(text) else NORMAL
        if model.get("unk_token") in vocab:
            types[vocab[model["unk_token"]]] = UNKNOWN
    for tid, tok in added.items():
        special = bool(tok.get("special"))
        tokens[tid] = tok["content"] if special else tok["content"].replace("▁", " ")
        scores[tid] = ADDED_SCORE
        types[tid] = CONTROL if special else USER_DEFINED
    return tokens, scores, types


def is_sentencepiece_bpe(tj: dict[str, Any]) -> bool:
    """A tokenizer.json BPE with byte fallback whose spaces become "▁" (not byte-level)."""
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return False
    return whitespace_scheme(tj) is not None


def describe(tj: dict[str, Any]) -> str:
    """A tokenizer.json's kind in a few words, for refusals."""
    model = tj.get("model") or {}
    kind = model.get("type") or "unknown"
    pre = (tj.get("pre_tokenizer") or {}).get("type")
    if kind == "Unigram":
        return "a Unigram tokenizer (e.g. a SentencePiece unigram model)"
    if kind == "BPE" and (pre == "Metaspace" or "▁" in json.dumps(tj.get("normalizer"), ensure_ascii=False)):
        if not model.get("byte_fallback"):
            return "a SentencePiece-style BPE without byte fallback"
        # e.g. Gemma's (a Split pre-tokenizer after its normalizer): not written until tested against llama.cpp's
        return (
            f"a SentencePiece-style BPE with a {pre} pre-tokenizer, which llama.cpp's `llama` tokenizer does not have"
        )
    return f"a {kind} tokenizer (pre-tokenizer {pre})"
