"""Tiny random-init models of the GGUF families beyond Llama (Gemma-2, Gemma-3 text, Phi-3, Mistral-Nemo and
Qwen2.5 shapes), the HF reference with ggml's GELU, and llama.cpp / HF logits of them.

Sizes: hidden 64 (256 where K-quants need rows of 256), 2 layers (Gemma-3: 6, for one global layer among five
sliding ones), 4 heads over 2 KV heads, head_dim 16, a sliding window of 8 tokens so that the ~30-token prompts
cross it, and softcaps low enough (1.5 / 3.0) that tanh bends the scores and logits.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

TEXT = "The quick brown fox jumps over the lazy dog 12345 times. def f(x): return x * 2"

_IDS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)


def family_config(
    kind: str,
    *,
    vocab_size: int,
    hidden: int = 64,
    layers: int | None = None,
    heads: int = 4,
    kv_heads: int = 2,
    inter: int = 128,
    **extra,
):
    """The transformers config of a tiny `kind` model: gemma2, gemma3, phi3, mistral (Nemo-shaped: head_dim 16
    with hidden 96 / 4 heads = 24), qwen2 (Qwen2.5-shaped: biases, tied, 6 heads over 2)."""
    import transformers

    layers = layers or (6 if kind == "gemma3" else 2)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        **_IDS,
    )
    if kind in ("gemma2", "gemma3"):
        common.update(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, final_logit_softcapping=3.0)
        if kind == "gemma2":
            common.update(attn_logit_softcapping=1.5)
            cls = transformers.Gemma2Config
        else:
            cls = transformers.Gemma3TextConfig
    elif kind == "phi3":
        common.update(original_max_position_embeddings=512, tie_word_embeddings=False)
        cls = transformers.Phi3Config
    elif kind == "mistral":
        common.update(hidden_size=96, head_dim=16, tie_word_embeddings=False)
        cls = transformers.MistralConfig
    elif kind == "qwen2":
        common.update(hidden_size=96, num_attention_heads=6, tie_word_embeddings=True)
        cls = transformers.Qwen2Config
    else:
        raise ValueError(kind)
    common.update(extra)
    return cls(**common)


def family_model(kind: str, *, vocab_size: int, **config):
    """A random-init tiny causal LM of `family_config(kind, ...)` (fp32, eval mode, eager attention), with
    weights larger than HF's init so that a wrong mapping shows in the logits; Gemma's norm weights are drawn
    around 0 (the model computes 1 + w), the others' around 1."""
    import transformers

    cfg = family_config(kind, vocab_size=vocab_size, **config)
    cls = {
        "gemma2": "Gemma2ForCausalLM",
        "gemma3": "Gemma3ForCausalLM",
        "phi3": "Phi3ForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
    }[kind]
    cfg._attn_implementation = "eager"  # HF's sdpa path has no softcap
    model = getattr(transformers, cls)(cfg).eval()
    gemma = kind.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "norm" in name:
                p.normal_(0, 0.3) if gemma else p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    return model


def ggml_gelu(x: torch.Tensor) -> torch.Tensor:
    """ggml's CPU GELU (also inside its fused GEGLU): x rounded to fp16, the tanh approximation looked up in a
    table of fp16 values (0 below -10, x above 10). llama.cpp's Gemma graphs compute with this, so the reference
    does too: it is the one place where llama.cpp's F32 arithmetic is not float32."""
    x16 = x.to(torch.float16).float()
    g = 0.5 * x16 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * x16 * (1.0 + 0.044715 * x16 * x16)))
    g = g.to(torch.float16).float()
    return torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, g))


class GGMLGelu(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ggml_gelu(x)


@contextlib.contextmanager
def ggml_activation(model):
    """Within the block, the Gemma MLPs of `model` (a PeftModel too) use `ggml_gelu`."""
    mlps = [m for m in model.modules() if type(m).__name__ in ("Gemma2MLP", "Gemma3MLP")]
    saved = [m.act_fn for m in mlps]
    for m in mlps:
        m.act_fn = GGMLGelu()
    try:
        yield model
    finally:
        for m, act in zip(mlps, saved):
            m.act_fn = act


def hf_logits(model, ids: list[int], *, ggml_act: bool = True) -> np.ndarray:
    """HF's logits [len(ids), vocab]; Gemma MLPs with ggml's GELU unless `ggml_act` is False."""
    with torch.no_grad(), ggml_activation(model) if ggml_act else contextlib.nullcontext():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def llama_cpp_logits(path, ids: list[int], n_ctx: int = 256) -> np.ndarray:
    """llama.cpp's logits [len(ids), vocab] of the GGUF file `path` (F32 KV cache)."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_threads=2,
        n_batch=n_ctx,
        logits_all=True,
        verbose=False,
        type_k=0,
        type_v=0,
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|."""
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
