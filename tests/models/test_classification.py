"""Sequence classification on a QLoRA decoder (random-init tiny models of each family): the loss, logits and
gradients equal transformers' own SequenceClassification forward on the same modules; packed rows give the padded
batch's loss; pooling finds each document's last token; class weights; the classifier built from a causal LM; the
adapter (score head as PEFT modules_to_save) loads in the real PEFT and reproduces the logits, both ways."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from quickloris.data.chat import TokenizedExample  # noqa: E402
from quickloris.data.packing import collate_packed  # noqa: E402
from quickloris.models import surgery  # noqa: E402
from quickloris.models.adapters import (  # noqa: E402
    CONFIG_NAME,
    LABELS_NAME,
    WEIGHTS_NAME,
    adapter_state_dict,
    load_adapter,
    read_adapter_config,
    read_labels,
    save_adapter,
)
from quickloris.models.classification import (  # noqa: E402
    classification_loss,
    classifier_from_causal_lm,
    is_sequence_classifier,
    pooled_positions,
    set_class_weights,
)
from quickloris.models.prepare import QLoRAConfig, prepare_model  # noqa: E402
from tests.models.test_prepare import V, bnb_twin  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PAD = 0
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def tiny_classifier(arch: str = "llama", num_labels: int = 3) -> torch.nn.Module:
    prefix = FAMILIES[arch]
    kw = dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
        num_labels=num_labels,
    )
    if arch == "qwen3":
        kw["head_dim"] = 16
    cfg = getattr(transformers, f"{prefix}Config")(**kw)
    return getattr(transformers, f"{prefix}ForSequenceClassification")(cfg).eval()


def texts(n: int, lo: int = 3, hi: int = 12) -> list[list[int]]:
    """Token ids of `n` texts of random lengths, without the pad id (HF pools on the last non-pad token)."""
    return [torch.randint(1, V, (int(torch.randint(lo, hi + 1, ())),)).tolist() for _ in range(n)]


def padded(docs: list[list[int]], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    S = max(map(len, docs))
    ids = torch.full((len(docs), S), PAD)
    mask = torch.zeros_like(ids)
    for i, d in enumerate(docs):
        sl = slice(S - len(d), S) if left else slice(0, len(d))
        ids[i, sl], mask[i, sl] = torch.tensor(d), 1
    return ids, mask


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def run(model, **batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), out.logits.detach(), trainable_grads(model)


@pytest.mark.parametrize("arch", list(FAMILIES))
@pytest.mark.parametrize("left", [False, True])
def test_loss_logits_and_grads_equal_transformers_forward(seed, arch, left):
    """Our pooled forward vs the class's own forward (HF's pooling on the rightmost non-pad token, score on every
    position, HF's ForSequenceClassificationLoss) on the very same prepared modules."""
    model = prepare_model(tiny_classifier(arch), QLoRAConfig(r=4, init_lora_weights="random")).train()
    assert is_sequence_classifier(model) and "classify" in model.quickloris_edits.steps()
    assert {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n} == {"score.weight"}
    ids, mask = padded(texts(5), left=left)
    labels = torch.randint(0, 3, (5,))
    ours = run(model, input_ids=ids, attention_mask=mask, labels=labels)
    model.zero_grad(set_to_none=True)
    hf = type(model).forward(model, input_ids=ids, attention_mask=mask, labels=labels)
    hf.loss.backward()
    theirs = hf.loss.detach(), hf.logits.detach(), trainable_grads(model)
    # Same fp32 modules; only the score matmul runs on 5 gathered rows instead of all [5, S] rows (another blocking
    # of the same length-64 dot products): a few fp32 ulps.
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-6)
    assert ours[2].keys() == theirs[2].keys() and len(ours[2]) == 2 * 2 * 7 + 1
    for name in ours[2]:
        torch.testing.assert_close(ours[2][name], theirs[2][name], rtol=1e-4, atol=1e-6, msg=name)
    assert ours[2]["score.weight"].abs().sum() > 0


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_packed_documents_give_the_padded_batch_loss(seed, attention):
    """Documents packed into one row (position ids restarting per document, no mask): pooled on each document's
    last token, the loss, logits and gradients are the padded batch's (fp32)."""
    model = prepare_model(tiny_classifier(), QLoRAConfig(r=4, init_lora_weights="random", attention=attention))
    model.train()
    docs = texts(6, lo=1, hi=15)  # a 1-token document too
    docs[2] = docs[2][:1]
    labels = torch.randint(0, 3, (6,))
    ids, mask = padded(docs)
    ref = run(model, input_ids=ids, attention_mask=mask, labels=labels)
    batch = collate_packed([TokenizedExample(d, [-100] * len(d)) for d in docs])
    batch.pop("labels")
    assert batch["input_ids"].shape == (1, sum(map(len, docs)))
    got = run(model, **batch, labels=labels)
    # fp32: attention and the linears see the same values in another layout (one row of 6 documents instead of 6
    # padded rows): summation-order differences of a few ulps, amplified by at most the layers' conditioning.
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="labels has 5 entries but the batch has 6 documents"):
        model(**batch, labels=labels[:5])


def test_pooled_positions():
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7], [5, 6, 7, 8, 9]])
    mask = (ids != 0).long()
    rows, cols = pooled_positions(3, 5, "cpu", attention_mask=mask)
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [2, 4, 4]
    # without a mask: HF's rule, the rightmost token that is not the pad id
    assert pooled_positions(3, 5, "cpu", input_ids=ids, pad_token_id=0)[1].tolist() == [2, 4, 4]
    assert pooled_positions(3, 5, "cpu")[1].tolist() == [4, 4, 4]
    # packed rows: a document ends where the position ids restart, at padding, and at the row's end
    pos = torch.tensor([[0, 1, 0, 1, 2, 0, 0], [0, 1, 2, 0, 1, 0, 0]])
    pmask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    rows, cols = pooled_positions(2, 7, "cpu", attention_mask=pmask, position_ids=pos)
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 1), (0, 4), (0, 5), (0, 6), (1, 2), (1, 4)]
    # one position row shared by the batch
    rows, cols = pooled_positions(2, 4, "cpu", position_ids=torch.tensor([[0, 1, 0, 1]]))
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 1), (0, 3), (1, 1), (1, 3)]
    with pytest.raises(ValueError, match="2-D"):
        pooled_positions(2, 4, "cpu", attention_mask=torch.ones(2, 1, 4, 4))


def test_class_weights_and_num_items(seed):
    """loss = Σ w[y] ℓ / N: N this batch's labelled documents, or num_items_in_batch; -100 documents skipped."""
    logits = torch.randn(7, 3)
    labels = torch.tensor([0, 2, 1, -100, 2, 2, 0])
    w = torch.rand(3) + 0.1
    ce = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
    keep = labels != -100
    expect = (w[labels.clamp_min(0)] * ce)[keep].sum() / keep.sum()
    torch.testing.assert_close(classification_loss(logits, labels, weight=w), expect)
    torch.testing.assert_close(classification_loss(logits, labels, weight=w, num_items=10), expect * 6 / 10)
    # two micro-batches normalised by the step's count sum to the one-batch loss
    a = classification_loss(logits[:3], labels[:3], num_items=6) + classification_loss(
        logits[3:], labels[3:], num_items=6
    )
    torch.testing.assert_close(a, classification_loss(logits, labels))
    torch.testing.assert_close(classification_loss(logits, labels), F.cross_entropy(logits, labels))

    model = prepare_model(tiny_classifier(), QLoRAConfig(r=2)).train()
    ids, mask = padded(texts(4))
    y = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, labels=y)
        set_class_weights(model, [1.0, 3.0, 0.5])
        weighted = model(input_ids=ids, attention_mask=mask, labels=y)
    per = F.cross_entropy(plain.logits, y, reduction="none")
    torch.testing.assert_close(weighted.loss, (torch.tensor([1.0, 3.0, 0.5])[y] * per).sum() / 4)
    for bad in ([1.0, 2.0], [1.0, -1.0, 1.0], [0.0, 0.0, 0.0], [1.0, float("nan"), 1.0]):
        with pytest.raises(ValueError, match="class weights must be 3"):
            set_class_weights(model, bad)
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\)"):
        model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 3, 1]))
    with pytest.raises(ValueError, match="integer class ids"):
        model(input_ids=ids, attention_mask=mask, labels=y.float())


def test_classifier_from_causal_lm_shares_the_decoder_and_seeds_the_head(seed):
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    causal = transformers.LlamaForCausalLM(cfg).eval()
    decoder = causal.model
    reference = copy.deepcopy(causal)
    model = classifier_from_causal_lm(causal, ["b", "a", "c"], pad_token_id=PAD, seed=7)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.model is decoder
    assert model.config is decoder.config and model.config.num_labels == 3
    assert model.config.id2label == {0: "b", 1: "a", 2: "c"} and model.config.label2id["c"] == 2
    assert not any(p.is_meta for p in model.parameters()) and not hasattr(model, "lm_head")
    again = classifier_from_causal_lm(copy.deepcopy(reference), ["b", "a", "c"], pad_token_id=PAD, seed=7)
    other = classifier_from_causal_lm(copy.deepcopy(reference), ["b", "a", "c"], pad_token_id=PAD, seed=8)
    assert torch.equal(model.score.weight, again.score.weight)
    assert not torch.equal(model.score.weight, other.score.weight)
    assert 0.01 < float(model.score.weight.detach().std()) < 0.03  # N(0, 0.02²): HF's initializer_range
    # what transformers' own class computes with these weights
    hf = transformers.LlamaForSequenceClassification(copy.deepcopy(model.config)).eval()
    hf.model.load_state_dict(reference.model.state_dict())
    hf.score.weight.data.copy_(model.score.weight)
    ids, mask = padded(texts(3))
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits, hf(input_ids=ids, attention_mask=mask).logits
        )
    with pytest.raises(ValueError, match="at least 2 distinct"):
        classifier_from_causal_lm(copy.deepcopy(reference), ["a", "a"], pad_token_id=PAD)


def _peft_logits(pm, ids, mask):
    with torch.no_grad():
        return pm(input_ids=ids, attention_mask=mask).logits


def test_peft_loads_the_adapter_and_reproduces_the_logits(seed, tmp_path):
    dense = tiny_classifier(num_labels=4)
    dense.config.id2label = {i: f"class{i}" for i in range(4)}
    dense.config.label2id = {f"class{i}": i for i in range(4)}
    ours = prepare_model(
        copy.deepcopy(dense),
        QLoRAConfig(r=4, lora_alpha=8, init_lora_weights="random", target_modules=["q_proj", "v_proj", "up_proj"]),
    )
    with torch.no_grad():
        ours.score.weight.normal_()  # a trained head, not the initial one
    ours.save_pretrained(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, LABELS_NAME])
    saved = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["score"]
    assert read_labels(tmp_path / "a") == [f"class{i}" for i in range(4)]
    state = adapter_state_dict(ours)
    assert torch.equal(state["base_model.model.score.weight"], ours.score.weight) and len(state) == 2 * 2 * 3 + 1

    # the real PEFT on transformers' class whose linears are bitsandbytes Linear4bit with our NF4 bytes
    twin = bnb_twin(dense, ours)
    with torch.no_grad():
        twin.score.weight.zero_()  # PEFT must bring the trained head
    pm = peft.PeftModel.from_pretrained(twin, tmp_path / "a")
    pm.train()  # bitsandbytes' CPU eval path would repack the weight with bf16 scales (tests/models/test_adapters)
    ids, mask = padded(texts(4))
    with torch.no_grad():
        expect = ours.eval()(input_ids=ids, attention_mask=mask).logits
    # bitsandbytes dequantizes the same bytes in another op order: the tolerance of tests/models/test_adapters.py
    torch.testing.assert_close(_peft_logits(pm, ids, mask), expect, rtol=1e-4, atol=1e-4)

    # and back: an adapter PEFT trained (SEQ_CLS: modules_to_save ["classifier", "score"]) loads into ours
    twin2 = bnb_twin(dense, ours)
    pm2 = peft.get_peft_model(
        twin2,
        peft.LoraConfig(
            task_type="SEQ_CLS", r=8, lora_alpha=4, init_lora_weights=False, target_modules=["k_proj", "o_proj"]
        ),
    )
    with torch.no_grad():
        pm2.base_model.model.score.modules_to_save["default"].weight.normal_()
    pm2.save_pretrained(tmp_path / "peft")
    pm2.train()
    loaded = prepare_model(copy.deepcopy(dense), adapter=tmp_path / "peft")
    assert read_adapter_config(tmp_path / "peft")["modules_to_save"] == ["classifier", "score"]
    torch.testing.assert_close(
        loaded.eval()(input_ids=ids, attention_mask=mask).logits, _peft_logits(pm2, ids, mask), rtol=1e-4, atol=1e-4
    )


def test_head_adapters_and_causal_models_do_not_mix(seed, tmp_path):
    from tests.models.test_prepare import tiny

    clf = prepare_model(tiny_classifier(), QLoRAConfig(r=4))
    save_adapter(clf, tmp_path / "clf")
    causal = prepare_model(tiny(), QLoRAConfig(r=4))
    save_adapter(causal, tmp_path / "lm")
    assert not (tmp_path / "lm" / LABELS_NAME).exists()
    with pytest.raises(ValueError, match="load it into a sequence classifier"):
        load_adapter(causal, tmp_path / "clf")
    with pytest.raises(ValueError, match="not a sequence classification adapter"):
        load_adapter(prepare_model(tiny_classifier(), QLoRAConfig(r=4)), tmp_path / "lm")
    with pytest.raises(ValueError, match="a different number of classes"):
        load_adapter(prepare_model(tiny_classifier(num_labels=5), QLoRAConfig(r=4)), tmp_path / "clf")
    cfg = json.loads((tmp_path / "clf" / CONFIG_NAME).read_text())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / CONFIG_NAME).write_text(json.dumps({**cfg, "modules_to_save": ["score", "lm_head"]}))
    with pytest.raises(ValueError, match="modules_to_save=.*'lm_head'.* cannot"):
        read_adapter_config(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="not a sequence classification adapter"):
        read_labels(tmp_path / "lm")


def test_the_classify_step_is_recorded_and_undone(seed):
    model = prepare_model(tiny_classifier(), QLoRAConfig(r=2, lora_dtype="bfloat16"))
    assert model.score.weight.dtype == torch.bfloat16 and model.score.weight.requires_grad
    assert "forward" in model.__dict__
    text = repr(model.quickloris_edits)
    assert "classify" in text and "model.forward" in text and "modules_to_save" in text
    surgery.undo(model, "classify")
    assert "forward" not in model.__dict__ and model.score.weight.dtype == torch.float32
    assert not model.score.weight.requires_grad and surgery.state(model, "modules_to_save") is None
    with pytest.raises(ValueError, match="num_labels >= 2"):
        prepare_model(tiny_classifier(num_labels=1), QLoRAConfig(r=2))
