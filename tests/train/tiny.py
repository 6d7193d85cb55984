"""Builders for the train / eval tests: a tiny random Llama saved as a local Hugging Face folder with a tiny
ChatML tokenizer (digits split, so the embedded tasks tokenize as they do for real models), and JSONL files.
All of it takes well under a second."""

from __future__ import annotations

import json
from pathlib import Path

from tests.tiny import CHATML, chat_tokenizer, tiny_model  # noqa: F401  (CHATML, chat_tokenizer: re-exported)


def save_tiny_llama(
    folder: Path, *, max_position_embeddings: int = 256, seed: int = 0, heads: int = 4, kv_heads: int = 2
) -> Path:
    """A random-init 2-layer Llama (hidden 48) + its tokenizer in `folder` (config.json, safetensors, tokenizer).
    GPU tests with flex attention pass ``heads=3, kv_heads=1``: PyTorch's fused flex kernels need head_dim >= 16."""
    import torch

    tok = chat_tokenizer()
    model = tiny_model(
        seed=seed,
        vocab_size=len(tok),
        hidden=48,
        heads=heads,
        kv_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    with torch.no_grad():  # HF's 0.02 init leaves logits within ~±1: too flat for a LoRA to sharpen the tied head
        model.model.embed_tokens.weight.normal_(0, 0.3)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def task_rows(task: str, n: int, split: str = "train", seed: int = 0) -> list[dict]:
    from quickloris.data.tasks import get_task

    return [{"messages": ex.messages()} for ex in get_task(task).generate(split, n, seed)]
