"""SentencePiece BPE tokenizers (Llama-2 / Vicuna / Mistral 7B v0.1 style) as llama.cpp's `llama` tokenizer model.

On a tiny SentencePiece BPE trained on the spot (tests/tiny_spm.py: a Hub-style folder with tokenizer.model,
tokenizer.json and tokenizer_config.json, plus Llava's <image> / <pad> added tokens):

* our tokenizer metadata equals, key for key and value for value, what llama.cpp's converter
  (convert_hf_to_gguf.py, with sentencepiece) writes for the same folder;
* llama.cpp, reading our file, tokenizes like HF wherever the two runtimes agree by design (text that starts with no
  whitespace; with ``legacy=True`` also text right after a special token), and everywhere as sentencepiece does:
  each piece of text between special tokens gets one "▁" before it (the module docstring of
  quickloris.export.tokenizer_spm says where transformers 5 differs); unknown characters become byte tokens;
* without tokenizer.model the scores made from HF's merges tokenize the same;
* tokenizers we cannot write are refused in one line.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import gguf
import pytest

from quickloris.export import export_gguf
from quickloris.export.tokenizer_spm import read_sentencepiece_model, scores_from_merges
from tests.export import llama_cpp_ref as ref
from tests.helpers import missing_dependency, require
from tests.tiny import family_model, tiny_model

PLAIN = [
    "The quick brown fox jumps over the lazy dog 12345 times.",
    "hello world  with  double spaces and a trailing one ",
    "tabs\tand\nnew lines\n\nhere",
    "Ünïcødé café, 日本語のテキスト and emoji 🦥 (bytes not in the vocabulary)",
    "what is this? 3.14159 -7",
    "\ta tab first",
]
LEADING = [" in a few words", "  two spaces first", " \tthen a tab"]
SPECIAL = ["Describe<image>this picture</s>", "USER: <image>\nwhat is this? ASSISTANT:", "a<pad> b</s>c"]
VICUNA = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}{% else %}"
    "{{ 'ASSISTANT: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CONFIGS = {
    "legacy-false": dict(legacy=False, chat_template=VICUNA),
    "legacy-true": dict(legacy=True),
    "no-prefix": dict(add_prefix_space=False),
}


@pytest.fixture(scope="module")
def spm_tokenizers(tmp_path_factory):
    require("sentencepiece")
    require("google.protobuf")
    from tests.tiny_spm import spm_tokenizer

    root = tmp_path_factory.mktemp("spm")
    return {name: spm_tokenizer(root / name, **kw) for name, kw in CONFIGS.items()}


def _model(tok, extra_rows: int = 3, family: str = "llama"):
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family != "llama":  # Mistral 7B v0.1 and Phi-3 / 3.5 carry the Llama-2 tokenizer too
        return family_model(family, vocab_size=len(tok) + extra_rows, **ids)
    return tiny_model("llama", vocab_size=len(tok) + extra_rows, hidden=32, layers=1, heads=2, kv_heads=1, **ids)


def _fields(path) -> dict:
    return {k: v.contents() for k, v in gguf.GGUFReader(path).fields.items() if k.startswith("tokenizer.")}


PARITY = [("llama", "legacy-false"), ("llama", "no-prefix"), ("mistral", "legacy-true"), ("phi3", "legacy-false")]


@pytest.fixture(scope="module")
def converted(spm_tokenizers, tmp_path_factory):
    """(family, name) -> (our F32 file, the converter's), every folder converted in one subprocess."""
    try:
        ref.source_tree()
    except Exception as e:  # noqa: BLE001 - no network / pip: the reference is missing, say so in one line
        missing_dependency("llama.cpp's converter", f"the llama-cpp-python sdist could not be fetched ({e})")
    root = tmp_path_factory.mktemp("spm-parity")
    pairs, steps = {}, []
    for family, name in PARITY:
        tok = spm_tokenizers[name]
        model = _model(tok, family=family)
        folder = root / f"{family}-{name}"
        model.save_pretrained(folder)
        for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):  # the tokenizer's folder as it is
            shutil.copy(Path(tok.name_or_path) / f, folder / f)
        pairs[family, name] = (root / f"{family}-{name}-ours.gguf", root / f"{family}-{name}-ref.gguf")
        export_gguf(model, pairs[family, name][0], tokenizer=tok, quant="f32")
        steps.append(ref.hf_step(folder, pairs[family, name][1], "f32"))
    ref.run_steps(steps, vocab=True)
    return pairs


@pytest.mark.parametrize("family, name", PARITY, ids=[f"{f}-{n}" for f, n in PARITY])
def test_metadata_equals_llama_cpp_converter(family, name, converted, spm_tokenizers):
    ours, theirs = (_fields(p) for p in converted[family, name])
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key] == value, key
    n = len(spm_tokenizers[name])
    assert ours["tokenizer.ggml.model"] == "llama" and ours["tokenizer.ggml.tokens"][-1] == f"[PAD{n + 2}]"


def _llama_cpp_rule(tok, text: str, prefix: bool) -> list[int]:
    """sentencepiece's (and llama.cpp's) tokenization of `text` with special tokens: the text split at every added
    token; each piece of text between them tokenized on its own, after one space when `prefix`. (HF on a text that
    starts with a space puts no further "▁" before it, so HF(" " + piece) is that piece's tokenization.)"""
    specials = sorted((t.content for t in tok.added_tokens_decoder.values()), key=len, reverse=True)
    out = []
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        if part in specials:
            out.append(tok.convert_tokens_to_ids(part))
        elif part:
            out += tok((" " + part) if prefix else part, add_special_tokens=False)["input_ids"]
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_llama_cpp_tokenizes_like_hf(name, spm_tokenizers, tmp_path, llama_cpp_available):
    import llama_cpp
    import sentencepiece

    tok = spm_tokenizers[name]
    prefix = CONFIGS[name].get("add_prefix_space", True)
    path = tmp_path / "tok.gguf"
    export_gguf(_model(tok), path, tokenizer=tok, quant="f32")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(Path(tok.name_or_path) / "tokenizer.model"))
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in PLAIN:  # exactly HF's, the bos added as HF adds it, and back to the text
            ids = llm.tokenize(text.encode(), add_bos=False, special=False)
            assert ids == tok(text, add_special_tokens=False)["input_ids"], text
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok(text)["input_ids"], text
            # (llama-cpp-python's detokenize keeps the "▁" put before the text, as a space)
            assert llm.detokenize(ids).decode() == " " * prefix + text
            if prefix:  # and sentencepiece's own
                assert ids == sp.encode(text), text
        assert any(t >= 3 and t < 3 + 256 for t in llm.tokenize(PLAIN[3].encode(), add_bos=False)), "no byte token"
        for text in LEADING:  # sentencepiece's "▁" before a leading space too: HF(" " + text), not HF(text)
            ids = llm.tokenize(text.encode(), add_bos=False, special=False)
            assert ids == _llama_cpp_rule(tok, text, prefix), text
            if prefix:
                assert ids == sp.encode(text) and ids != tok(text, add_special_tokens=False)["input_ids"], text
            else:
                assert ids == tok(text, add_special_tokens=False)["input_ids"], text
        for text in SPECIAL:  # added tokens split out; each piece of text as above
            ids = llm.tokenize(text.encode(), add_bos=False, special=True)
            assert ids == _llama_cpp_rule(tok, text, prefix), text
        # where a special token is followed by text that starts with no space: HF's own, unless legacy=False
        # (transformers 5 puts no "▁" after a special token then; llama.cpp and sentencepiece do)
        glued = "Describe<image>this"
        hf = tok(glued, add_special_tokens=False)["input_ids"]
        ours = llm.tokenize(glued.encode(), add_bos=False, special=True)
        same = CONFIGS[name].get("legacy") is True or not prefix
        assert (ours == hf) == same, (name, ours, hf)
        assert (llm.token_bos(), llm.token_eos()) == (tok.bos_token_id, tok.eos_token_id)
        assert llm.tokenize(b"<image>", add_bos=False, special=True) == [tok.convert_tokens_to_ids("<image>")]
    finally:
        llm.close()


def test_scores_from_merges_without_tokenizer_model(spm_tokenizers, tmp_path, llama_cpp_available):
    """A folder without tokenizer.model (tokenizer.json alone): scores from HF's merges; llama.cpp tokenizes as with
    the SentencePiece scores."""
    import llama_cpp
    from transformers import AutoTokenizer

    tok = spm_tokenizers["legacy-true"]
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tok.name_or_path) / f, bare / f)
    tok_json = AutoTokenizer.from_pretrained(str(bare))
    model = _model(tok)
    export_gguf(model, tmp_path / "json.gguf", tokenizer=tok_json, quant="f32")
    export_gguf(model, tmp_path / "spm.gguf", tokenizer=tok, quant="f32")
    a, b = _fields(tmp_path / "json.gguf"), _fields(tmp_path / "spm.gguf")
    assert a["tokenizer.ggml.scores"] != b["tokenizer.ggml.scores"]  # made from the merges, not read
    assert {k: v for k, v in a.items() if k != "tokenizer.ggml.scores"} == {
        k: v for k, v in b.items() if k != "tokenizer.ggml.scores"
    }
    llms = [
        llama_cpp.Llama(model_path=str(tmp_path / f), vocab_only=True, verbose=False) for f in ("json.gguf", "spm.gguf")
    ]
    try:
        for text in PLAIN + LEADING + SPECIAL:
            ids = [llm.tokenize(text.encode(), add_bos=False, special=True) for llm in llms]
            assert ids[0] == ids[1], text
    finally:
        for llm in llms:
            llm.close()


def test_scores_from_merges_refuses_what_llama_cpp_would_merge_otherwise():
    vocab = {c: i for i, c in enumerate(["a", "b", "c", "ab", "bc", "abc"])}
    good = [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c")]
    assert scores_from_merges(vocab, good) == {"a": 0.0, "b": 0.0, "c": 0.0, "ab": -0.0, "bc": -1.0, "abc": -2.0}
    with pytest.raises(ValueError, match=r"\('ab', 'c'\) concatenate to the token 'abc' but are not a merge"):
        scores_from_merges(vocab, good[:3])
    with pytest.raises(ValueError, match="the merges making 'abc' are not adjacent"):
        scores_from_merges(vocab, [("a", "b"), ("a", "bc"), ("b", "c"), ("ab", "c")])


def test_sentencepiece_model_reader(spm_tokenizers, tmp_path):
    sentencepiece = require("sentencepiece")
    path = Path(spm_tokenizers["legacy-false"].name_or_path) / "tokenizer.model"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    model = read_sentencepiece_model(path)
    assert model.model_type == 2 and model.add_dummy_prefix
    assert len(model.pieces) == sp.vocab_size()
    for i, (piece, score, kind) in enumerate(model.pieces):
        assert (piece, score) == (sp.IdToPiece(i), sp.GetScore(i))
        assert kind == (2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 6 if sp.IsByte(i) else 1), i
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match=f"{re.escape(str(bad))}: not a SentencePiece model"):
        read_sentencepiece_model(bad)


def _unigram_folder(folder):
    """A tokenizer.json Unigram (as transformers converts a SentencePiece unigram model, e.g. T5's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(f"▁{w}", -1.0 - i) for i, w in enumerate("abcdefgh")]
    tk = Tokenizer(models.Unigram(vocab, unk_id=0))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _wordpiece_folder(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordPiece({"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "a": 3, "##b": 4}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", eos_token="[SEP]"
    )


@pytest.mark.parametrize(
    "kind, words",
    [("unigram", "a Unigram tokenizer (e.g. a SentencePiece unigram model)"), ("wordpiece", "a WordPiece tokenizer")],
)
def test_unsupported_tokenizers_are_one_line(kind, words, tmp_path, cli_error):
    tok = (_unigram_folder if kind == "unigram" else _wordpiece_folder)(tmp_path)
    model = tiny_model("llama", vocab_size=len(tok), hidden=32, layers=1, heads=2, kv_heads=1)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    message = cli_error(
        ["export", "gguf", "--model", tmp_path / "model", "--out", tmp_path / "x.gguf", "--quant", "f32"],
        after_load=True,
    )
    assert message.startswith("GGUF export supports byte-level BPE and SentencePiece BPE tokenizers; this one is "), (
        message
    )
    assert words in message, message
    assert not (tmp_path / "x.gguf").exists()


def test_gemma_tokenizer_is_refused_in_one_line():
    """Gemma's SentencePiece tokenizer (transformers 5: Replace(" ", "▁") then a Split pre-tokenizer, no "▁" prefix)
    is not written until it is tested against llama.cpp's Gemma converter: refused, naming what differs."""
    from transformers import GemmaTokenizer

    from quickloris.export.tokenizer import tokenizer_metadata

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "a", "b", "ab"])}
    tok = GemmaTokenizer(vocab=vocab, merges=[("a", "b")])
    with pytest.raises(ValueError) as err:
        tokenizer_metadata(tok, vocab_size=16)
    assert str(err.value) == (
        "GGUF export supports byte-level BPE and SentencePiece BPE tokenizers; this one is a SentencePiece-style BPE "
        "with a Split pre-tokenizer, which llama.cpp's `llama` tokenizer does not have (GemmaTokenizer)"
    )


def test_a_unigram_tokenizer_model_is_refused(spm_tokenizers, tmp_path):
    """A BPE tokenizer.json beside a SentencePiece unigram tokenizer.model: which one llama.cpp would follow is
    unclear, so neither is written."""
    sentencepiece = require("sentencepiece")
    import io

    from tests.tiny_spm import _corpus

    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(200)), model_writer=buf, vocab_size=120, model_type="unigram", minloglevel=2
    )
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    tok = spm_tokenizers["legacy-false"]
    saved = tok.vocab_file
    tok.vocab_file = str(tmp_path / "tokenizer.model")
    try:
        with pytest.raises(ValueError, match="tokenizer.model: a SentencePiece unigram model; GGUF export supports "):
            export_gguf(_model(tok), tmp_path / "x.gguf", tokenizer=tok, quant="f32")
    finally:
        tok.vocab_file = saved
