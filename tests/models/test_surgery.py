"""quickloris.models.surgery: every change to a model object is recorded in one place, and undone from there."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickloris.models import surgery  # noqa: E402
from quickloris.models.chunked_loss import disable_chunked_loss, enable_chunked_loss  # noqa: E402
from quickloris.models.prepare import QLoRAConfig, prepare_model  # noqa: E402


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def test_prepare_records_every_change_and_nothing_is_hidden():
    model = prepare_model(_llama(), QLoRAConfig(r=2, attention="sdpa"))
    record = model.quickloris_edits
    assert record.steps() == ["prepare", "loss", "attention"]
    targets = {e.target for e in record.log}
    assert {"model.forward", "model.save_pretrained", "model.config.use_cache"} <= targets
    assert record.state["prepare"].r == 2 and record.state["loss"]["config"] is not None
    # no attribute named like the old hidden per-feature state is left on the model or its modules
    hidden = [(n, a) for n, m in model.named_modules() for a in vars(m) if a.startswith("_quickloris")]
    assert not hidden
    text = repr(record)
    assert "model.forward" in text and "[permanent]" in text  # the quantized linears cannot be put back


def test_undo_restores_what_was_there_and_refuses_permanent_steps():
    model = _llama()
    sentinel = model.forward
    model.forward = sentinel  # an instance forward someone else installed
    enable_chunked_loss(model)
    assert model.__dict__["forward"] is not sentinel
    surgery.undo(model, "loss")
    assert model.__dict__["forward"] is sentinel and not surgery.applied(model, "loss")
    prepared = prepare_model(_llama(), QLoRAConfig(r=2, chunked_loss=False, attention="keep"))
    with pytest.raises(ValueError, match="cannot undo step 'prepare'"):
        surgery.undo(prepared, "prepare")


def test_a_deep_copy_keeps_its_own_record_and_undoes_on_itself():
    model = _llama()
    enable_chunked_loss(model)
    clone = copy.deepcopy(model)
    assert clone.quickloris_edits is not model.quickloris_edits
    disable_chunked_loss(clone)  # an attribute that was absent stays absent (the marker survives the copy)
    assert "forward" not in clone.__dict__ and type(clone.forward).__name__ == "method"
    assert "forward" in model.__dict__  # the original is untouched
    ids = torch.randint(0, 64, (1, 5))
    model.train()
    assert model(input_ids=ids, labels=ids).logits is None  # still the chunked loss
    clone.train()
    assert clone(input_ids=ids, labels=ids).logits is not None  # HF's own forward again
