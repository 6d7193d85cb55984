"""Export straight from a QLoRA model living on a GPU (bitsandbytes NF4 base on CUDA + PEFT LoRA).

The merge runs where the adapter lives and the result comes back to the CPU for the C++ quantizers;
the file must hold the same weights as the CPU path computes from the same NF4 bytes and adapters.
"""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch

from quickloris.export import export_gguf
from tests.helpers import require, within

pytestmark = pytest.mark.gpu


def _cuda_qlora_model(tmp_path, helpers, bpe_tokenizer):
    """A bitsandbytes NF4 (double quant) tiny Llama on CUDA with PEFT LoRA on all 7 projections, B random."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    require("bitsandbytes")
    helpers.tiny_model(vocab_size=len(bpe_tokenizer), hidden=256, inter=512).save_pretrained(tmp_path / "base")
    q = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base",
        device_map="cuda",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
    )
    model = get_peft_model(
        q,
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def test_export_from_a_cuda_qlora_model(tmp_path, seed, helpers, bpe_tokenizer):
    import bitsandbytes.functional as bnbf

    model = _cuda_qlora_model(tmp_path, helpers, bpe_tokenizer)
    export_gguf(model, tmp_path / "f32.gguf", tokenizer=bpe_tokenizer, quant="f32")
    export_gguf(model, tmp_path / "q4_k_m.gguf", tokenizer=bpe_tokenizer, quant="q4_k_m")
    f32 = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "f32.gguf").tensors}

    layer = model.get_base_model().model.layers[1].mlp.down_proj  # not permuted: compare directly
    w = layer.base_layer.weight
    with torch.no_grad():
        expected = (
            bnbf.dequantize_4bit(w.data, w.quant_state).float().cpu()
            + (layer.lora_B["default"].weight.cpu() @ layer.lora_A["default"].weight.cpu()) * layer.scaling["default"]
        )
    np.testing.assert_allclose(f32["blk.1.ffn_down.weight"], expected.numpy(), rtol=1e-5, atol=1e-6)

    from quickloris.export.quants import GGMLType, quantize

    for t in gguf.GGUFReader(tmp_path / "q4_k_m.gguf").tensors:
        if t.tensor_type.name != "F32":
            ours = quantize(f32[t.name].reshape(-1, f32[t.name].shape[-1]), GGMLType[t.tensor_type.name])
            assert np.array_equal(np.asarray(t.data).reshape(ours.shape), ours), t.name


def test_cuda_export_runs_in_llama_cpp_like_the_model(tmp_path, seed, helpers, bpe_tokenizer):
    """llama.cpp's logits of the file exported from the CUDA model equal the CUDA model's. The device image has no
    llama-cpp-python (docs/device.md), so there this skips, saying so; on CPU the same comparison of NF4 + LoRA
    exports is test_merge.py's, in CI."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed on this GPU machine")
    model = _cuda_qlora_model(tmp_path, helpers, bpe_tokenizer)
    export_gguf(model, tmp_path / "f32.gguf", tokenizer=bpe_tokenizer, quant="f32")
    ids = bpe_tokenizer("The quick brown fox 12345")["input_ids"]
    model.train()  # bitsandbytes' exact dequantize + matmul path (no dropout anywhere)
    with torch.no_grad():
        ref = model(torch.tensor([ids], device="cuda")).logits[0].float().cpu().numpy()
    ours = helpers.llama_cpp_logits(str(tmp_path / "f32.gguf"), ids)
    within(np.abs(ours - ref).max(), 2e-5 * np.abs(ref).max(), f"seed {seed}")  # test_llama_cpp.LOGIT_TOL


def test_nf4_merge_base_is_what_gpu_training_computes_with(seed, helpers, bpe_tokenizer, monkeypatch):
    """A run on a GPU (bf16, quantized on CUDA, dequantized by the Triton kernel): the export's NF4 base is the
    very weight the run computed with. Quantized on the GPU when one is present: bit for bit. Reproduced on a CPU
    (bitsandbytes' CUDA rounding in PyTorch): only the float32 mean of a tensor's block scales (the double-quant
    offset) is summed in another order, which moves a scale code only at a rounding boundary: < 0.1 % of blocks."""
    from quickloris.export import merge as M
    from quickloris.export.merge_base import resolve_merge_base
    from quickloris.models.adapter_base import NF4Base
    from quickloris.models.prepare import QLoRAConfig, prepare_model

    model = helpers.tiny_model(vocab_size=len(bpe_tokenizer), hidden=512, inter=1024, layers=2)
    gpu_model = copy.deepcopy(model).to(device="cuda", dtype=torch.bfloat16)  # loaded with --dtype bfloat16
    prepare_model(gpu_model, QLoRAConfig(chunked_loss=False))  # what `quickloris train` does on a GPU
    base = NF4Base(blocksize=64, double_quant=True, dtype="bfloat16", rounding="bnb-cuda")
    _, params, _ = M.resolve(model, None)
    how = resolve_merge_base("nf4", model, params, folder_adapter=False, nf4=base)
    assert len(how.linears) == 2 * 7
    for name in sorted(how.linears):
        used = gpu_model.get_submodule(name[: -len(".weight")]).weight.dequantize().float().cpu()
        assert torch.equal(how.weight(name, params[name]), used), name
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    blocks = differing = 0
    for name in sorted(how.linears):
        used = gpu_model.get_submodule(name[: -len(".weight")]).weight.dequantize().float().cpu()
        same = (how.weight(name, params[name]) == used).reshape(-1, 64).all(dim=1)
        blocks, differing = blocks + same.numel(), differing + int((~same).sum())
    print(f"\nCPU reproduction of the CUDA NF4 base: {differing} of {blocks} blocks differ")
    assert differing <= blocks // 1000
