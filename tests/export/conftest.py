"""Fixtures for the GGUF export tests: llama.cpp's ggml quantizer (through llama-cpp-python's bundled
library), tiny byte-level BPE tokenizers trained on the spot, tiny random Llama-family models, and
llama.cpp / HF logits. Helpers are handed to tests as fixtures (pytest imports test files with
importlib, so they cannot import each other)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from quickloris.export import ggml_reference
from tests.helpers import missing_dependency, require
from tests.tiny import bpe_tokenizer as shared_bpe_tokenizer
from tests.tiny import tiny_model as shared_tiny_model

# Every export module needs the C++ extension at import time. Missing, the collection errors out (as CI should)
# unless QUICKLORIS_TEST_ALLOW_MISSING=1, where this folder is left out and the header says so.
NATIVE_MISSING = importlib.util.find_spec("quickloris._native") is None
if NATIVE_MISSING and os.environ.get("QUICKLORIS_TEST_ALLOW_MISSING") == "1":
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header(config):
    if NATIVE_MISSING:
        return "tests/export: quickloris._native is not built (pip install -e . builds it)"
    return None


def make_tokenizer(pre: str, vocab_size: int = 400):
    """Train a tiny byte-level BPE with the pre-tokenizer llama.cpp calls `pre` (tests/tiny.py)."""
    return shared_bpe_tokenizer(pre, vocab_size)


def tiny_model(
    kind: str = "llama",
    *,
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    inter: int = 128,
    tied: bool = False,
    **extra,
):
    """A random-init Llama / Mistral / Qwen2 / Qwen3 causal LM of tiny size (real architecture, fp32, eval mode)."""
    import torch

    model = shared_tiny_model(
        kind,
        vocab_size=vocab_size,
        hidden=hidden,
        inter=inter,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        **extra,
    ).eval()
    with torch.no_grad():  # larger-than-init weights so that errors in the export show in the logits
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    return model


def llama_cpp_logits(path: str, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits [len(ids), vocab] for token ids `ids` of the GGUF file `path`."""
    import llama_cpp

    # F32 KV cache: the default F16 cache alone costs ~1e-3 relative in the logits
    llm = llama_cpp.Llama(
        model_path=path, n_ctx=256, n_threads=2, n_batch=256, logits_all=True, verbose=False, type_k=0, type_v=0
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.fixture(scope="session")
def ggml() -> ggml_reference.GGMLReference:
    ref = ggml_reference.load()
    if ref is None:  # the README's byte-equality claims rest on it: fail, never skip, where CI lacks it
        missing_dependency("llama_cpp", "make test builds llama-cpp-python (with its bundled libggml-base)")
    return ref


@pytest.fixture(scope="session")
def llama_cpp_available() -> None:
    require("llama_cpp")


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A 400-token byte-level BPE tokenizer (GPT-2 pre-tokenizer) with bos/eos/pad specials."""
    return make_tokenizer("gpt-2")


@pytest.fixture(scope="session")
def helpers():
    """The helper functions above, for tests: helpers.make_tokenizer / tiny_model / llama_cpp_logits / hf_logits."""
    import types

    return types.SimpleNamespace(
        make_tokenizer=make_tokenizer, tiny_model=tiny_model, llama_cpp_logits=llama_cpp_logits, hf_logits=hf_logits
    )


@pytest.fixture
def cli_error(capsys):
    """Run ``quickloris ARGV`` expecting a user error: exit status 2 and one line on stderr (``after_load``: the
    last line); returns the message after ``quickloris COMMAND: error: ``."""
    from quickloris.cli.main import main

    def run(argv: list, *, after_load: bool = False) -> str:
        capsys.readouterr()
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        if after_load:  # transformers' loading progress bars precede the error on stderr
            err = err[-1:]
        assert code == 2 and len(err) == 1, (code, err)
        prefix = f"quickloris {argv[0]}: error: "
        assert err[0].startswith(prefix), err
        return err[0][len(prefix) :]

    return run
