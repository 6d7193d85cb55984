"""Tokenizer metadata: llama.cpp, reading our GGUF, tokenizes text exactly like the HF tokenizer."""

from __future__ import annotations

import gguf
import pytest

from quickloris.export import export_gguf
from quickloris.export.tokenizer import CONTROL, NORMAL, UNUSED, detect_pre_tokenizer, special_token_ids

TEXTS = [
    "The quick brown fox jumps over the lazy dog 12345 times.",
    "Numbers: 1 22 333 4444 55555 3.14159 -7",
    "I'm sure they'll say we've done it, DON'T they?",
    "  leading spaces\tand\ttabs\n\nnew lines  \n",
    "Ünïcødé 日本語のテキスト and emoji 🦥",
    "def f(x):\n    return x * 2  # code",
]


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_llama_cpp_tokenizes_like_hf(pre, tmp_path, helpers, llama_cpp_available):
    import llama_cpp

    tok = helpers.make_tokenizer(pre)
    model = helpers.tiny_model(vocab_size=len(tok) + 5, hidden=32, layers=1, heads=2, kv_heads=1, inter=64)
    path = str(tmp_path / "tok.gguf")
    export_gguf(model, path, tokenizer=tok, quant="f32")
    meta = gguf.GGUFReader(path)
    assert meta.fields["tokenizer.ggml.pre"].contents() == pre
    types = meta.fields["tokenizer.ggml.token_type"].contents()
    assert types[:3] == [CONTROL] * 3 and types[3] == NORMAL and types[-5:] == [UNUSED] * 5
    assert meta.fields["tokenizer.ggml.tokens"].contents()[-1] == f"[PAD{len(tok) + 4}]"
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    try:
        for text in TEXTS:
            ours = llm.tokenize(text.encode(), add_bos=False, special=False)
            assert ours == tok(text, add_special_tokens=False)["input_ids"], text
            assert llm.detokenize(ours).decode() == text
        assert llm.token_bos() == tok.bos_token_id and llm.token_eos() == tok.eos_token_id
    finally:
        llm.close()


def test_pre_tokenizer_detection():
    assert detect_pre_tokenizer({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    with pytest.raises(ValueError, match="unrecognised pre-tokenizer .* pass tokenizer_pre="):
        detect_pre_tokenizer(
            {
                "pre_tokenizer": {
                    "type": "Sequence",
                    "pretokenizers": [
                        {"type": "Split", "pattern": {"Regex": "\\s+"}},
                        {"type": "ByteLevel", "use_regex": False},
                    ],
                }
            }
        )


def test_special_ids_follow_the_generation_config():
    class Tok:
        bos_token_id, eos_token_id, unk_token_id, pad_token_id = 1, 1, 0, None

    class Cfg:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 2

    class Gen:
        eos_token_id = [7, 1]

    assert special_token_ids(Tok(), Cfg()) == {"bos": 1, "unk": 0, "pad": 2, "eos": 2}
    assert special_token_ids(Tok(), Cfg(), Gen())["eos"] == 1  # the tokenizer's eos is one of the config's


def test_tokenizer_larger_than_the_model_is_rejected(tmp_path, helpers, bpe_tokenizer):
    model = helpers.tiny_model(vocab_size=len(bpe_tokenizer) - 1, hidden=32, layers=1, heads=2, kv_heads=1, inter=64)
    n = len(bpe_tokenizer)
    with pytest.raises(ValueError, match=f"tokenizer has {n} tokens but the model only {n - 1} embedding rows"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer=bpe_tokenizer, quant="f32")
    assert not list(tmp_path.iterdir())
