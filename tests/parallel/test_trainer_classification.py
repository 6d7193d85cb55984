"""A prepared (activation-checkpointed) sequence classifier in the plain transformers Trainer: the
logged loss of a gradient-accumulation step is the mean cross-entropy over all the step's texts (the micro-batches
normalised by the step's label count that Trainer passes as num_items_in_batch), the score head trains, and the
checkpoints are PEFT adapter folders holding it (modules_to_save) and the class names."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from quickloris.models.adapters import LABELS_NAME, WEIGHTS_NAME, adapter_state_dict, load_adapter  # noqa: E402
from quickloris.models.prepare import QLoRAConfig, prepare_model  # noqa: E402
from quickloris.parallel.compose import CheckpointConfig, build_training_model  # noqa: E402
from tests.models.test_classification import PAD, padded, texts, tiny_classifier  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(n):
    return [{"input_ids": t, "labels": int(torch.randint(0, 3, ()))} for t in texts(n, lo=2, hi=20)]


def _collate(batch):
    ids, mask = padded([r["input_ids"] for r in batch])
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([r["labels"] for r in batch])}


def test_trainer_trains_a_classifier_with_the_step_mean_loss_and_saves_the_head(seed, tmp_path):
    base = tiny_classifier()
    base.config.id2label = {0: "x", 1: "y", 2: "z"}
    base.config.label2id = {"x": 0, "y": 1, "z": 2}
    qcfg = QLoRAConfig(r=4, init_lora_weights="random")
    model = build_training_model(copy.deepcopy(base), qcfg, checkpointing=CheckpointConfig(gradient_checkpointing=True))
    reference = copy.deepcopy(model).eval()
    head0 = model.score.weight.detach().clone()
    seen: list[dict] = []
    handle = model.register_forward_pre_hook(
        lambda m, a, kw: seen.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kw.items()}),
        with_kwargs=True,
    )
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
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_rows(8), data_collator=_collate)
    trainer.train()
    handle.remove()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and len(seen) == 4
    assert all(int(kw["num_items_in_batch"]) == 4 for kw in seen), "Trainer did not pass the step's label count"
    with torch.no_grad():  # the mean cross-entropy over the 4 texts of step 1, at the initial weights
        step1 = seen[:2]
        logits = torch.cat(
            [reference(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"]).logits for kw in step1]
        )
        expect = F.cross_entropy(logits.float(), torch.cat([kw["labels"] for kw in step1])).item()
    assert logged[0] == pytest.approx(expect, rel=1e-5)
    assert logged[1] != pytest.approx(logged[0], rel=1e-6)
    assert not torch.equal(model.score.weight.detach(), head0)  # the head trains
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert (ckpt / WEIGHTS_NAME).is_file() and (ckpt / LABELS_NAME).is_file()
    fresh = prepare_model(copy.deepcopy(base), qcfg)
    load_adapter(fresh, ckpt)
    saved, trained = adapter_state_dict(fresh), adapter_state_dict(model)
    assert "base_model.model.score.weight" in saved
    torch.testing.assert_close(saved, trained, rtol=0, atol=0)
    ids, mask = padded(texts(3))
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.eval()(input_ids=ids, attention_mask=mask).logits,
            model.eval()(input_ids=ids, attention_mask=mask).logits,
            rtol=1e-5,
            atol=1e-6,
        )
    assert PAD == base.config.pad_token_id
