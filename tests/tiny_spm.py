"""A tiny SentencePiece BPE tokenizer laid out as the Hub's Llama-2 / Vicuna / Llava-1.5 checkpoints lay theirs out.

`spm_tokenizer(folder)` trains a SentencePiece BPE model (byte fallback, digits split, whitespace kept, ids 0-2
<unk> <s> </s>: Llama-2's settings) on generated text with the `sentencepiece` trainer, and writes into `folder`:

* ``tokenizer.model`` (the SentencePiece model),
* ``tokenizer.json`` (transformers' conversion of it, as `save_pretrained` writes it),
* ``tokenizer_config.json`` with the keys transformers 4 wrote and the Hub's checkpoints carry: ``add_bos_token``
  true, ``add_eos_token`` false, ``legacy``, ``added_tokens_decoder`` (every added token by id) and, if given,
  ``add_prefix_space``,

with HF added tokens beyond the SentencePiece model (Llava-1.5's ``<image>`` and ``<pad>`` by default), and returns the
tokenizer loaded from the folder (`AutoTokenizer`: transformers' `LlamaTokenizer`, whose ``vocab_file`` is the
folder's tokenizer.model). Needs `sentencepiece` and `protobuf` (transformers reads the model with them).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

WORDS = (
    "the quick brown fox jumps over lazy dog hello world describe image in a few words picture cat what is this "
    "there are two numbers answer question user assistant colour red green blue shape circle square"
).split()
UNICODE = ["Ünïcødé café naïve", "日本語 の 文字", "tabs\tand\nnew lines", "x  double  spaces  "]


def _corpus(n: int = 1500) -> list[str]:
    rng = random.Random(0)
    lines = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + f" {rng.randint(0, 99999)}." for _ in range(n)
    ]
    return lines + UNICODE * 20


def spm_tokenizer(
    folder,
    *,
    legacy: bool = False,
    add_prefix_space: bool | None = None,
    added: tuple[tuple[str, bool], ...] = (("<image>", True), ("<pad>", True)),
    vocab_size: int = 400,
    chat_template: str | None = None,
):
    """The tokenizer described above, written into `folder`. `added`: (content, special) of the HF added tokens
    after the SentencePiece pieces; "<pad>" among them becomes the pad token."""
    import sentencepiece as spm
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    hub = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": legacy}
    if add_prefix_space is not None:
        hub["add_prefix_space"] = add_prefix_space
    if chat_template is not None:
        hub["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(hub))
    tok = AutoTokenizer.from_pretrained(str(folder))
    for content, special in added:
        token = AddedToken(content, special=special, normalized=False)
        if content == "<pad>":
            tok.add_special_tokens({"pad_token": token})
        else:
            tok.add_tokens([token], special_tokens=special)
    tok.save_pretrained(str(folder))
    saved = json.loads((folder / "tokenizer_config.json").read_text())
    hub["added_tokens_decoder"] = {
        str(i): {
            "content": t.content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
        for i, t in sorted(tok.added_tokens_decoder.items())
    }
    (folder / "tokenizer_config.json").write_text(json.dumps({**saved, **hub}, indent=2))
    return AutoTokenizer.from_pretrained(str(folder))
