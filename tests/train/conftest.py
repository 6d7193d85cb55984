"""A tiny ChatML tokenizer and a tiny random Llama for the evaluation tests (both built in well under a second)."""

from __future__ import annotations

import pytest

from tests.tiny import chat_tokenizer as build_chat_tokenizer
from tests.tiny import tiny_model


@pytest.fixture(scope="session")
def chat_tokenizer():
    return build_chat_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(chat_tokenizer):
    # std 0.3: peaked logits, so greedy choices are far from ties
    return tiny_model(
        seed=0,
        std=0.3,
        vocab_size=len(chat_tokenizer),
        hidden=48,
        max_position_embeddings=256,
        eos_token_id=chat_tokenizer.eos_token_id,
        pad_token_id=chat_tokenizer.pad_token_id,
        bos_token_id=None,
    ).eval()
