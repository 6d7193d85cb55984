"""Tiny random-init models of real architectures, shared by the tests (``from tests.tiny import tiny_model``).

`FAMILY_CONFIGS` holds one factory per family row: a transformers config of 2 layers, hidden 64, 4 query / 2 key-value
heads, vocab `VOCAB`, with what makes the family different switched on at a size a test can see (sliding windows
shorter than the test sequences, softcaps of the size of the logits, head_dim != hidden / heads for
Mistral-Nemo, fused projections for Phi-3). `tiny_model(row)` builds the ``*ForCausalLM`` (or, with
``classification=True``, the family's ``*ForSequenceClassification``), with weights drawn larger than HF's init
(std 0.08 for matrices, norms around 1: Gemma's zero-centred ``(1 + w)`` norms around 0) so that attention
patterns, softcaps and quantization errors show in the outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              attention_dropout=0.0)


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
    "mistral_nemo": (_cfg("MistralConfig", head_dim=24, sliding_window=None), "MistralForCausalLM",
                     "MistralForSequenceClassification"),
    "qwen2": (_cfg("Qwen2Config"), "Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    # Qwen2 with use_sliding_window: layer 0 full, layer 1 sliding (layers >= max_window_layers)
    "qwen2_swa": (_cfg("Qwen2Config", use_sliding_window=True, sliding_window=9, max_window_layers=1),
                  "Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "qwen3": (_cfg("Qwen3Config", head_dim=16), "Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
    "gemma2": (_cfg("Gemma2Config", head_dim=16, query_pre_attn_scalar=16, sliding_window=7,
                    attn_logit_softcapping=2.5, final_logit_softcapping=4.0, tie_word_embeddings=True),
               "Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
    "gemma3": (_cfg("Gemma3TextConfig", head_dim=16, query_pre_attn_scalar=16, sliding_window=7,
                    layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True),
               "Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
    "phi3": (_cfg("Phi3Config", sliding_window=13, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                    "partial_rotary_factor": 0.5}),
             "Phi3ForCausalLM", "Phi3ForSequenceClassification"),
}

# Unregistered decoder-only families (the generic path).
GENERIC_CONFIGS: dict[str, tuple[Callable[..., Any], str]] = {
    "olmo2": (_cfg("Olmo2Config"), "Olmo2ForCausalLM"),
    "smollm3": (_cfg("SmolLM3Config", no_rope_layers=[1, 0]), "SmolLM3ForCausalLM"),
    "starcoder2": (_cfg("Starcoder2Config", use_bias=True), "Starcoder2ForCausalLM"),
    # decoder at model.gpt_neox.layers, head model.embed_out, fused query_key_value (a plain Linear to quickloris)
    "gpt_neox": (_cfg("GPTNeoXConfig"), "GPTNeoXForCausalLM"),
    # logits / 4 after the head: the chunked loss cannot compute it, the model keeps its own loss
    "granite": (_cfg("GraniteConfig", logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5,
                     attention_multiplier=0.2), "GraniteForCausalLM"),
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


def tiny_config(row: str, **over: Any):
    if row in FAMILY_CONFIGS:
        return FAMILY_CONFIGS[row][0](**over)
    return GENERIC_CONFIGS[row][0](**over)


def tiny_model(row: str, *, classification: bool = False, num_labels: int = 3, dtype=torch.float32,
               **over: Any) -> torch.nn.Module:
    """A random-init model of family `row` (`FAMILY_CONFIGS` / `GENERIC_CONFIGS`), in eval mode."""
    import transformers

    if classification:
        over = {"num_labels": num_labels, **over}
    cfg = tiny_config(row, **over)
    if row in FAMILY_CONFIGS:
        cls = FAMILY_CONFIGS[row][2 if classification else 1]
    else:
        cls = GENERIC_CONFIGS[row][1]
    cfg._attn_implementation = "eager"  # the reference; prepare_model picks quickloris' backend
    model = getattr(transformers, cls)(cfg)
    return randomize(model).to(dtype).eval()
