"""Checkpoints restore exactly what was saved (adapter, AdamW state, RNG, history), only complete folders count,
a checkpoint made with other options is refused, a damaged one (flipped bit, truncated file) is detected by its
manifest and skipped for the previous intact one, non-finite weights are never saved, and Ctrl-C in the middle of a
write leaves no folder behind."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickloris.models.adapters import adapter_state_dict  # noqa: E402
from quickloris.models.prepare import QLoRAConfig, prepare_model  # noqa: E402
from quickloris.train.checkpoint import (  # noqa: E402
    CheckpointError,
    checkpoint_dirs,
    latest_checkpoint,
    load_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
    verify,
)
from quickloris.train.loop import LoopState, TrainingDiverged  # noqa: E402
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
        save_checkpoint(tmp_path, model, opt, LoopState(step=step, total_steps=9), {}, keep=1)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000006"]  # keep=1: the older one deleted
    save_checkpoint(tmp_path, model, opt, LoopState(step=9, total_steps=9), {}, keep=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000006", "step-000009"]
    # An interrupted save leaves a hidden temporary folder (or a folder without its state file): never picked.
    (tmp_path / "checkpoints" / ".step-000012.tmp-1").mkdir()
    (tmp_path / "checkpoints" / "step-000015").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-000009"


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "no-manifest"])
def test_a_damaged_checkpoint_is_reported_and_the_previous_one_used(tmp_path, seed, damage):
    model, opt = _trained(seed)
    for step in (2, 4):
        save_checkpoint(tmp_path, model, opt, LoopState(step=step, total_steps=9), {"seed": 1})
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000002", "step-000004"]  # keep=2 by default
    newest = tmp_path / "checkpoints" / "step-000004"
    assert verify(newest) is None
    target = {
        "flip": "adapter_model.safetensors",
        "truncate": "trainer_state.pt",
        "delete": "adapter_config.json",
        "no-manifest": "manifest.json",
    }[damage]
    path = newest / target
    data = bytearray(path.read_bytes())
    if damage == "flip":  # one bit of one weight, somewhere after the safetensors header
        i = len(data) - 1 - int(torch.randint(0, 64, ()).item())
        data[i] ^= 1 << int(torch.randint(0, 8, ()).item())
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        path.unlink()
    if damage == "no-manifest":  # no manifest: not a complete checkpoint at all
        assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000002"]
        return
    problem = verify(newest)
    assert problem is not None and target in problem
    notices: list[str] = []
    assert resumable_checkpoint(tmp_path, notices.append).name == "step-000002"
    assert len(notices) == 1 and "step-000004 is damaged" in notices[0] and "resuming from step-000002" in notices[0]
    with pytest.raises(CheckpointError, match="step-000004 is damaged: " + target):
        load_checkpoint(newest, model, opt, {"seed": 1})
    (tmp_path / "checkpoints" / "step-000002" / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no intact checkpoint.*step-000004: .*step-000002: trainer_state.pt"):
        resumable_checkpoint(tmp_path)


def test_non_finite_weights_are_never_saved(tmp_path, seed):
    model, opt = _trained(seed)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("nan")
    with pytest.raises(TrainingDiverged, match="step 3: trainable weight .*lora_A"):
        save_checkpoint(tmp_path, model, opt, LoopState(step=3, total_steps=9), {})
    assert not (tmp_path / "checkpoints").exists()


def test_interrupted_write_leaves_nothing(tmp_path, seed, monkeypatch):
    """Ctrl-C while trainer_state.pt is written: neither the step folder nor its temporary folder stays."""
    model, opt = _trained(seed)
    save_checkpoint(tmp_path, model, opt, LoopState(step=2, total_steps=9), {})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model, opt, LoopState(step=4, total_steps=9), {})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]


def test_the_data_fingerprint_of_files_and_folders(tmp_path):
    import hashlib

    from quickloris.data.chat import TokenizedExample
    from quickloris.train.checkpoint import data_fingerprint

    a, b = tmp_path / "a.jsonl", tmp_path / "b.csv"
    a.write_text('{"text": "x"}\n')
    b.write_text("text\ny\n")
    ex = [TokenizedExample([1, 2], [-100, 2])]
    fp = data_fingerprint(ex, str(a))
    assert fp == {
        "data.file_sha256": hashlib.sha256(a.read_bytes()).hexdigest()[:16],  # one file: its own SHA-256
        "data.examples": 1,
        "data.tokens_sha256": fp["data.tokens_sha256"],
    }
    assert data_fingerprint(ex, [str(a)]) == fp and data_fingerprint(ex, None)["data.file_sha256"] is None
    both = data_fingerprint(ex, [a, b])["data.file_sha256"]
    assert both not in (fp["data.file_sha256"], data_fingerprint(ex, [b, a])["data.file_sha256"])  # order counts
    folder = tmp_path / "ds"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "data.arrow").write_bytes(b"1")
    before = data_fingerprint(ex, folder)["data.file_sha256"]
    (folder / "train" / "data.arrow").write_bytes(b"2")
    assert data_fingerprint(ex, folder)["data.file_sha256"] != before
