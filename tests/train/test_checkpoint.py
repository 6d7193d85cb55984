"""Checkpoints restore exactly what was saved (adapter, AdamW state, RNG, history), only complete folders count,
and a checkpoint made with other options is refused."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickloris.models.adapters import adapter_state_dict  # noqa: E402
from quickloris.models.prepare import QLoRAConfig, prepare_model  # noqa: E402
from quickloris.train.checkpoint import (checkpoint_dirs, latest_checkpoint, load_checkpoint,  # noqa: E402
                                         save_checkpoint)
from quickloris.train.loop import LoopState  # noqa: E402
from tests.tiny import tiny_model  # noqa: E402


def _model(seed):
    base = tiny_model(seed=0, vocab_size=64, layers=1)
    torch.manual_seed(seed)
    return prepare_model(base, QLoRAConfig(r=4, init_lora_weights="random"))


def _trained(seed):
    model = _model(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 64, (2, 9))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_round_trip_restores_everything(tmp_path, seed):
    model, opt = _trained(seed)
    history = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": float("nan")}]
    state = LoopState(step=2, total_steps=9, history=history, elapsed=1.25, evals={"before": {"accuracy": 0.0}})
    fp = {"train.lr": 0.01, "data.data": "x.jsonl"}
    torch.manual_seed(seed + 1)
    folder = save_checkpoint(tmp_path, model, opt, state, fp)
    draw = torch.rand(4)  # what the RNG gives right after the checkpoint

    fresh = _model(seed + 7)  # other LoRA weights, fresh optimizer
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(12345)
    restored = load_checkpoint(folder, fresh, fresh_opt, fp)
    assert torch.equal(torch.rand(4), draw)
    assert (restored.step, restored.total_steps, restored.elapsed) == (2, 9, 1.25)
    assert restored.history[0] == history[0] and restored.history[1]["loss"] != restored.history[1]["loss"]  # NaN
    assert restored.evals == state.evals
    for a, b in zip(adapter_state_dict(fresh).values(), adapter_state_dict(model).values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), fresh_opt.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])


def test_other_options_are_refused(tmp_path, seed):
    model, opt = _trained(seed)
    folder = save_checkpoint(tmp_path, model, opt, LoopState(step=3, total_steps=5), {"train.lr": 0.01, "seed": 1})
    with pytest.raises(ValueError, match=r"train\.lr: 0\.01 -> 0\.02"):
        load_checkpoint(folder, model, opt, {"train.lr": 0.02, "seed": 1})


def test_only_complete_checkpoints_count_and_old_ones_go(tmp_path, seed):
    model, opt = _trained(seed)
    assert latest_checkpoint(tmp_path) is None
    for step in (3, 6):
        save_checkpoint(tmp_path, model, opt, LoopState(step=step, total_steps=9), {})
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000006"]  # keep=1: the older one deleted
    save_checkpoint(tmp_path, model, opt, LoopState(step=9, total_steps=9), {}, keep=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000006", "step-000009"]
    # An interrupted save leaves a hidden temporary folder (or a folder without its state file): never picked.
    (tmp_path / "checkpoints" / ".step-000012.tmp-1").mkdir()
    (tmp_path / "checkpoints" / "step-000015").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-000009"
