"""GGUF export of Gemma-2, Gemma-3 text, Phi-3/3.5/4, Mistral-Nemo and Qwen2.5 through llama.cpp (llama-cpp-python)
on tiny random models of the real architectures (tests/export/family_models.py).

Tolerances, relative to max |logit| (both sides fp32 unless said):

* LOGIT_TOL = 2e-5 where llama.cpp's F32 graph is float32 throughout (Phi-3, Mistral-Nemo, Qwen2.5): sums in
  another order, RoPE angles and exp / rsqrt / tanh from other code, each a few units of fp32 rounding
  (u = 6e-8), chained some tens of times in 2 layers: measured up to 9e-7. 2e-5 (~300 u) bounds that.
* GEMMA_TOL = 2e-3 for Gemma: ggml's GELU rounds its input to fp16, looks the value up in a table of fp16 results
  (`family_models.ggml_gelu`), and the reference does the same; but where fp32 noise puts an input on the other
  side of an fp16 rounding boundary, that activation differs by one fp16 ulp (2^-11 = 4.9e-4 of it). The few such
  flips per forward move the logits by up to ~1 ulp of max |logit| (measured up to 4.6e-4 over 32 models;
  jittering the reference's GELU inputs by 3e-7 moves it as much). 2e-3 (4 fp16 ulps) bounds that; every Gemma
  mapping error tried (norms without the +1, no attention softcap, no sliding window) moves the logits by > 0.05.
* F16_TOL = 1e-2 for F16 files: every weight is rounded to fp16 and llama.cpp's F16 matmul rounds its input
  activations to fp16 too, each 2^-11 relative; ~10 matmuls in series: measured up to 3e-3.
* Q8_TOL = 0.3 for Q8_0 / Q4_K_M files against HF running the file's own dequantized weights: what remains is
  llama.cpp rounding every matmul input to 8 bits per block (error up to 2^-8 of the block's largest value, ~1%
  rms per element), ~10 matmuls in series: measured up to 7e-2. (Against the original weights, Q4_K_M moves
  these random, structureless tiny models' logits by up to half of max |logit|; Q8_0 by up to 7e-2.)
"""

from __future__ import annotations

import copy
import ctypes

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from quickloris.export import export_gguf
from quickloris.export import merge as M
from quickloris.export.archs import architecture_for
from quickloris.export.archs.gemma import Gemma2
from quickloris.export.archs.phi3 import Phi3
from quickloris.export.quants import GGMLType, dequantize
from tests.export.family_models import TEXT, family_model, hf_logits, llama_cpp_logits, relative_error

LOGIT_TOL, GEMMA_TOL, F16_TOL, Q8_TOL = 2e-5, 2e-3, 1e-2, 0.3


def tol(kind: str) -> float:
    return GEMMA_TOL if kind.startswith("gemma") else LOGIT_TOL


def longrope(orig: int, max_pos: int, n: int = 8, partial: float = 1.0) -> dict:
    """Phi-3.5-style LongRoPE: n factors per set (one per rotary frequency), context max_pos over orig."""
    return dict(
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": partial,
            "long_factor": (1 + 3 * torch.rand(n)).tolist(),
            "short_factor": (1 + 0.5 * torch.rand(n)).tolist(),
        },
        original_max_position_embeddings=orig,
        max_position_embeddings=max_pos,
    )


# local base 2e4, not llama.cpp's default 1e4 for rope.freq_base_swa, so that the key is needed
GEMMA3_4B_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0},
    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
}
CASES = {
    # 2 layers: sliding then full (llama.cpp's default Gemma-2 pattern), softcaps 1.5 / 3.0, window 8
    "gemma2": ("gemma2", lambda: {}),
    "gemma2-other-pattern": ("gemma2", lambda: dict(layer_types=["full_attention", "sliding_attention"])),
    # 6 layers: five sliding, one full (the default pattern); local base 2e4, global 1e6 with linear scaling x2
    "gemma3-4b-like": ("gemma3", lambda: dict(rope_parameters=GEMMA3_4B_ROPE)),
    "gemma3-1b-like-2-layers": (
        "gemma3",
        lambda: dict(layers=2, layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=None),
    ),
    "phi3-mini": ("phi3", lambda: {}),
    "phi4-mini-like-tied-partial-rope": (
        "phi3",
        lambda: dict(
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
        ),
    ),
    # LongRoPE, short factors: the 21-token prompt and llama.cpp's 256-token context within orig = 256
    "phi3.5-longrope-short": ("phi3", lambda: longrope(256, 1024)),
    # long factors: both beyond orig = 16 (attention factor sqrt(1 + ln 4 / ln 16)); partial rotary, 6 factors
    "phi3.5-longrope-long-partial": ("phi3", lambda: longrope(16, 64, n=6, partial=0.75)),
    "mistral-nemo-head-dim": ("mistral", lambda: {}),
    "qwen2.5-tied-bias": ("qwen2", lambda: {}),
}


def _export(model, tmp_path, tokenizer, quant="f32", name="m"):
    path = tmp_path / f"{name}-{quant}.gguf"
    result = export_gguf(model, path, tokenizer=tokenizer, quant=quant, threads=2)
    return path, result


@pytest.mark.parametrize("case", list(CASES))
def test_f32_export_logits_match_hf(case, tmp_path, seed, bpe_tokenizer, llama_cpp_available):
    kind, extra = CASES[case]
    model = family_model(kind, vocab_size=len(bpe_tokenizer), **extra())
    path, result = _export(model, tmp_path, bpe_tokenizer)
    ids = bpe_tokenizer(TEXT)["input_ids"]
    ours, ref = llama_cpp_logits(path, ids), hf_logits(model, ids)
    assert ref.std() > 0.1  # logits that depend on every weight, not a flat distribution
    err = relative_error(ours, ref)
    assert err <= tol(kind), f"seed {seed}: max |llama.cpp - HF| = {err:.2e} of max |logit| > {tol(kind)}"
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9  # near-ties may flip within the tolerance
    fields = gguf.GGUFReader(path).fields
    arch = fields["general.architecture"].contents()
    assert arch == {"mistral": "llama"}.get(kind, kind) == result.gguf_arch
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert fields[f"{arch}.attention.key_length"].contents() == head_dim
    tied = model.config.tie_word_embeddings
    assert ("output.weight" in result.tensor_types) == (not tied)


def test_nemo_head_dim_and_gemma_keys_are_written(tmp_path, bpe_tokenizer):
    """Mistral-Nemo's head_dim != hidden / heads as key/value_length; Gemma-3's local RoPE base, window and (only
    where it is not llama.cpp's default) the per-layer pattern; Gemma-2's caps; Phi-3's LongRoPE keys."""
    n = len(bpe_tokenizer)
    pattern = dict(layers=2, layer_types=["full_attention", "sliding_attention"])
    cases = [("mistral", {}), ("gemma2", {}), ("gemma3", pattern), ("gemma3", {}), ("phi3", longrope(16, 64))]
    files = []
    for i, (kind, extra) in enumerate(cases):
        path, _ = _export(family_model(kind, vocab_size=n, **extra), tmp_path, bpe_tokenizer, name=f"{kind}{i}")
        files.append({k: v.contents() for k, v in gguf.GGUFReader(path).fields.items()})
    nemo, g2, g3_pattern, g3, phi = files
    assert nemo["llama.attention.key_length"] == nemo["llama.attention.value_length"] == 16
    assert nemo["llama.embedding_length"] == 96 and nemo["llama.rope.dimension_count"] == 16
    assert g2["gemma2.attn_logit_softcapping"] == 1.5 and g2["gemma2.final_logit_softcapping"] == 3.0
    assert g2["gemma2.attention.sliding_window"] == 8 and "gemma2.attention.sliding_window_pattern" not in g2
    assert g3["gemma3.rope.freq_base_swa"] == 10000.0 and g3["gemma3.rope.freq_base"] == 1e6
    assert "gemma3.attention.sliding_window_pattern" not in g3 and "gemma3.final_logit_softcapping" in g3
    assert g3_pattern["gemma3.attention.sliding_window_pattern"] == [False, True]
    assert phi["phi3.rope.scaling.original_context_length"] == 16 and phi["phi3.context_length"] == 64
    assert abs(phi["phi3.rope.scaling.attn_factor"] - (1 + np.log(4) / np.log(16)) ** 0.5) < 1e-6
    assert phi["phi3.attention.sliding_window"] == 0  # None, as llama.cpp's converter writes it


def test_f16_export_logits_match_hf(tmp_path, seed, bpe_tokenizer, llama_cpp_available):
    ids = bpe_tokenizer(TEXT)["input_ids"]
    for kind in ("gemma2", "gemma3", "phi3"):
        model = family_model(kind, vocab_size=len(bpe_tokenizer))
        path, result = _export(model, tmp_path, bpe_tokenizer, quant="f16", name=kind)
        assert {"F16", "F32"} == set(result.tensor_types.values())
        err = relative_error(llama_cpp_logits(path, ids), hf_logits(model, ids))
        assert err <= F16_TOL, f"{kind} seed {seed}: F16 max |llama.cpp - HF| = {err:.2e} of max |logit|"


def file_weights_model(model, path):
    """A copy of `model` holding the 2-D weights of the GGUF file `path`, dequantized (no q/k permutation to undo:
    the architectures tested here keep HF's layout)."""
    arch = architecture_for(model.config)
    assert arch.name != "llama"
    copy_ = copy.deepcopy(model)
    params = dict(copy_.named_parameters())
    by_gguf = {arch.gguf_name(name): name for name in params}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(s) for s in reversed(t.shape))
        if len(shape) < 2:
            continue
        data = dequantize(np.asarray(t.data).view(np.uint8).reshape(-1), GGMLType(int(t.tensor_type)), shape)
        with torch.no_grad():
            params[by_gguf[t.name]].copy_(torch.from_numpy(data))
    return copy_


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "phi3"])
def test_quantized_exports_are_llama_quantize_and_run_like_hf(kind, tmp_path, seed, bpe_tokenizer, llama_cpp_available):
    """q8_0 and q4_k_m (rows of 256, so K-quants apply): every tensor's type and bytes equal what llama.cpp's
    `llama_model_quantize` makes of our F32 file (Phi-3's fused attn_qkv typed like attn_v, Gemma-2's token_embd
    typed as the output matrix), and llama.cpp runs the file like HF runs its dequantized weights (Q8_TOL)."""
    import llama_cpp

    model = family_model(
        kind, vocab_size=len(bpe_tokenizer), hidden=256, inter=512, **({"layers": 2} if kind == "gemma3" else {})
    )
    src, _ = _export(model, tmp_path, bpe_tokenizer)
    ids = bpe_tokenizer(TEXT)["input_ids"]
    for preset, ftype in (("q8_0", 7), ("q4_k_m", 15)):
        ours_path, result = _export(model, tmp_path, bpe_tokenizer, quant=preset)
        ref_path = str(tmp_path / f"{preset}-ref.gguf")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, 2
        assert llama_cpp.llama_model_quantize(str(src).encode(), ref_path.encode(), ctypes.byref(params)) == 0
        ours = {t.name: t for t in gguf.GGUFReader(ours_path).tensors}
        ref = {t.name: t for t in gguf.GGUFReader(ref_path).tensors}
        assert ours.keys() == ref.keys()
        for name, t in ref.items():
            assert ours[name].tensor_type == t.tensor_type, f"{preset} {name}"
            assert np.array_equal(np.asarray(ours[name].data), np.asarray(t.data)), f"{preset} {name} seed {seed}"
        if kind == "phi3" and preset == "q4_k_m":  # llama.cpp's attn_v rule: Q6_K in "more bits" layers
            assert [result.tensor_types[f"blk.{i}.attn_qkv.weight"] for i in range(2)] == ["Q4_K", "Q6_K"]
        if kind == "gemma2":
            assert result.tensor_types["token_embd.weight"] == ("Q8_0" if preset == "q8_0" else "Q6_K")
        err = relative_error(llama_cpp_logits(ours_path, ids), hf_logits(file_weights_model(model, ours_path), ids))
        assert err <= Q8_TOL, f"{preset} seed {seed}: max |llama.cpp - HF(file weights)| = {err:.2e} of max |logit|"


def _swap_gate_up(self, gguf_name, tensor, config):
    if gguf_name.endswith("ffn_up.weight"):
        return torch.cat(tensor.chunk(2, dim=0)[::-1])
    return tensor


def _drop_key(key_end):
    def hparams(self, config, _orig=Gemma2.hparams):
        return [kv for kv in _orig(self, config) if not kv[0].endswith(key_end)]

    return hparams


@pytest.mark.parametrize(
    "kind, patch, attr, value",
    [
        ("gemma2", Gemma2, "norm_offset", 0.0),  # Gemma norms stored as w instead of 1 + w
        ("gemma2", Gemma2, "hparams", _drop_key("attn_logit_softcapping")),  # llama.cpp's default cap 50, not 1.5
        ("gemma2", Gemma2, "hparams", _drop_key("sliding_window")),  # llama.cpp's default window 4096, not 8
        ("phi3", Phi3, "to_gguf_layout", _swap_gate_up),  # ffn_up as (up, gate) instead of (gate, up)
    ],
    ids=["gemma-norms-without-plus-one", "gemma2-no-attn-softcap", "gemma2-no-window", "phi3-gate-up-swapped"],
)
def test_a_wrong_layout_fails_the_logit_check(
    kind, patch, attr, value, monkeypatch, tmp_path, seed, bpe_tokenizer, llama_cpp_available
):
    """The checks above can fail: a file made with one detail of the layout wrong is far outside the tolerance."""
    model = family_model(kind, vocab_size=len(bpe_tokenizer))
    monkeypatch.setattr(patch, attr, value)
    path, _ = _export(model, tmp_path, bpe_tokenizer)
    ids = bpe_tokenizer(TEXT)["input_ids"]
    err = relative_error(llama_cpp_logits(path, ids), hf_logits(model, ids))
    print(f"{attr}: max |llama.cpp - HF| = {err:.2e} of max |logit| ({err / tol(kind):.0f}x the tolerance)")
    assert err > 10 * tol(kind), f"seed {seed}: the wrong file is only {err:.2e} of max |logit| off"


def _lora(model, targets, *, embed=False):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets + (["embed_tokens"] if embed else []))
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # trained-looking adapters: B is zero at init
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    return peft_model.eval()


def test_phi3_lora_on_fused_layers_merges_like_peft(tmp_path, seed, bpe_tokenizer, llama_cpp_available):
    """A PEFT LoRA on Phi-3's fused qkv_proj / gate_up_proj (PEFT's names), attached or saved: the merged
    weights equal PEFT's merge_and_unload, and llama.cpp runs the file like the PeftModel."""
    model = _lora(
        family_model("phi3", vocab_size=len(bpe_tokenizer)), ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    )
    model.save_pretrained(tmp_path / "adapter")
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.mlp.gate_up_proj.lora_B.weight" in keys
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    plain = family_model("phi3", vocab_size=len(bpe_tokenizer))
    plain.load_state_dict(
        {k.replace(".base_layer", ""): v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    )
    _, params, plan = M.resolve(plain, tmp_path / "adapter")
    for name in ("model.layers.1.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"):
        torch.testing.assert_close(M.merged_weight(name, params, plan), expected[name], rtol=1e-6, atol=1e-7)
    path = tmp_path / "m.gguf"
    export_gguf(model, path, tokenizer=bpe_tokenizer, quant="f32")
    ids = bpe_tokenizer(TEXT)["input_ids"]
    ours, ref = llama_cpp_logits(path, ids), hf_logits(model, ids)
    assert relative_error(ours, ref) <= LOGIT_TOL, f"seed {seed}"
    with model.disable_adapter():
        assert relative_error(hf_logits(model, ids), ref) > 0.05  # the adapter does change the model
    folder = tmp_path / "folder.gguf"
    export_gguf(
        plain, folder, tokenizer=bpe_tokenizer, adapter=tmp_path / "adapter", merge_base="original", quant="f32"
    )
    assert relative_error(llama_cpp_logits(folder, ids), ref) <= LOGIT_TOL, f"seed {seed}"


def test_phi3_nf4_merge_base_quantizes_the_fused_linears(bpe_tokenizer):
    """The default merge base (the NF4 base a QLoRA run trained on) quantizes Phi-3's fused linears like the run."""
    from quickloris.export.merge_base import decoder_linear_weights

    model = family_model("phi3", vocab_size=len(bpe_tokenizer))
    names = decoder_linear_weights(model, M.base_parameters(model))
    assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight"} <= names
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" not in names


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_gemma_lora_merges_and_tied_output(kind, tmp_path, seed, bpe_tokenizer, llama_cpp_available):
    """A LoRA on every Gemma linear runs in llama.cpp like the PeftModel. With a LoRA on the tied embedding too,
    Gemma-3 gets a separate output.weight (the base embedding), while Gemma-2, whose llama.cpp graph always uses
    token_embd as the output matrix, is refused in one line and nothing is written."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base = family_model(kind, vocab_size=len(bpe_tokenizer), **({"layers": 2} if kind == "gemma3" else {}))
    model = _lora(copy.deepcopy(base), targets)
    path = tmp_path / "m.gguf"
    result = export_gguf(model, path, tokenizer=bpe_tokenizer, quant="f32")
    assert "output.weight" not in result.tensor_types
    ids = bpe_tokenizer(TEXT)["input_ids"]
    assert relative_error(llama_cpp_logits(path, ids), hf_logits(model, ids)) <= GEMMA_TOL, f"seed {seed}"
    embed = _lora(copy.deepcopy(base), targets, embed=True)
    out = tmp_path / "embed.gguf"
    if kind == "gemma2":
        with pytest.raises(
            ValueError,
            match="llama.cpp's gemma2 uses the token embedding as the output matrix, but "
            "this model's lm_head differs from its embed_tokens: an adapter",
        ):
            export_gguf(embed, out, tokenizer=bpe_tokenizer, quant="f32")
        assert not out.exists()
        return
    result = export_gguf(embed, out, tokenizer=bpe_tokenizer, quant="f32")
    assert "output.weight" in result.tensor_types
    assert relative_error(llama_cpp_logits(out, ids), hf_logits(embed, ids)) <= GEMMA_TOL, f"seed {seed}"


def test_notes_say_where_llama_cpp_differs(tmp_path, bpe_tokenizer, capsys):
    """A sliding window shorter than the context (Phi-3-mini-4k: 2047 of 4096; Mistral 7B v0.1) is exported with a
    note, also printed by `quickloris export gguf`; the architecture comes from the folder's config.json."""
    from quickloris.cli.main import main

    model = family_model("phi3", vocab_size=len(bpe_tokenizer), sliding_window=100)
    _, result = _export(model, tmp_path, bpe_tokenizer)
    assert result.notes == [
        (
            "llama.cpp's phi3 attends over the whole context, the HF model over the last 100 tokens "
            "(sliding_window): their outputs differ from position 100 on"
        )
    ]
    mistral = family_model("mistral", vocab_size=len(bpe_tokenizer), sliding_window=64)
    assert architecture_for(mistral.config).notes(mistral.config)[0].startswith("llama.cpp's llama attends")
    assert not architecture_for(mistral.config).notes(family_model("mistral", vocab_size=8).config)
    model.save_pretrained(tmp_path / "phi")
    bpe_tokenizer.save_pretrained(tmp_path / "phi")
    capsys.readouterr()
    rc = main(
        [
            "export",
            "gguf",
            "--model",
            str(tmp_path / "phi"),
            "--out",
            str(tmp_path / "cli.gguf"),
            "--quant",
            "q8_0",
            "--threads",
            "2",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "note: llama.cpp's phi3 attends over the whole context" in out
    assert gguf.GGUFReader(tmp_path / "cli.gguf").fields["general.architecture"].contents() == "phi3"
