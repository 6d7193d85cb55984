"""End to end through llama.cpp (llama-cpp-python) on tiny random models of the real architectures.

* an F32 export gives llama.cpp logits equal to HF's (to float noise): tensor names, q/k permutation,
  GQA, biases, head_dim, tied embeddings and llama3 RoPE scaling are all right;
* every quantized preset equals, tensor for tensor (type and bytes), what llama.cpp's own
  `llama_model_quantize` makes of our F32 file: the per-tensor mixes and the quantizers are llama.cpp's.
"""

from __future__ import annotations

import copy
import ctypes

import gguf
import numpy as np
import pytest

from quickloris.export import export_gguf
from tests.helpers import within

TEXT = "The quick brown fox jumps over the lazy dog 12345 times. def f(x): return x * 2"

# llama.cpp's logits of an F32 file against HF's, relative to max |logit|. Both run the model in fp32 (F32 weights,
# F32 KV cache) and differ only in rounding: sums in another order, RoPE angles (up to ~30 rad here, each within an
# ulp of ~2e-6) and exp / rsqrt computed by other code. Each step errs by a few units of fp32 rounding
# (u = 6e-8) relative to the values involved, and a 2-layer model chains some tens of such steps: measured 4e-7 to
# 9e-7 of max |logit|. 2e-5 (~300 u) bounds that with ~20x to spare, and a real mapping error lands far above it:
# an rms_norm_eps 10x wrong moves the logits by ~1e-3 of max (test_a_10x_wrong_rms_norm_eps_is_caught).
LOGIT_TOL = 2e-5

CASES = {
    "llama-gqa": dict(kind="llama"),
    "llama-tied-mha": dict(kind="llama", tied=True, kv_heads=4),
    "llama-biases-llama3-rope": dict(
        kind="llama",
        attention_bias=True,
        mlp_bias=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "llama-linear-rope": dict(
        kind="llama", rope_parameters={"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0}
    ),
    "mistral-head-dim": dict(kind="mistral", head_dim=32),
    "qwen2-bias-tied": dict(kind="qwen2", tied=True),
    "qwen3-qk-norm-head-dim": dict(kind="qwen3", head_dim=32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_f32_export_logits_match_hf(case, tmp_path, seed, helpers, bpe_tokenizer, llama_cpp_available):
    model = helpers.tiny_model(vocab_size=len(bpe_tokenizer), **CASES[case])
    path = str(tmp_path / "m.gguf")
    result = export_gguf(model, path, tokenizer=bpe_tokenizer, quant="f32")
    ids = bpe_tokenizer(TEXT)["input_ids"]
    ours = helpers.llama_cpp_logits(path, ids)
    ref = helpers.hf_logits(model, ids)
    assert ref.std() > 0.1  # logits that depend on every weight, not a flat distribution
    within(np.abs(ours - ref).max(), LOGIT_TOL * np.abs(ref).max(), f"seed {seed}: max |llama.cpp - HF|")
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    assert ("output.weight" in result.tensor_types) == (not CASES[case].get("tied", False))


def test_a_10x_wrong_rms_norm_eps_is_caught(tmp_path, seed, helpers, bpe_tokenizer, llama_cpp_available):
    """The logit check above must see a small mapping error: a file whose rms_norm_eps is 10x the model's (exported
    from a copy with that config) gives llama.cpp logits far outside LOGIT_TOL of HF's (~50-70x; 2e-3 allowed it)."""
    model = helpers.tiny_model(vocab_size=len(bpe_tokenizer))
    wrong = copy.deepcopy(model)
    wrong.config.rms_norm_eps = 10 * model.config.rms_norm_eps
    path = str(tmp_path / "wrong-eps.gguf")
    export_gguf(wrong, path, tokenizer=bpe_tokenizer, quant="f32")
    ids = bpe_tokenizer(TEXT)["input_ids"]
    ours, ref = helpers.llama_cpp_logits(path, ids), helpers.hf_logits(model, ids)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"10x rms_norm_eps: max |llama.cpp - HF| = {err:.2e} of max |logit| ({err / LOGIT_TOL:.0f}x LOGIT_TOL)")
    assert err > 5 * LOGIT_TOL, f"seed {seed}: a 10x rms_norm_eps moved the logits by only {err:.2e} of max"


PRESETS = {"q8_0": 7, "q4_0": 2, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}


@pytest.mark.parametrize(
    "hidden, layers, presets",
    [
        (256, 8, PRESETS),
        (96, 8, PRESETS),  # rows not a multiple of 256 -> llama.cpp's fallback types
        (256, 80, {"q4_k_m": 15, "q4_k_s": 14}),  # 80 layers: llama.cpp's "70B" rule for attn_v
    ],
    ids=["hidden256", "hidden96", "80layers"],
)
def test_presets_equal_llama_quantize(
    hidden, layers, presets, tmp_path, seed, helpers, bpe_tokenizer, llama_cpp_available
):
    import llama_cpp

    model = helpers.tiny_model(
        vocab_size=len(bpe_tokenizer), hidden=hidden, inter=2 * hidden, layers=layers, heads=4, kv_heads=2
    )
    src = str(tmp_path / "f32.gguf")
    export_gguf(model, src, tokenizer=bpe_tokenizer, quant="f32")
    for preset, ftype in presets.items():
        ours_path, ref_path = str(tmp_path / f"{preset}.gguf"), str(tmp_path / f"{preset}-ref.gguf")
        export_gguf(model, ours_path, tokenizer=bpe_tokenizer, quant=preset, threads=2)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, 2
        assert llama_cpp.llama_model_quantize(src.encode(), ref_path.encode(), ctypes.byref(params)) == 0
        ours = {t.name: t for t in gguf.GGUFReader(ours_path).tensors}
        ref = {t.name: t for t in gguf.GGUFReader(ref_path).tensors}
        assert ours.keys() == ref.keys()
        for name, t in ref.items():
            assert ours[name].tensor_type == t.tensor_type, f"{preset} {name}"
            assert np.array_equal(np.asarray(ours[name].data), np.asarray(t.data)), f"{preset} {name} seed {seed}"
        types = {t.tensor_type.name for t in ours.values()}
        if preset == "q4_k_m":
            expected = {"F32", "Q4_K", "Q6_K"} if hidden == 256 else {"F32", "Q5_0", "Q8_0"}
            assert types == (expected | {"Q5_K"} if layers == 80 else expected)
