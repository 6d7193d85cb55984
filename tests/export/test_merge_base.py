"""`quickloris export gguf --merge-base`: by default the adapter is merged into the NF4 base it was trained and
scored on, so llama.cpp computes what `quickloris eval --adapter` scored; `original` merges into the 16-bit
weights and differs from it by the NF4 quantization error."""

from __future__ import annotations

import copy
import json

import gguf
import numpy as np
import pytest
import torch

from quickloris.cli.main import main
from quickloris.export import export_gguf
from quickloris.models.prepare import QLoRAConfig, prepare_model
from quickloris.quant.nf4 import dequantize_nf4_reference, quantize_nf4

TEXT = "The quick brown fox jumps over the lazy dog 12345 times. def f(x): return x * 2"


def make_run(tmp_path, helpers, tokenizer, run_config=None):
    """A tiny model folder and a quickloris adapter with random A and B (as after training), in run/adapter."""
    model = helpers.tiny_model(vocab_size=len(tokenizer), hidden=128, inter=256)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    trained = prepare_model(
        copy.deepcopy(model), QLoRAConfig(r=4, lora_alpha=8, init_lora_weights="random", chunked_loss=False)
    )
    with torch.no_grad():
        for layer in trained.modules():
            if hasattr(layer, "lora_weights") and layer.r:
                layer.lora_weights[1].normal_(0, 0.1)  # B of a trained adapter: its delta is not negligible
    trained.save_pretrained(tmp_path / "run" / "adapter")
    if run_config is not None:
        (tmp_path / "run" / "config.json").write_text(json.dumps(run_config))
    return model, tmp_path / "model", tmp_path / "run" / "adapter"


def scored_model(folder, adapter):
    """The model `quickloris eval --adapter` scores (and `quickloris train` trained): NF4 base + the adapter."""
    from quickloris.models.loading import load_model, resolve_model
    from quickloris.train.evaluation import run_quantization

    model = load_model(resolve_model(str(folder)), dtype=torch.float32)
    return prepare_model(model, run_quantization(adapter), adapter=str(adapter)).eval()


def export(model_dir, adapter, out, *extra):
    assert (
        main(
            [
                "export",
                "gguf",
                "--model",
                str(model_dir),
                "--adapter",
                str(adapter),
                "--out",
                str(out),
                "--threads",
                "2",
                *extra,
            ]
        )
        == 0
    )
    return {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}


def lora_delta(layer) -> torch.Tensor:
    a, b = layer.lora_weights
    return (b.detach().float() @ a.detach().float()) * layer.scaling


def test_nf4_merge_runs_like_the_scored_model_and_original_differs(
    tmp_path, seed, helpers, bpe_tokenizer, llama_cpp_available, capsys
):
    model, folder, adapter = make_run(tmp_path, helpers, bpe_tokenizer)
    scored = scored_model(folder, adapter)
    nf4 = export(folder, adapter, tmp_path / "nf4.gguf", "--quant", "f32")  # default --merge-base nf4
    assert (
        "merge base: nf4, the NF4 base the adapter was trained on (blocksize 64, double quant, CPU rounding, "
        "float32; no run config next to the adapter: defaults)" in capsys.readouterr().out
    )
    orig = export(folder, adapter, tmp_path / "orig.gguf", "--quant", "f32", "--merge-base", "original")

    # Tensor level: the file holds the scored model's own NF4 weights + s·B·A, the original merge W + s·B·A.
    layer = scored.model.layers[1].mlp.down_proj  # ffn_down is not permuted: compare directly
    packed, state = layer.weight.nf4_components()
    base_nf4 = dequantize_nf4_reference(packed, state, dtype=torch.float32)
    dense = model.model.layers[1].mlp.down_proj.weight.detach()
    np.testing.assert_array_equal(nf4["blk.1.ffn_down.weight"], (base_nf4 + lora_delta(layer)).numpy())
    np.testing.assert_array_equal(orig["blk.1.ffn_down.weight"], (dense + lora_delta(layer)).numpy())
    # the two files differ by exactly the NF4 quantization error (up to float32 rounding of the two sums)
    diff = orig["blk.1.ffn_down.weight"] - nf4["blk.1.ffn_down.weight"]
    bound = 2 * np.finfo(np.float32).eps * np.abs(orig["blk.1.ffn_down.weight"]).max()
    assert np.abs(diff - (dense - base_nf4).numpy()).max() <= bound
    assert np.abs(dense - base_nf4).max() > 100 * bound  # NF4's error is far above float rounding

    # Logits: llama.cpp on the F32 nf4 merge equals the scored model up to float32 reassociation (dot products of
    # <= 256 terms: ~sqrt(256)·eps ≈ 2e-6 relative each, through 2 layers; 1e-4 of the largest logit leaves ~50x
    # room, observed ~1e-6); the original merge is off by far more (NF4's error, observed ~2e-2).
    ids = bpe_tokenizer(TEXT)["input_ids"]
    ref = helpers.hf_logits(scored, ids)
    tol = 1e-4 * np.abs(ref).max()
    err_nf4 = np.abs(helpers.llama_cpp_logits(str(tmp_path / "nf4.gguf"), ids) - ref).max()
    err_orig = np.abs(helpers.llama_cpp_logits(str(tmp_path / "orig.gguf"), ids) - ref).max()
    assert err_nf4 < tol, f"seed {seed}: nf4 merge vs scored model {err_nf4} (tol {tol})"
    assert err_orig > 10 * tol, f"seed {seed}: original merge vs scored model only {err_orig}"

    # Quantized files: Q8_0's error (~1/254 of a block's max) is far below NF4's (~1/16), so the nf4 merge
    # stays much closer to the scored model than the original merge.
    export(folder, adapter, tmp_path / "nf4-q8.gguf", "--quant", "q8_0")
    export(folder, adapter, tmp_path / "orig-q8.gguf", "--quant", "q8_0", "--merge-base", "original")
    q8_nf4 = np.abs(helpers.llama_cpp_logits(str(tmp_path / "nf4-q8.gguf"), ids) - ref).max()
    q8_orig = np.abs(helpers.llama_cpp_logits(str(tmp_path / "orig-q8.gguf"), ids) - ref).max()
    assert q8_nf4 < 0.5 * q8_orig, f"seed {seed}: q8_0 {q8_nf4} vs {q8_orig}"


def test_nf4_settings_of_the_run_are_used(tmp_path, seed, helpers, bpe_tokenizer, monkeypatch, capsys):
    """Block size, double quantization, rounding (the run's device) and dtype come from the run's config.json."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # reproduce the CUDA rounding on the CPU
    (tmp_path / "elsewhere").mkdir()
    config = {
        "qlora": {"blocksize": 128, "double_quant": True, "lora_dtype": "float32"},
        "resolved": {"device": "cuda:0", "dtype": "torch.bfloat16", "model_path": str(tmp_path / "elsewhere")},
    }
    model, folder, adapter = make_run(tmp_path, helpers, bpe_tokenizer, run_config=config)
    tensors = export(folder, adapter, tmp_path / "m.gguf", "--quant", "f32")
    out = capsys.readouterr().out
    assert (
        f"(blocksize 128, double quant, CUDA rounding, bfloat16; settings from {tmp_path / 'run' / 'config.json'})"
        in out
    )
    assert f"note: the adapter's run trained on {tmp_path / 'elsewhere'}, this export's --model is {folder}" in out
    dense = model.model.layers[1].mlp.down_proj.weight.detach()
    packed, state = quantize_nf4(dense.to(torch.bfloat16), blocksize=128, double_quant=True, rounding="bnb-cuda")
    base = dequantize_nf4_reference(packed, state, dtype=torch.bfloat16).float()
    trained = prepare_model(
        copy.deepcopy(model), QLoRAConfig(r=4, lora_alpha=8, chunked_loss=False), adapter=str(adapter)
    )
    expected = base + lora_delta(trained.model.layers[1].mlp.down_proj)
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight"], expected.numpy())
    # the run held every weight in bfloat16: the embedding too
    np.testing.assert_array_equal(
        tensors["token_embd.weight"], model.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
    )
    cpu_packed, cpu_state = quantize_nf4(dense.to(torch.bfloat16), blocksize=64, double_quant=True)
    default = dequantize_nf4_reference(cpu_packed, cpu_state, dtype=torch.bfloat16).float()
    assert not torch.equal(base, default)  # the settings change the base: reading them matters


def test_original_is_refused_for_a_4bit_folder(tmp_path, helpers, bpe_tokenizer, monkeypatch, cli_error):
    """A *-bnb-4bit folder holds only NF4 weights: there is no 16-bit base to merge into (checked before loading)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from quickloris.export import gguf_export

    helpers.tiny_model(vocab_size=len(bpe_tokenizer), hidden=128, inter=256).save_pretrained(tmp_path / "base")
    q = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base",
        device_map="cpu",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
        ),
    )
    q.save_pretrained(tmp_path / "bnb")
    monkeypatch.setattr(gguf_export, "_load", lambda *a: pytest.fail("the model was loaded"))
    message = cli_error(
        ["export", "gguf", "--model", tmp_path / "bnb", "--merge-base", "original", "--out", tmp_path / "x.gguf"]
    )
    assert message.startswith(
        f"--merge-base original: --model {tmp_path / 'bnb'} is a pre-quantized NF4 folder, it "
        "has no 16-bit weights to merge into"
    ), message
    assert not (tmp_path / "x.gguf").exists()


def test_python_api_merge_base(tmp_path, helpers, bpe_tokenizer):
    """export_gguf: an adapter folder merges into the NF4 base by default; a model that holds NF4 weights has no
    original base; an in-memory 16-bit model with merge_base='nf4' is quantized like `prepare_model` does."""
    model, folder, adapter = make_run(tmp_path, helpers, bpe_tokenizer)
    r = export_gguf(model, tmp_path / "a.gguf", tokenizer=bpe_tokenizer, adapter=adapter, quant="f32")
    assert r.merge_base.startswith("nf4")
    plain = export_gguf(model, tmp_path / "b.gguf", tokenizer=bpe_tokenizer, quant="f32")
    assert plain.merge_base == "the weights the model holds"
    quantized = export_gguf(model, tmp_path / "c.gguf", tokenizer=bpe_tokenizer, quant="f32", merge_base="nf4")
    a, b, c = ({t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / f"{n}.gguf").tensors} for n in "abc")
    np.testing.assert_array_equal(b["blk.0.ffn_up.weight"], model.model.layers[0].mlp.up_proj.weight.detach().numpy())
    prepared = prepare_model(copy.deepcopy(model), QLoRAConfig(chunked_loss=False))
    packed, state = prepared.model.layers[0].mlp.up_proj.weight.nf4_components()
    np.testing.assert_array_equal(c["blk.0.ffn_up.weight"], dequantize_nf4_reference(packed, state).numpy())
    assert quantized.merge_base.startswith("nf4") and not np.array_equal(
        a["blk.0.ffn_up.weight"], c["blk.0.ffn_up.weight"]
    )
    with pytest.raises(ValueError, match="stored in 4 bits.*no 16-bit weights"):
        export_gguf(prepared, tmp_path / "d.gguf", tokenizer=bpe_tokenizer, merge_base="original")
    with pytest.raises(ValueError, match="merge_base must be one of nf4, original"):
        export_gguf(model, tmp_path / "d.gguf", tokenizer=bpe_tokenizer, merge_base="fp16")
    assert not (tmp_path / "d.gguf").exists()


def test_peft_adapter_folder_with_original_equals_the_attached_peft_model(tmp_path, helpers, bpe_tokenizer):
    """An adapter trained with PEFT on the 16-bit model: `original` gives the file of the PeftModel in memory (whose
    weights are merged as held); the default NF4 base gives another."""
    from peft import LoraConfig, get_peft_model

    base = helpers.tiny_model(vocab_size=len(bpe_tokenizer), hidden=64, inter=128)
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    files = {}
    for name, model, kw in (
        ("attached", peft_model, {}),
        ("original", base, dict(merge_base="original")),
        ("nf4", base, {}),
    ):
        adapter = None if name == "attached" else tmp_path / "adapter"
        export_gguf(model, tmp_path / f"{name}.gguf", tokenizer=bpe_tokenizer, quant="q8_0", adapter=adapter, **kw)
        files[name] = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / f"{name}.gguf").tensors}
    assert all(np.array_equal(files["attached"][k], files["original"][k]) for k in files["attached"])
    assert not np.array_equal(files["nf4"]["blk.0.ffn_up.weight"], files["original"]["blk.0.ffn_up.weight"])
