"""Builders for the train / eval tests: a tiny random Llama saved as a local Hugging Face folder with a tiny
ChatML tokenizer (digits split, so the embedded tasks tokenize as they do for real models), and JSONL files.
All of it takes well under a second."""

from __future__ import annotations

import json
from pathlib import Path

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def chat_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(["system user assistant\nAdd the two numbers. Reverse the digits. 0123456789 + "] * 20,
                           trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML)


def save_tiny_llama(folder: Path, *, max_position_embeddings: int = 256, seed: int = 0) -> Path:
    """A random-init 2-layer Llama (hidden 48) + its tokenizer in `folder` (config.json, safetensors, tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = chat_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
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
