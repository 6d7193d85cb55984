"""LoRA merging: our float32 merge equals PEFT's merge_and_unload (attached adapters and adapter
folders, rank/alpha patterns, rsLoRA, embedding LoRA, modules_to_save), NF4 bases are dequantized,
the caller's model is never modified, and the merged model runs in llama.cpp like the PEFT model."""

from __future__ import annotations

import copy
import json

import gguf
import numpy as np
import pytest
import torch

from quickloris.export import export_gguf
from quickloris.export import merge as M
from tests.helpers import require, within


def peft_model(helpers, vocab, *, rslora=False, tied=False, embed_lora=True, modules_to_save=("lm_head",)):
    from peft import LoraConfig, get_peft_model

    base = helpers.tiny_model(vocab_size=vocab, tied=tied)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=rslora,
        target_modules=targets + (["embed_tokens"] if embed_lora else []),
        modules_to_save=list(modules_to_save) or None,
        rank_pattern={"v_proj": 4},
        alpha_pattern={"layers.1.self_attn.q_proj": 3, "down_proj": 40},
    )
    model = get_peft_model(base, cfg)
    with torch.no_grad():  # trained-looking adapters: B is zero at init
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def peft_merged_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in copy.deepcopy(model).merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("rslora", [False, True])
def test_attached_and_folder_merges_equal_peft(rslora, tmp_path, seed, helpers, bpe_tokenizer):
    model = peft_model(helpers, len(bpe_tokenizer), rslora=rslora)
    expected = peft_merged_state(model)
    base, params, plan = M.resolve(model, None)
    assert set(params) == set(expected)
    assert len(plan.deltas) == 2 * 7 + 1
    model.save_pretrained(tmp_path / "adapter")
    plain = helpers.tiny_model(vocab_size=len(bpe_tokenizer))  # the same base, without PEFT wrappers
    plain.load_state_dict(
        {
            k.replace(".base_layer", "").replace(".original_module", ""): v
            for k, v in model.get_base_model().state_dict().items()
            if "lora_" not in k and "modules_to_save" not in k
        }
    )
    _, fparams, fplan = M.resolve(plain, tmp_path / "adapter")
    for name, ref in expected.items():
        ours = M.merged_weight(name, params, plan)
        torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=1e-7, msg=f"{name} seed {seed}")
        torch.testing.assert_close(M.merged_weight(name, fparams, fplan), ours, rtol=0, atol=0)
    # the scales come out of PEFT's own rank/alpha pattern resolution identically
    q1 = model.get_base_model().model.layers[1].self_attn.q_proj
    assert plan.deltas["model.layers.1.self_attn.q_proj"][0].scale == q1.scaling["default"]
    assert fplan.deltas["model.layers.1.self_attn.q_proj"][0].scale == q1.scaling["default"]


def test_export_does_not_modify_the_model_and_runs_like_peft(
    tmp_path, seed, helpers, bpe_tokenizer, llama_cpp_available
):
    model = peft_model(helpers, len(bpe_tokenizer), tied=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = str(tmp_path / "m.gguf")
    result = export_gguf(model, path, tokenizer=bpe_tokenizer, quant="f32")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(getattr(m, "merged", False) for m in model.modules())
    # tied in HF, but LoRA on the embedding and a trained lm_head copy: output.weight must be separate
    assert "output.weight" in result.tensor_types
    ids = bpe_tokenizer("Hello world! def f(x): return x * 2")["input_ids"]
    ours, ref = helpers.llama_cpp_logits(path, ids), helpers.hf_logits(model, ids)
    within(np.abs(ours - ref).max(), 2e-5 * np.abs(ref).max(), f"seed {seed}")  # test_llama_cpp.LOGIT_TOL
    with model.disable_adapter():
        assert np.abs(ref - helpers.hf_logits(model, ids)).max() > 0.1  # the adapters do change the model


def test_tied_embedding_lora_keeps_the_base_output_matrix(helpers, bpe_tokenizer, tmp_path):
    model = peft_model(helpers, len(bpe_tokenizer), tied=True, modules_to_save=())
    path = tmp_path / "m.gguf"
    export_gguf(model, path, tokenizer=bpe_tokenizer, quant="f32")
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    emb = model.get_base_model().model.embed_tokens
    np.testing.assert_array_equal(tensors["output.weight"], emb.base_layer.weight.detach().numpy())
    assert not np.array_equal(tensors["token_embd.weight"], tensors["output.weight"])


def test_nf4_base_is_dequantized_and_merged(tmp_path, seed, helpers, bpe_tokenizer, llama_cpp_available):
    require("bitsandbytes")
    import bitsandbytes.functional as bnbf
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    helpers.tiny_model(vocab_size=len(bpe_tokenizer), hidden=128, inter=256).save_pretrained(tmp_path / "base")
    q = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base",
        device_map="cpu",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
    )
    model = get_peft_model(q, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    _, params, plan = M.resolve(model, None)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    base_w = layer.base_layer.weight
    expected = (
        bnbf.dequantize_4bit(base_w.data, base_w.quant_state).float()
        + (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
    )
    torch.testing.assert_close(
        M.merged_weight("model.layers.0.self_attn.q_proj.weight", params, plan), expected, rtol=0, atol=0
    )
    assert M.weight_shape(params["model.layers.0.mlp.up_proj.weight"]) == (256, 128)
    path = str(tmp_path / "m.gguf")
    export_gguf(model, path, tokenizer=bpe_tokenizer, quant="f32")
    ids = bpe_tokenizer("The quick brown fox 12345")["input_ids"]
    # train mode (no dropout anywhere): bitsandbytes dequantizes to float32 and multiplies, the exact
    # math of the merged model; its eval path on AVX512-BF16 CPUs computes in bf16 instead.
    model.train()
    ours, ref = helpers.llama_cpp_logits(path, ids), helpers.hf_logits(model, ids)
    within(np.abs(ours - ref).max(), 2e-5 * np.abs(ref).max(), f"seed {seed}")  # test_llama_cpp.LOGIT_TOL


def test_nf4_weights_repacked_by_a_cpu_forward_are_decoded(helpers, bpe_tokenizer, tmp_path):
    """bitsandbytes repacks 4-bit weights in place (bf16 absmax) on its first eval forward on AVX512-BF16
    CPUs; the export then reads that layout instead of decoding garbage."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not bnbf.has_avx512bf16():
        pytest.skip("bitsandbytes only repacks on CPUs with AVX512-BF16")
    helpers.tiny_model(vocab_size=len(bpe_tokenizer), hidden=128, inter=256).save_pretrained(tmp_path / "base")
    q = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base",
        device_map="cpu",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
    ).eval()
    w = q.model.layers[0].mlp.down_proj.weight
    assert isinstance(w, bnb.nn.Params4bit)
    state = copy.deepcopy(w.quant_state)
    state.absmax = (bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset).to(torch.bfloat16).float()
    state.nested = False
    expected = bnbf.dequantize_4bit(w.data.clone(), state).float()
    with torch.no_grad():
        q(torch.tensor([[3, 4, 5]]))
    assert w.quant_state.packing_format_for_cpu
    torch.testing.assert_close(M.dequantize_base_weight(w), expected, rtol=0, atol=0)


def test_unsupported_adapters_are_rejected(tmp_path, helpers, bpe_tokenizer):
    from peft import LoraConfig, get_peft_model

    base = helpers.tiny_model(vocab_size=len(bpe_tokenizer))
    dora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        export_gguf(dora, tmp_path / "x.gguf", tokenizer=bpe_tokenizer, quant="f32")
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="either a PeftModel or an adapter folder"):
        export_gguf(lora, tmp_path / "x.gguf", tokenizer=bpe_tokenizer, adapter=tmp_path / "adapter")
    smaller = helpers.tiny_model(vocab_size=len(bpe_tokenizer), layers=1)
    with pytest.raises(ValueError, match="parameters the model does not have.*layers.1.self_attn.q_proj"):
        export_gguf(smaller, tmp_path / "x.gguf", tokenizer=bpe_tokenizer, adapter=tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        export_gguf(base, tmp_path / "x.gguf", tokenizer=bpe_tokenizer, adapter=tmp_path)
    # A sequence classifier's adapter (what `quickloris train --task-type classification` writes: PEFT's
    # SEQ_CLS with the score head as modules_to_save) has no place in a causal LM's file: refused, not dropped.
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "task_type": "SEQ_CLS"}))
    with pytest.raises(ValueError, match="is a sequence classifier"):
        export_gguf(base, tmp_path / "x.gguf", tokenizer=bpe_tokenizer, adapter=tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_quickloris_qlora_model_exports_like_it_runs(tmp_path, seed, helpers, bpe_tokenizer, llama_cpp_available):
    """A model from `quickloris.prepare_model` (NF4Tensor bases in QLoRALinear layers with PEFT-named
    lora_A / lora_B): the merge reads its NF4 bytes and adapters, llama.cpp then computes its logits."""
    from quickloris.models.prepare import QLoRAConfig, prepare_model
    from quickloris.quant.nf4 import dequantize_nf4_reference

    model = prepare_model(
        helpers.tiny_model(vocab_size=len(bpe_tokenizer), hidden=128, inter=256),
        QLoRAConfig(r=4, lora_alpha=8, init_lora_weights="random", chunked_loss=False),
    )
    _, params, plan = M.resolve(model, None)
    assert len(plan.deltas) == 2 * 7
    layer = model.model.layers[1].mlp.down_proj
    a, b = layer.lora_weights
    packed, state = layer.weight.nf4_components()
    expected = dequantize_nf4_reference(packed, state, dtype=torch.float32) + (b @ a).detach() * layer.scaling
    torch.testing.assert_close(
        M.merged_weight("model.layers.1.mlp.down_proj.weight", params, plan), expected, rtol=0, atol=0
    )
    path = str(tmp_path / "m.gguf")
    export_gguf(model, path, tokenizer=bpe_tokenizer, quant="f32")
    ids = bpe_tokenizer("The quick brown fox 12345")["input_ids"]
    ours, ref = helpers.llama_cpp_logits(path, ids), helpers.hf_logits(model, ids)
    within(np.abs(ours - ref).max(), 2e-5 * np.abs(ref).max(), f"seed {seed}")  # test_llama_cpp.LOGIT_TOL
    with pytest.raises(ValueError, match="already carries quickloris LoRA layers"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer=bpe_tokenizer, adapter=tmp_path)
