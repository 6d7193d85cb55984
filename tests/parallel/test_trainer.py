"""The prepared (and compiled) model inside the unchanged transformers Trainer and TRL SFTTrainer: the logged loss
of a gradient-accumulation step is the token-weighted loss of the whole step (sum over both micro-batches / their
total label count), checkpoints are PEFT adapter folders."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from quickloris.models.adapters import CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict, load_adapter  # noqa: E402
from quickloris.models.prepare import QLoRAConfig, prepare_model  # noqa: E402
from quickloris.parallel.compile import CompileConfig, compile_stats, reset_compile_stats  # noqa: E402
from quickloris.parallel.compose import build_training_model  # noqa: E402
from tests.helpers import require  # noqa: E402
from tests.tiny import tiny_model  # noqa: E402

V = 97


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny():
    return tiny_model(vocab_size=V, pad_token_id=0, eos_token_id=1)


def _recorder(model, seen):
    def hook(module, args, kwargs):
        seen.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def _step_loss(reference, micro_batches):
    """Sum of token losses over the step's micro-batches / total label count (at the reference's weights)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for kw in micro_batches:
            labels = kw["labels"]
            logits = reference(input_ids=kw["input_ids"], attention_mask=kw.get("attention_mask")).logits
            shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
            total += F.cross_entropy(
                logits.float().flatten(0, 1), shifted.flatten(), reduction="sum", ignore_index=-100
            ).item()
            count += int((shifted != -100).sum())
    return total / count


def _rows(n_rows, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n_rows):
        n = int(torch.randint(6, 40, (1,), generator=g))
        ids = torch.randint(2, V, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (i % 5) + ids[i % 5 :]})  # unequal label counts
    return rows


def _collate(batch):
    S = max(len(r["input_ids"]) for r in batch)
    pad = lambda xs, v: xs + [v] * (S - len(xs))  # noqa: E731
    return {
        "input_ids": torch.tensor([pad(r["input_ids"], 0) for r in batch]),
        "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in batch]),
        "labels": torch.tensor([pad(r["labels"], -100) for r in batch]),
    }


def test_trainer_grad_accumulation_is_token_normalised_and_saves_adapters(seed, tmp_path):
    base = _tiny()
    qcfg = QLoRAConfig(r=4, init_lora_weights="random")
    torch.manual_seed(seed)
    model = build_training_model(copy.deepcopy(base), qcfg, compile=CompileConfig(backend="aot_eager"))
    reference = copy.deepcopy(model).eval()  # the initial weights; eval: HF's own logits path
    seen: list[dict] = []
    handle = _recorder(model, seen)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="steps",
        save_steps=2,
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        remove_unused_columns=False,
        gradient_checkpointing=True,
    )
    reset_compile_stats()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_rows(8, seed), data_collator=_collate)
    trainer.train()
    handle.remove()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and len(seen) == 4
    assert all(torch.is_tensor(kw.get("num_items_in_batch")) for kw in seen), "Trainer did not pass num_items"
    step1 = seen[:2]
    assert int(step1[0]["num_items_in_batch"]) == sum(int((kw["labels"][:, 1:] != -100).sum()) for kw in step1)
    assert logged[0] == pytest.approx(_step_loss(reference, step1), rel=1e-4)
    # The LoRA weights moved: AdamW's first update is lr * m/sqrt(v) = lr per element with a gradient (the two steps'
    # losses, on different batches, say nothing about it: at seed 23 they agreed to 2e-7)
    before, after = adapter_state_dict(reference), adapter_state_dict(model)
    for name, w in after.items():
        assert float((w.float() - before[name].float()).abs().max()) > 0.5 * args.learning_rate, name
    assert compile_stats()["graph_breaks"] == 0
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert (ckpt / CONFIG_NAME).is_file() and (ckpt / WEIGHTS_NAME).is_file()
    fresh = prepare_model(copy.deepcopy(base), qcfg)
    load_adapter(fresh, ckpt)
    torch.testing.assert_close(adapter_state_dict(fresh), adapter_state_dict(model), rtol=0, atol=0)


def test_sft_trainer_trains_with_token_normalised_loss(seed, tmp_path):
    trl = require("trl")
    datasets = require("datasets")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(V - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")
    g = torch.Generator().manual_seed(seed)
    texts = [
        " ".join(
            f"w{int(i)}" for i in torch.randint(0, V - 2, (int(torch.randint(5, 30, (1,), generator=g)),), generator=g)
        )
        for _ in range(12)
    ]
    torch.manual_seed(seed)
    model = build_training_model(
        _tiny(), QLoRAConfig(r=4, init_lora_weights="random"), compile=CompileConfig(backend="aot_eager")
    )
    reference = copy.deepcopy(model).eval()
    seen: list[dict] = []
    handle = _recorder(model, seen)
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        max_length=64,
        bf16=False,
    )
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": texts}), processing_class=tokenizer
    )
    trainer.train()
    handle.remove()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and len(seen) == 4
    assert logged[0] == pytest.approx(_step_loss(reference, seen[:2]), rel=1e-4)
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / WEIGHTS_NAME).is_file()
