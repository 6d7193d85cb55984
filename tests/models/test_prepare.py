"""prepare_model on random-init tiny Llama / Mistral / Qwen2 / Qwen3: NF4 bases from 16-bit weights, from
bitsandbytes Linear4bit layers (bytes not copied) and from a *-bnb-4bit folder; outputs equal a dense model holding
the dequantized weights with the same LoRA applied by PEFT; clear errors on bad input."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from quickloris.models.prepare import DEFAULT_TARGETS, QLoRAConfig, is_prepared, prepare_model, qlora_config  # noqa: E402
from quickloris.nn.qlora_linear import QLoRALinear  # noqa: E402
from quickloris.tensor.nf4_tensor import NF4Tensor  # noqa: E402
from tests.tiny import tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V = 97


def tiny(arch: str = "llama", **kw) -> nn.Module:
    if arch == "qwen3":
        kw["head_dim"] = 16
    return tiny_model(arch, vocab_size=V, hidden=64, **kw).eval()


def bnb_twin(dense: nn.Module, prepared: nn.Module, compute_dtype=torch.float32) -> nn.Module:
    """A copy of the 16-bit `dense` model whose decoder linears are bitsandbytes Linear4bit holding the very NF4
    bytes of `prepared`'s layers (what a model loaded with BitsAndBytesConfig looks like)."""
    twin = copy.deepcopy(dense)
    for name, mod in prepared.named_modules():
        if isinstance(mod, QLoRALinear):
            parent_name, child = name.rsplit(".", 1)
            lin = bnb.nn.Linear4bit(
                mod.in_features,
                mod.out_features,
                bias=mod.bias is not None,
                compute_dtype=compute_dtype,
                quant_type="nf4",
                device="meta",
            )
            lin.weight = mod.weight.to_bnb()
            if mod.bias is not None:
                lin.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
            setattr(twin.get_submodule(parent_name), child, lin)
    twin.is_loaded_in_4bit = True
    return twin


def dense_twin_with_peft(dense: nn.Module, prepared: nn.Module, cfg: QLoRAConfig) -> nn.Module:
    """`dense` with each QLoRA base replaced by its dequantized weight, and our LoRA matrices applied by PEFT."""
    twin = copy.deepcopy(dense)
    for name, mod in prepared.named_modules():
        if isinstance(mod, QLoRALinear):
            with torch.no_grad():
                twin.get_submodule(name).weight.copy_(mod.weight.dequantize(torch.float32))
    pm = peft.get_peft_model(
        twin,
        peft.LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.lora_alpha,
            use_rslora=cfg.use_rslora,
            target_modules=list(cfg.target_modules),
            lora_dropout=0.0,
        ),
    )
    for name, mod in prepared.named_modules():
        if isinstance(mod, QLoRALinear) and mod.r:
            peft_layer = pm.base_model.model.get_submodule(name)
            with torch.no_grad():
                peft_layer.lora_A["default"].weight.copy_(mod.lora_A.default.weight)
                peft_layer.lora_B["default"].weight.copy_(mod.lora_B.default.weight)
    return pm


def batch(B=2, S=13):
    ids = torch.randint(0, V, (B, S))
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_prepare_16bit_matches_dequantized_dense_model_with_peft_lora(seed, arch):
    dense = tiny(arch)
    cfg = QLoRAConfig(r=4, lora_alpha=8, init_lora_weights="random", chunked_loss=False)
    model = prepare_model(copy.deepcopy(dense), cfg)
    assert is_prepared(model) and qlora_config(model) is not None
    layers = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    assert len(layers) == 2 * len(DEFAULT_TARGETS) and all(m.r == 4 for m in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v bias is kept (frozen)
    ref = dense_twin_with_peft(dense, model, cfg).eval()
    ids, mask = batch()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)


def test_training_loss_and_grads_match_dense_reference(seed):
    dense = tiny()
    cfg = QLoRAConfig(r=4, lora_alpha=8, init_lora_weights="random", lora_dtype="float32")
    model = prepare_model(copy.deepcopy(dense), cfg).train()  # chunked loss on
    ref = dense_twin_with_peft(dense, model, cfg).train()
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    loss_ref = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for name, mod in model.named_modules():
        if isinstance(mod, QLoRALinear):
            peft_layer = ref.base_model.model.get_submodule(name)
            for ours, theirs in (
                (mod.lora_A.default.weight, peft_layer.lora_A["default"].weight),
                (mod.lora_B.default.weight, peft_layer.lora_B["default"].weight),
            ):
                torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6)


def test_bnb_linear4bit_model_is_wrapped_without_copies(seed):
    dense = tiny()
    ours = prepare_model(copy.deepcopy(dense), QLoRAConfig(r=4, init_lora_weights="random", chunked_loss=False))
    twin = bnb_twin(dense, ours)
    bnb_ptrs = {n: m.weight.data.data_ptr() for n, m in twin.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    prepared = prepare_model(twin, QLoRAConfig(r=4, quantize=False, chunked_loss=False))
    for name, ptr in bnb_ptrs.items():
        layer = prepared.get_submodule(name)
        assert isinstance(layer, QLoRALinear) and layer.weight.packed.data_ptr() == ptr
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in prepared.modules())
    for name, mod in ours.named_modules():  # same LoRA: same outputs
        if isinstance(mod, QLoRALinear):
            other = prepared.get_submodule(name)
            other.lora_A.default.weight.data.copy_(mod.lora_A.default.weight)
            other.lora_B.default.weight.data.copy_(mod.lora_B.default.weight)
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            prepared(input_ids=ids, attention_mask=mask).logits, ours(input_ids=ids, attention_mask=mask).logits
        )


def test_non_target_4bit_layers_become_frozen_nf4_layers(seed):
    dense = tiny()
    ours = prepare_model(copy.deepcopy(dense), QLoRAConfig(r=4, chunked_loss=False))
    twin = bnb_twin(dense, ours)
    prepared = prepare_model(twin, QLoRAConfig(r=4, target_modules=["q_proj", "v_proj"], quantize=False))
    down = prepared.model.layers[1].mlp.down_proj
    assert isinstance(down, QLoRALinear) and down.r == 0 and isinstance(down.weight, NF4Tensor)
    assert prepared.model.layers[1].self_attn.q_proj.r == 4


def test_prequantized_folder(seed, tmp_path):
    from quickloris.models.prequantized import load_bnb_4bit_model, save_bnb_4bit_folder

    dense = tiny(tie_word_embeddings=True)
    folder = save_bnb_4bit_folder(copy.deepcopy(dense), tmp_path / "tiny-bnb-4bit")
    loaded = load_bnb_4bit_model(folder, dtype=torch.float32)
    model = prepare_model(loaded, QLoRAConfig(r=4, quantize=False, chunked_loss=False))
    direct = prepare_model(copy.deepcopy(dense), QLoRAConfig(r=4, chunked_loss=False))
    for name, mod in direct.named_modules():
        if isinstance(mod, QLoRALinear):
            assert torch.equal(model.get_submodule(name).weight.packed, mod.weight.packed)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits, direct(input_ids=ids, attention_mask=mask).logits
        )
    (folder / "config.json").write_text((folder / "config.json").read_text().replace('"nf4"', '"fp4"'))
    with pytest.raises(ValueError, match="only nf4"):
        load_bnb_4bit_model(folder)


def test_clear_errors(seed):
    with pytest.raises(
        ValueError,
        match="GPT2LMHeadModel cannot be trained: it is not a decoder-only "
        r"\*ForCausalLM .*quickloris supports Gemma2ForCausalLM",
    ):
        prepare_model(
            transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=V))
        )
    with pytest.raises(ValueError, match="quantize=False requires a model with 4-bit weights"):
        prepare_model(tiny(), QLoRAConfig(quantize=False))
    with pytest.raises(ValueError, match="target_modules names qkv_proj, not a linear layer of this model's decoder"):
        prepare_model(tiny(), QLoRAConfig(target_modules=["q_proj", "qkv_proj"]))
    with pytest.raises(ValueError, match="lm_head"):
        QLoRAConfig(target_modules=["lm_head"])
    for kw in (
        dict(r=0),
        dict(lora_alpha=-1.0),
        dict(lora_dropout=1.5),
        dict(lora_dtype="int8"),
        dict(attention="flash"),
        dict(target_modules=[]),
    ):
        with pytest.raises(ValueError):
            QLoRAConfig(**kw)
    model = prepare_model(tiny(), QLoRAConfig(r=2))
    with pytest.raises(ValueError, match="already prepared"):
        prepare_model(model)
    pm = peft.get_peft_model(tiny(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="not a PEFT model"):
        prepare_model(pm)
    with pytest.raises(ValueError, match="was not prepared"):
        qlora_config(tiny())


def test_bitsandbytes_quantizer_handle_is_dropped_for_trainer(seed):
    """A bitsandbytes-loaded model carries hf_quantizer; after prepare, HF Trainer's quantization check passes."""
    from transformers.trainer_utils import validate_quantization_for_training

    dense = tiny()
    twin = bnb_twin(dense, prepare_model(copy.deepcopy(dense), QLoRAConfig(r=2, chunked_loss=False)))
    twin.hf_quantizer = object()  # stands for the bitsandbytes quantizer a real 4-bit load leaves
    prepared = prepare_model(twin, QLoRAConfig(r=2, quantize=False))
    assert prepared.hf_quantizer is None
    validate_quantization_for_training(prepared)
