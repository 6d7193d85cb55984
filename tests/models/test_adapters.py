"""Adapters in PEFT's format: PeftModel.from_pretrained on a plain HF model whose linears are bitsandbytes Linear4bit
with the same NF4 bytes reproduces our outputs; adapters PEFT saved load into our model; unsupported configs raise."""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from quickloris.models.adapters import (  # noqa: E402
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_state_dict,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from quickloris.models.prepare import QLoRAConfig, prepare_model  # noqa: E402
from quickloris.nn.qlora_linear import QLoRALinear  # noqa: E402
from tests.models.test_prepare import V, batch, bnb_twin, tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_from_pretrained_on_bnb_model_reproduces_ours(seed, tmp_path, rslora):
    dense = tiny()
    cfg = QLoRAConfig(
        r=4,
        lora_alpha=12,
        use_rslora=rslora,
        init_lora_weights="random",
        target_modules=["q_proj", "v_proj", "down_proj"],
    )
    ours = prepare_model(copy.deepcopy(dense), cfg)
    save_adapter(ours, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4 and saved["use_rslora"] == rslora
    assert sorted(saved["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    keys = set(adapter_state_dict(ours))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 2 * 3

    twin = bnb_twin(dense, ours)
    pm = peft.PeftModel.from_pretrained(twin, tmp_path / "adapter")
    # train mode (dropout is 0): bitsandbytes' CPU eval path would repack the weight with bf16 scales
    pm.train()
    ours.train()
    ids, mask = batch()
    torch.testing.assert_close(_logits(pm, ids, mask), _logits(ours.eval(), ids, mask), rtol=1e-4, atol=1e-4)


def test_adapter_trained_by_peft_loads_into_ours(seed, tmp_path):
    dense = tiny()
    probe = prepare_model(copy.deepcopy(dense), QLoRAConfig(r=2, chunked_loss=False))
    twin = bnb_twin(dense, probe)
    pm = peft.get_peft_model(
        twin,
        peft.LoraConfig(r=8, lora_alpha=4, target_modules=["k_proj", "o_proj", "up_proj"], init_lora_weights=False),
    )
    pm.save_pretrained(tmp_path / "peft")
    pm.train()
    ours = prepare_model(copy.deepcopy(dense), adapter=tmp_path / "peft", chunked_loss=False)
    assert {n.rsplit(".", 1)[-1] for n, m in ours.named_modules() if isinstance(m, QLoRALinear) and m.r} == {
        "k_proj",
        "o_proj",
        "up_proj",
    }
    ids, mask = batch()
    torch.testing.assert_close(_logits(ours, ids, mask), _logits(pm, ids, mask), rtol=1e-4, atol=1e-4)


def test_save_load_round_trip_and_save_pretrained(seed, tmp_path):
    a = prepare_model(tiny(), QLoRAConfig(r=4, init_lora_weights="random"))
    a.save_pretrained(tmp_path / "a")  # the prepared model's save_pretrained writes the adapter
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    b = prepare_model(copy.deepcopy(a.__class__(a.config)), QLoRAConfig(r=4))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(adapter_state_dict(a), adapter_state_dict(b))
    load_adapter(b, tmp_path / "a")
    torch.testing.assert_close(adapter_state_dict(a), adapter_state_dict(b), rtol=0, atol=0)


def test_unsupported_or_mismatched_adapters_raise(seed, tmp_path):
    model = prepare_model(tiny(), QLoRAConfig(r=4))
    save_adapter(model, tmp_path / "ok")
    cfg = json.loads((tmp_path / "ok" / CONFIG_NAME).read_text())
    for change, msg in (
        (dict(use_dora=True), "DoRA"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
        (dict(bias="all"), "bias"),
        (dict(target_modules=".*proj"), "regular expression"),
        (dict(peft_type="IA3"), "peft_type"),
    ):
        bad = tmp_path / msg.replace(" ", "_")
        bad.mkdir()
        (bad / CONFIG_NAME).write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=msg):
            read_adapter_config(bad)
    other = prepare_model(tiny(), QLoRAConfig(r=8))
    with pytest.raises(ValueError, match="r=8"):
        load_adapter(other, tmp_path / "ok")
    with pytest.raises(FileNotFoundError):
        load_adapter(model, tmp_path / "missing")
    with pytest.raises(ValueError, match="no LoRA layers"):
        adapter_state_dict(tiny())
    assert V == tiny().config.vocab_size
