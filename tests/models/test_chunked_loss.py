"""HF integration of the chunked loss (quickloris.models.chunked_loss) on random-init tiny Llama-family models.

Reference: the same model object's own (class) forward, i.e. HF's logits + ForCausalLMLoss. Loss and every
trainable gradient must match; no tensor as large as the logits may be created in training; HF Trainer with
gradient accumulation must log the same losses and reach the same weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from quickloris.models.chunked_loss import (  # noqa: E402
    ChunkedLossConfig,
    chunked_head_loss,
    chunked_loss_config,
    disable_chunked_loss,
    enable_chunked_loss,
    is_chunked_loss_enabled,
)
from tests.helpers import within  # noqa: E402
from tests.tiny import tiny_model  # noqa: E402

V = 211


def _llama(tied: bool, **kw):
    return tiny_model(vocab_size=V, tie_word_embeddings=tied, **kw).train()


def _batch(B=3, S=17):
    ids = torch.randint(0, V, (B, S))
    labels = ids.clone()
    labels[0, :6] = -100  # a prompt
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # right padding
    labels[mask == 0] = -100
    return ids, mask, labels


def _trainable_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, reference: bool, **inputs):
    """Loss and gradients through the chunked forward, or through the class's own forward (HF's path)."""
    model.zero_grad(set_to_none=True)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if reference:
        saved = inner.__dict__.pop("forward", None)
        try:
            out = model(**inputs)
        finally:
            if saved is not None:
                inner.forward = saved
    else:
        out = model(**inputs)
    out.loss.backward()
    return out, _trainable_grads(model)


def _assert_same(a, b):
    (out_a, g_a), (out_b, g_b) = a, b
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=1e-5, atol=1e-6)
    assert g_a.keys() == g_b.keys() and g_a
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_chunked_loss_matches_hf(seed, tied, use_peft):
    model = _llama(tied)
    if use_peft:
        model = peft.get_peft_model(
            model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
    enable_chunked_loss(model, chunk_size=5)
    ids, mask, labels = _batch()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    for extra in ({}, {"position_ids": pos, "num_items_in_batch": torch.tensor(57)}):
        got = _run(model, False, input_ids=ids, attention_mask=mask, labels=labels, **extra)
        assert got[0].logits is None
        _assert_same(got, _run(model, True, input_ids=ids, attention_mask=mask, labels=labels, **extra))


def test_chunked_loss_never_allocates_logits(seed):
    """Every tensor created with a vocabulary-sized last dim holds at most one chunk of rows (HF's path: all)."""

    class VocabTensors(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                # logits-shaped: [..., V]; the transposed head weight [H, V] is not
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == V and t.shape != (32, V):
                    self.rows = max(self.rows, t.numel() // V)
            return out

    model = _llama(True)
    ids, mask, labels = _batch(4, 31)
    with VocabTensors() as hf:
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert hf.rows >= 4 * 31
    enable_chunked_loss(model, chunk_size=8)
    with VocabTensors() as ours:
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert 0 < ours.rows <= 8


def test_chunked_loss_generation_eval_and_tuple_paths(seed):
    model = _llama(False)
    ids, mask, labels = _batch()
    want = model(input_ids=ids, attention_mask=mask).logits
    enable_chunked_loss(model)
    assert is_chunked_loss_enabled(model)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want)  # no labels: logits
    model.eval()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)  # eval: HF's own path, logits and loss
    assert out.logits is not None and out.loss is not None
    model.train()
    tup = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(tup, tuple) and tup[0].dim() == 0
    kept = model(input_ids=ids, labels=labels[:, -4:], logits_to_keep=4)
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[:, -4:]
        z = model.lm_head(hidden).float()
        ref = torch.nn.functional.cross_entropy(z[:, :-1].reshape(-1, V), labels[:, -3:].reshape(-1))
    torch.testing.assert_close(kept.loss, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=ids, labels=labels, logits_to_keep=4)
    with pytest.raises(ValueError, match="labels must be in"):
        model(input_ids=ids, labels=torch.full_like(labels, V))
    generated = model.generate(ids[:1, :5], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 8)


def test_chunked_loss_enable_disable_roundtrip(seed):
    model = _llama(True)
    sentinel = model.forward  # an instance-level forward installed by someone else must survive
    model.forward = sentinel
    enable_chunked_loss(model, ChunkedLossConfig(memory_budget=1 << 20))
    enable_chunked_loss(model, chunk_size=3)  # again: only the config changes
    assert chunked_loss_config(model).chunk_size == 3
    assert type(model).forward is transformers.LlamaForCausalLM.forward  # the class is untouched
    disable_chunked_loss(model)
    assert model.__dict__["forward"] is sentinel and not is_chunked_loss_enabled(model)
    disable_chunked_loss(model)  # no-op
    with pytest.raises(ValueError, match="not both"):
        ChunkedLossConfig(chunk_size=4, memory_budget=1 << 20)
    with pytest.raises(TypeError, match="causal LM"):
        enable_chunked_loss(torch.nn.Linear(3, 3))


def test_chunked_loss_module_head_and_softcap(seed):
    """A LoRA-wrapped lm_head (module path) and Gemma 2's final-logit softcapping."""
    model = peft.get_peft_model(
        _llama(False), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    )
    enable_chunked_loss(model, chunk_size=7)
    ids, mask, labels = _batch()
    got = _run(model, False, input_ids=ids, attention_mask=mask, labels=labels)
    assert any("lm_head.lora" in n for n in got[1])
    _assert_same(got, _run(model, True, input_ids=ids, attention_mask=mask, labels=labels))

    gcfg = transformers.Gemma2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=3.0,
    )
    gemma = transformers.Gemma2ForCausalLM(gcfg).train()
    enable_chunked_loss(gemma, chunk_size=6)
    got = _run(gemma, False, input_ids=ids, attention_mask=mask, labels=labels)
    _assert_same(got, _run(gemma, True, input_ids=ids, attention_mask=mask, labels=labels))


def test_chunked_head_loss_grpo_matches_naive(seed):
    """GRPO on a PEFT model: chunked log-probs vs full logits give the same loss and LoRA gradients."""
    from quickloris.ops.linear_losses import grpo_token_loss

    model = peft.get_peft_model(
        _llama(True), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    ids, mask, labels = _batch(4, 15)
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    adv = torch.randn(4, 1).expand(4, 15).contiguous()
    valid = targets != -100
    old = torch.randn(4, 15) * 0.1 - 5.0

    def loss_fn(chunked: bool):
        model.zero_grad(set_to_none=True)
        base = model.get_base_model()
        hidden = base.model(input_ids=ids, attention_mask=mask).last_hidden_state
        if chunked:
            per = chunked_head_loss(
                hidden,
                base.lm_head,
                targets,
                loss="grpo",
                reduction="none",
                advantages=adv,
                old_logprobs=old,
                config=ChunkedLossConfig(chunk_size=9),
            )
        else:
            logp = torch.log_softmax(base.lm_head(hidden).float(), -1)
            logp = logp.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
            per = grpo_token_loss(logp, adv, torch.where(valid, old, logp.detach())) * valid
        loss = (per.sum(-1) / valid.sum(-1).clamp_min(1)).mean()  # GRPO: per-sequence mean, then batch mean
        loss.backward()
        return loss.detach(), _trainable_grads(model)

    (la, ga), (lb, gb) = loss_fn(True), loss_fn(False)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys() and all("lora" in n for n in ga)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6, msg=n)


def test_chunked_loss_under_trainer_with_gradient_accumulation(seed, tmp_path):
    """HF Trainer (grad accumulation 2, padded batches of unequal label counts): same logged losses, same weights."""
    torch.manual_seed(seed)
    rows = []
    for i in range(8):
        n = 6 + (5 * i) % 11
        ids = torch.randint(0, V, (n,)).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (i % 4) + ids[i % 4 :]})

    def collate(batch):
        S = max(len(r["input_ids"]) for r in batch)
        pad = lambda xs, v: xs + [v] * (S - len(xs))  # noqa: E731
        return {
            "input_ids": torch.tensor([pad(r["input_ids"], 0) for r in batch]),
            "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in batch]),
            "labels": torch.tensor([pad(r["labels"], -100) for r in batch]),
        }

    base = _llama(False)
    seen = []

    def train(chunked: bool):
        model = copy.deepcopy(base)
        if chunked:
            enable_chunked_loss(model, chunk_size=8)
            fwd = model.forward
            model.forward = lambda *a, **k: (seen.append(k.get("num_items_in_batch")), fwd(*a, **k))[1]
        # SGD without clipping: the update is lr x the gradient, so the weights show the gradients' scale (AdamW's
        # update hides it, and turns rounding-level differences of near-zero gradient entries into ~lr).
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(chunked)),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=2,
            learning_rate=0.5,
            optim="sgd",
            max_grad_norm=0.0,
            lr_scheduler_type="constant",
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=0,
            data_seed=0,
            disable_tqdm=True,
            remove_unused_columns=False,
        )
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        return logs, init, {n: p.detach() for n, p in model.named_parameters()}

    (l_hf, init, p_hf), (l_ch, _, p_ch) = train(False), train(True)
    assert seen and all(torch.is_tensor(s) for s in seen), "Trainer did not pass num_items_in_batch"
    # The same fp32 sums in another order (chunk by chunk vs the whole logits): a few ulps, relative.
    assert len(l_hf) == 2 and [h["loss"] for h in l_ch] == pytest.approx([h["loss"] for h in l_hf], rel=1e-5)
    assert [h["grad_norm"] for h in l_ch] == pytest.approx([h["grad_norm"] for h in l_hf], rel=1e-5)
    # Weights: init - lr (g1 + g2) with each g equal to rounding (1e-5 of the gradient: u = 6e-8 times the
    # partial cancellation of its sums over tokens), so the difference is within 1e-5 of how far the weights moved
    # (measured <= 1e-6); a wrong normalisation of a micro-batch moves them by a sizeable fraction of it.
    for n, w in p_hf.items():
        moved = float((w - init[n]).norm())
        within(float((p_ch[n] - w).norm()), 1e-5 * moved + 2 * 2**-24 * float(w.norm()), f"{n}")
