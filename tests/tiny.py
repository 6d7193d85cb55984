"""The tiny random models and tokenizers of the test suite, in one place.

* `tiny_config` / `tiny_model`: a random-init Llama / Mistral / Qwen2 / Qwen3 causal LM of real architecture
  (``from_config``: nothing downloaded), 2 layers, hidden 32, 4 heads over 2 KV heads unless told otherwise;
  `seed` fixes its weights, `std` redraws its matrices (sharper logits than HF's 0.02 init).
* `chat_tokenizer`: a ChatML byte-level BPE (320 tokens, digits split as SmolLM2 / Llama-3 split them), so the
  embedded tasks tokenize as they do for real models.
* `bpe_tokenizer`: a byte-level BPE with one of llama.cpp's pre-tokenizers (gpt-2, smollm, llama-bpe, qwen2).

* `FAMILY_CONFIGS` / `GENERIC_CONFIGS`, `family_config` / `family_model`: one row per registered model family
  (and per generic-path family): 2 layers, hidden 64, 4 query / 2 key-value heads, vocab `VOCAB`, with what makes
  the family different switched on at a size a test can see (sliding windows shorter than the test sequences,
  softcaps of the size of the logits, head_dim != hidden / heads for Mistral-Nemo, fused projections for Phi-3);
  `family_model(row)` builds the ``*ForCausalLM`` (``classification=True``: the ``*ForSequenceClassification``)
  with weights drawn larger than HF's init (`randomize`) so attention patterns, softcaps and quantization errors
  show in the outputs.

Each builds in well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def tiny_config(
    arch: str = "llama",
    *,
    vocab_size: int = 97,
    hidden: int = 32,
    inter: int | None = None,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    **extra,
):
    """The transformers config of a tiny `arch` model; `extra` passes any other config field (head_dim, tie_word_
    embeddings, token ids, rope_parameters, sliding_window, ...). intermediate size: 2 x hidden by default."""
    import transformers

    config_cls = getattr(transformers, ARCHS[arch][0])
    return config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inter or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        **extra,
    )


def tiny_model(arch: str = "llama", *, seed: int | None = None, std: float | None = None, **config):
    """A random-init tiny causal LM (fp32; in training mode, as a constructed nn.Module is) of
    `tiny_config(arch, **config)`.

    seed: ``torch.manual_seed(seed)`` first (the same weights every time); std: redraw every matrix from
    N(0, std) (HF's 0.02 init leaves nearly flat logits; a larger std makes greedy choices far from ties)."""
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
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(
        ["system user assistant\nAdd the two numbers. Reverse the digits. 0123456789 + "] * 20, trainer
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
    )


_CORPUS = [
    "The quick brown fox jumps over the lazy dog 12345 times.",
    "Hello world! def f(x): return x * 2\n",
    "Ünïcødé 日本語のテキスト, numbers 2024 and 3.14159;  spaces\tand\ttabs",
    "I'm sure they'll say we've done it",
]


def bpe_tokenizer(
    pre: str = "gpt-2",
    vocab_size: int = 400,
    *,
    corpus: list[str] | None = None,
    specials: tuple[str, ...] = ("<|bos|>", "<|eos|>", "<|pad|>"),
    add_bos: bool = False,
    chat_template: str | None = None,
):
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
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif pre in ("llama-bpe", "qwen2"):
        regex = _LLAMA3_REGEX if pre == "llama-bpe" else _QWEN2_REGEX
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        raise ValueError(pre)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator((corpus or _CORPUS) * 10, trainer)
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single=f"{specials[0]} $A", special_tokens=[(specials[0], 0)])
    extra = {"pad_token": "<|pad|>"} if "<|pad|>" in specials else {}
    if chat_template is not None:
        extra["chat_template"] = chat_template
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=specials[0], eos_token=specials[1], **extra)


# ---- one row per model family ----------------------------------------------------------------------------------


VOCAB = 97
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    attention_dropout=0.0,
)


def _cfg(cls_name: str, **kw: Any) -> Callable[..., Any]:
    def make(**over: Any):
        import transformers

        return getattr(transformers, cls_name)(**{**COMMON, **kw, **over})

    return make


# row -> (config factory, causal-LM class, sequence-classification class)
FAMILY_CONFIGS: dict[str, tuple[Callable[..., Any], str, str]] = {
    "llama": (_cfg("LlamaConfig"), "LlamaForCausalLM", "LlamaForSequenceClassification"),
    "mistral": (_cfg("MistralConfig", sliding_window=11), "MistralForCausalLM", "MistralForSequenceClassification"),
    # Mistral-Nemo: head_dim 24 with hidden 64 / 4 heads = 16 (q: 96 rows, o: 96 columns)
    "mistral_nemo": (
        _cfg("MistralConfig", head_dim=24, sliding_window=None),
        "MistralForCausalLM",
        "MistralForSequenceClassification",
    ),
    "qwen2": (_cfg("Qwen2Config"), "Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    # Qwen2 with use_sliding_window: layer 0 full, layer 1 sliding (layers >= max_window_layers)
    "qwen2_swa": (
        _cfg("Qwen2Config", use_sliding_window=True, sliding_window=9, max_window_layers=1),
        "Qwen2ForCausalLM",
        "Qwen2ForSequenceClassification",
    ),
    "qwen3": (_cfg("Qwen3Config", head_dim=16), "Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
    "gemma2": (
        _cfg(
            "Gemma2Config",
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=7,
            attn_logit_softcapping=2.5,
            final_logit_softcapping=4.0,
            tie_word_embeddings=True,
        ),
        "Gemma2ForCausalLM",
        "Gemma2ForSequenceClassification",
    ),
    "gemma3": (
        _cfg(
            "Gemma3TextConfig",
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=7,
            layer_types=["sliding_attention", "full_attention"],
            tie_word_embeddings=True,
        ),
        "Gemma3ForCausalLM",
        "Gemma3TextForSequenceClassification",
    ),
    "phi3": (
        _cfg(
            "Phi3Config",
            sliding_window=13,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        ),
        "Phi3ForCausalLM",
        "Phi3ForSequenceClassification",
    ),
}

# Unregistered decoder-only families (the generic path).
GENERIC_CONFIGS: dict[str, tuple[Callable[..., Any], str]] = {
    "olmo2": (_cfg("Olmo2Config"), "Olmo2ForCausalLM"),
    "smollm3": (_cfg("SmolLM3Config", no_rope_layers=[1, 0]), "SmolLM3ForCausalLM"),
    "starcoder2": (_cfg("Starcoder2Config", use_bias=True), "Starcoder2ForCausalLM"),
    # decoder at model.gpt_neox.layers, head model.embed_out, fused query_key_value (a plain Linear to quickloris)
    "gpt_neox": (_cfg("GPTNeoXConfig"), "GPTNeoXForCausalLM"),
    # logits / 4 after the head: the chunked loss cannot compute it, the model keeps its own loss
    "granite": (
        _cfg(
            "GraniteConfig",
            logits_scaling=4.0,
            embedding_multiplier=2.0,
            residual_multiplier=0.5,
            attention_multiplier=0.2,
        ),
        "GraniteForCausalLM",
    ),
}


def randomize(model: torch.nn.Module, std: float = 0.08) -> torch.nn.Module:
    """Redraw the weights: matrices N(0, std); norm weights U(0.5, 1.5) (Gemma's zero-centred ones U(-0.5, 0.5));
    other vectors (biases) N(0, 0.1)."""
    zero_centred = "Gemma" in type(model).__name__
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
            elif "norm" in name:
                p.uniform_(-0.5, 0.5) if zero_centred else p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    return model


def family_config(row: str, **over: Any):
    if row in FAMILY_CONFIGS:
        return FAMILY_CONFIGS[row][0](**over)
    return GENERIC_CONFIGS[row][0](**over)


def family_model(
    row: str, *, classification: bool = False, num_labels: int = 3, dtype=torch.float32, **over: Any
) -> torch.nn.Module:
    """A random-init model of family `row` (`FAMILY_CONFIGS` / `GENERIC_CONFIGS`), in eval mode."""
    import transformers

    if classification:
        over = {"num_labels": num_labels, **over}
    cfg = family_config(row, **over)
    if row in FAMILY_CONFIGS:
        cls = FAMILY_CONFIGS[row][2 if classification else 1]
    else:
        cls = GENERIC_CONFIGS[row][1]
    cfg._attn_implementation = "eager"  # the reference; prepare_model picks quickloris' backend
    model = getattr(transformers, cls)(cfg)
    return randomize(model).to(dtype).eval()
