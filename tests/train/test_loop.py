"""The training loop against plain PyTorch: the step loss and gradient of accumulated micro-batches equal one big
batch's token mean (HF logits, full vocabulary), the schedule follows its formula, the batch stream is the
per-epoch plan laid end to end."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from quickloris.data.chat import TokenizedExample  # noqa: E402
from quickloris.data.packing import collate_padded, epoch_batches  # noqa: E402
from quickloris.models.prepare import QLoRAConfig  # noqa: E402
from quickloris.parallel.compose import CheckpointConfig, build_training_model  # noqa: E402
from quickloris.train.config import TrainConfig  # noqa: E402
from quickloris.train.loop import BatchStream, LoopState, lr_at, micro_batch_loss, plan_steps, train_loop  # noqa: E402
from tests.tiny import tiny_model  # noqa: E402

V = 101


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed):
    return build_training_model(
        tiny_model(seed=seed, vocab_size=V, pad_token_id=0),
        QLoRAConfig(r=4, init_lora_weights="random"),
        checkpointing=CheckpointConfig(gradient_checkpointing=False),
    )


def _examples(n, seed):
    """Examples of odd lengths with 0..many trained tokens at varying places (one with none at all)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 23, (1,), generator=g))
        ids = torch.randint(1, V, (length,), generator=g).tolist()
        start = int(torch.randint(1, length, (1,), generator=g))
        labels = [-100] * start + ids[start:] if i != 2 else [-100] * length
        out.append(TokenizedExample(ids, labels, f"ex{i}"))
    return out


def _reference(model, examples, batches):
    """(1/N) Σ token CE over all micro-batches with full logits, and its gradient wrt the LoRA parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    total, count = 0.0, 0
    for rows in batches:
        b = collate_padded([examples[i] for r in rows for i in r], 0)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # eval: HF's own path
        target = F.pad(b["labels"][:, 1:], (0, 1), value=-100)
        total = total + F.cross_entropy(
            logits.float().flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum"
        )
        count += int((target != -100).sum())
    loss = total / count
    return loss.item(), torch.autograd.grad(loss, params)


def test_accumulated_step_equals_one_batch_token_mean(seed):
    model = _model(seed)
    examples = _examples(12, seed)
    cfg = TrainConfig(
        max_steps=1,
        batch_size=3,
        grad_accum=3,
        warmup_steps=0,
        lr_schedule="constant",
        lr=1.0,
        max_grad_norm=None,
        seed=seed % 1000,
        progress=False,
    )
    plan = epoch_batches([len(e) for e in examples], batch_size=3, seed=cfg.seed, epoch=0)[:3]
    reference = copy.deepcopy(model).eval()
    ref_loss, ref_grads = _reference(reference, examples, plan)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)  # update = -gradient
    state = train_loop(model, examples, cfg, optimizer=opt, pad_token_id=0, packing=False, max_seq_len=64)
    rec = state.history[0]
    assert rec["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert rec["trained_tokens"] == sum(
        e.num_trainable for rows in plan for r in rows for e in [examples[i] for i in r]
    )
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    for b, a, g in zip(before, after, ref_grads):
        torch.testing.assert_close(b - a, g, rtol=1e-4, atol=1e-6)


def test_labelled_positions_only_equals_the_full_head(seed):
    model = _model(seed).train()
    examples = _examples(5, seed + 1)
    batch = collate_padded(examples, 0)
    num = torch.tensor(int((F.pad(batch["labels"][:, 1:], (0, 1), value=-100) != -100).sum()))
    ours = micro_batch_loss(model, batch, num)
    reference = copy.deepcopy(model).eval()
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    full = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum") / num
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-6)
    none = collate_padded([examples[2]], 0)  # the example without trained tokens
    assert micro_batch_loss(model, none, torch.tensor(1)) is None


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedule(schedule):
    lr, warmup, total = 3e-3, 4, 20
    values = [lr_at(s, lr=lr, schedule=schedule, warmup=warmup, total=total) for s in range(total)]
    assert values[:warmup] == pytest.approx([lr * k / 5 for k in range(1, 5)])  # never 0 (a wasted step)
    assert values[warmup] == pytest.approx(lr)
    p = (total - 1 - warmup) / (total - warmup)
    last = {"cosine": lr * 0.5 * (1 + math.cos(math.pi * p)), "linear": lr * (1 - p), "constant": lr}[schedule]
    assert values[-1] == pytest.approx(last) and values[-1] > 0
    if schedule != "constant":
        assert all(a > b for a, b in zip(values[warmup:], values[warmup + 1 :]))
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_at(10, lr=lr, schedule="step", warmup=0, total=20)


@pytest.mark.parametrize("packing", [False, True])
def test_batch_stream_is_the_epochs_end_to_end(seed, packing):
    examples = _examples(23, seed)
    lengths = [len(e) for e in examples]
    stream = BatchStream(examples, batch_size=4, seed=seed, packing=packing, max_seq_len=40)
    expected = [
        b
        for e in range(3)
        for b in epoch_batches(lengths, batch_size=4, seed=seed, epoch=e, packing=packing, max_seq_len=40)
    ]
    assert [stream.get(k) for k in range(len(expected))] == expected
    fresh = BatchStream(examples, batch_size=4, seed=seed, packing=packing, max_seq_len=40)
    k = len(expected) - 2  # a resumed run asks for a late batch first
    assert fresh.get(k) == expected[k]
    cfg = TrainConfig(epochs=2, batch_size=4, grad_accum=3, progress=False)
    steps, limit = plan_steps(stream, cfg)
    assert limit == stream.epoch_start(2) and steps == -(-limit // 3)


def test_step_without_trained_tokens_leaves_weights(seed):
    model = _model(seed)
    ex = [TokenizedExample([5, 6, 7], [-100, -100, -100], "none")]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    cfg = TrainConfig(max_steps=2, batch_size=1, progress=False)
    state = train_loop(model, ex, cfg, optimizer=opt, pad_token_id=0, packing=False, max_seq_len=8, state=LoopState())
    assert [math.isnan(r["loss"]) for r in state.history] == [True, True]
    assert all(torch.equal(b, p) for b, p in zip(before, (p for p in model.parameters() if p.requires_grad)))


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_packed_batch_loss_equals_padded(seed, attention):
    """The same examples packed into one padding-free row or right-padded: the same token-mean loss."""
    from quickloris.data.packing import collate_packed
    from quickloris.models.attention import set_attention

    model = _model(seed).train()
    set_attention(model, attention)
    examples = [e for e in _examples(6, seed + 3) if e.num_trainable]
    num = torch.tensor(sum(e.num_trainable for e in examples))
    padded = micro_batch_loss(model, collate_padded(examples, 0), num)
    packed = micro_batch_loss(model, collate_packed(examples), num)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("poison", ["loss", "inf-loss", "gradient"])
def test_a_non_finite_step_stops_the_loop_before_the_optimizer_steps(seed, poison, monkeypatch):
    """Step 3's loss (NaN or inf) or one gradient entry (NaN) is poisoned: the loop raises at step 3, keeps step 3's
    record, and the weights and AdamW state are those after step 2 (a NaN step is never applied)."""
    import quickloris.train.loop as loop
    from quickloris.train.loop import TrainingDiverged

    model = _model(seed)
    examples = [e for e in _examples(16, seed) if e.num_trainable]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    state = LoopState()
    loss_of = loop.micro_batch_loss
    value = {"loss": float("nan"), "inf-loss": float("inf"), "gradient": float("nan")}[poison]

    def poisoned(*args, **kwargs):
        loss = loss_of(*args, **kwargs)
        if state.step == 2 and loss is not None:  # during the third step
            if poison == "gradient":
                params[0].register_hook(lambda g: g.index_fill(0, torch.tensor([0]), value))
                return loss
            return loss * value
        return loss

    monkeypatch.setattr(loop, "micro_batch_loss", poisoned)
    snapshots = []
    cfg = TrainConfig(max_steps=6, batch_size=4, progress=False, seed=seed % 1000)
    with pytest.raises(TrainingDiverged) as info:
        train_loop(
            model,
            examples,
            cfg,
            optimizer=opt,
            pad_token_id=0,
            packing=False,
            max_seq_len=64,
            state=state,
            on_step_end=lambda st: snapshots.append([p.detach().clone() for p in params]),
        )
    e = info.value
    what = "the gradient norm" if poison == "gradient" else "the loss"
    assert (e.step, e.what) == (3, what) and (math.isnan(e.value) or (poison == "inf-loss" and e.value == math.inf))
    assert "training diverged at step 3" in str(e) and "--lr" in str(e)
    assert len(snapshots) == 2 and [r["step"] for r in state.history] == [1, 2, 3]
    assert all(torch.equal(a, p) for a, p in zip(snapshots[-1], params))  # step 3 was not applied
    assert all(int(opt.state[p]["step"]) == 2 for p in params)
    key = "grad_norm" if poison == "gradient" else "loss"
    assert math.isfinite(state.history[1][key]) and not math.isfinite(state.history[2][key])
