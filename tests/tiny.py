"""The tiny random models and tokenizers of the test suite, in one place.

* `tiny_config` / `tiny_model`: a random-init Llama / Mistral / Qwen2 / Qwen3 causal LM of real architecture
  (``from_config``: nothing downloaded), 2 layers, hidden 32, 4 heads over 2 KV heads unless told otherwise;
  `seed` fixes its weights, `std` redraws its matrices (sharper logits than HF's 0.02 init).
* `chat_tokenizer`: a ChatML byte-level BPE (320 tokens, digits split as SmolLM2 / Llama-3 split them), so the
  embedded tasks tokenize as they do for real models.
* `bpe_tokenizer`: a byte-level BPE with one of llama.cpp's pre-tokenizers (gpt-2, smollm, llama-bpe, qwen2).

Each builds in well under a second.
"""

from __future__ import annotations

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

ARCHS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
         "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def tiny_config(arch: str = "llama", *, vocab_size: int = 97, hidden: int = 32, inter: int | None = None,
                layers: int = 2, heads: int = 4, kv_heads: int = 2, **extra):
    """The transformers config of a tiny `arch` model; `extra` passes any other config field (head_dim, tie_word_
    embeddings, token ids, rope_parameters, sliding_window, ...). intermediate size: 2 x hidden by default."""
    import transformers

    config_cls = getattr(transformers, ARCHS[arch][0])
    return config_cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter or 2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, **extra)


def tiny_model(arch: str = "llama", *, seed: int | None = None, std: float | None = None, **config):
    """A random-init tiny causal LM (fp32; in training mode, as a constructed nn.Module is) of
    `tiny_config(arch, **config)`.

    seed: ``torch.manual_seed(seed)`` first (the same weights every time); std: redraw every matrix from
    N(0, std) (HF's 0.02 init leaves nearly flat logits; a larger std makes greedy choices far from ties)."""
    import torch
    import transformers

    cfg = tiny_config(arch, **config)
    if seed is not None:
        torch.manual_seed(seed)
    model = getattr(transformers, ARCHS[arch][1])(cfg)
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, std)
    return model


def chat_tokenizer():
    """A ChatML byte-level BPE of 320 tokens (<|endoftext|> pad, <|im_end|> eos, digits split one by one)."""
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


_CORPUS = ["The quick brown fox jumps over the lazy dog 12345 times.", "Hello world! def f(x): return x * 2\n",
           "Ünïcødé 日本語のテキスト, numbers 2024 and 3.14159;  spaces\tand\ttabs",
           "I'm sure they'll say we've done it"]


def bpe_tokenizer(pre: str = "gpt-2", vocab_size: int = 400, *, corpus: list[str] | None = None,
                  specials: tuple[str, ...] = ("<|bos|>", "<|eos|>", "<|pad|>"), add_bos: bool = False,
                  chat_template: str | None = None):
    """A byte-level BPE trained on the spot with the pre-tokenizer llama.cpp calls `pre` (gpt-2, smollm, llama-bpe,
    qwen2). specials: bos, eos, then optionally pad and more (a pad token only if "<|pad|>" is among them);
    add_bos: a post-processor puts the bos token before every text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
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
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator((corpus or _CORPUS) * 10, trainer)
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single=f"{specials[0]} $A", special_tokens=[(specials[0], 0)])
    extra = {"pad_token": "<|pad|>"} if "<|pad|>" in specials else {}
    if chat_template is not None:
        extra["chat_template"] = chat_template
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=specials[0], eos_token=specials[1], **extra)
