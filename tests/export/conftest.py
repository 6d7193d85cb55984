"""Fixtures for the GGUF export tests: llama.cpp's ggml quantizer (through llama-cpp-python's bundled
library), tiny byte-level BPE tokenizers trained on the spot, tiny random Llama-family models, and
llama.cpp / HF logits. Helpers are handed to tests as fixtures (pytest imports test files with
importlib, so they cannot import each other)."""

from __future__ import annotations

import numpy as np
import pytest

from quickloris.export import ggml_reference
from tests.helpers import missing_dependency, require


_CORPUS = ["The quick brown fox jumps over the lazy dog 12345 times.", "Hello world! def f(x): return x * 2\n",
           "Ünïcødé 日本語のテキスト, numbers 2024 and 3.14159;  spaces\tand\ttabs",
           "I'm sure they'll say we've done it"]


def make_tokenizer(pre: str, vocab_size: int = 400):
    """Train a tiny byte-level BPE with the pre-tokenizer llama.cpp calls `pre`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from quickloris.export.tokenizer import _LLAMA3_REGEX, _QWEN2_REGEX

    tk = Tokenizer(models.BPE())
    if pre == "gpt-2":
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif pre == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif pre in ("llama-bpe", "qwen2"):
        regex = _LLAMA3_REGEX if pre == "llama-bpe" else _QWEN2_REGEX
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise ValueError(pre)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>")


def tiny_model(kind: str = "llama", *, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, inter: int = 128, tied: bool = False, **extra):
    """A random-init Llama / Mistral / Qwen2 / Qwen3 causal LM of tiny size (real architecture, fp32, eval mode)."""
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    config_cls, model_cls = classes[kind]
    cfg = config_cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                     tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1, pad_token_id=2, **extra)
    model = model_cls(cfg).eval()
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
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=2, n_batch=256, logits_all=True, verbose=False,
                          type_k=0, type_v=0)
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

    return types.SimpleNamespace(make_tokenizer=make_tokenizer, tiny_model=tiny_model,
                                 llama_cpp_logits=llama_cpp_logits, hf_logits=hf_logits)
