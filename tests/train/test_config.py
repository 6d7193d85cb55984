"""What a resumed run must match: every option that changes the trajectory is in the fingerprint, and the ones
left out are exactly where and how often a run writes, the speed switches and the run length; compile and
activation checkpointing stay automatic (on with a GPU) through the nested configs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from quickloris.cli.train import groups  # noqa: E402
from quickloris.config import flatten  # noqa: E402
from quickloris.data.config import DataConfig  # noqa: E402
from quickloris.models.prepare import QLoRAConfig  # noqa: E402
from quickloris.parallel.compile import CompileConfig  # noqa: E402
from quickloris.parallel.compose import CheckpointConfig  # noqa: E402
from quickloris.train.config import ModelConfig, TrainConfig  # noqa: E402
from quickloris.train.run import fingerprint  # noqa: E402

NOT_COMPARED = {  # may differ between a run and its resumption
    "data.num_eval",
    "data.data_workers",  # the examples are the same with any number of tokenizing processes
    "train.output_dir",
    "train.overwrite",
    "train.max_steps",
    "train.epochs",
    "train.save_every",
    "train.resume",
    "train.log_every",
    "train.progress",
    "train.eval_before",
    "train.eval_after",
    "train.class_weights",  # compared for classification runs only, so causal runs' checkpoints keep their fingerprint
    *(f"train.compile.{k}" for k in flatten(CompileConfig())),
    *(f"train.checkpointing.{k}" for k in flatten(CheckpointConfig())),
}


def test_the_fingerprint_covers_every_trajectory_option():
    cfgs = {"data": DataConfig(), "qlora": QLoRAConfig(), "train": TrainConfig()}
    every = {f"{name}.{k}" for name, cfg in cfgs.items() for k in flatten(cfg)}
    fp = fingerprint(
        ModelConfig(),
        cfgs["data"],
        cfgs["qlora"],
        cfgs["train"],
        torch.float32,
        {"data.file_sha256": None, "data.examples": 3, "data.tokens_sha256": "ab"},
    )
    assert set(fp) == (every - NOT_COMPARED) | {
        "model",
        "adapter",
        "dtype",
        "data.file_sha256",
        "data.examples",
        "data.tokens_sha256",
    }
    assert fp["dtype"] == "torch.float32" and fp["train.lr"] == 2e-3 and fp["qlora.r"] == 16
    cls = fingerprint(
        ModelConfig(task_type="classification"),
        cfgs["data"],
        cfgs["qlora"],
        TrainConfig(class_weights="auto"),
        torch.float32,
        {},
    )
    assert cls["task_type"] == "classification" and cls["train.class_weights"] == "auto"
    # the groups `quickloris train` builds are the ones fingerprinted (and FSDP runs are not resumable)
    assert [cls for _, cls in groups()][:4] == [ModelConfig, DataConfig, QLoRAConfig, TrainConfig]


@pytest.mark.parametrize("device, on", [("cpu", False), ("cuda", True)])
def test_compile_and_checkpointing_are_automatic(device, on):
    cfg = TrainConfig()
    assert cfg.compile.enabled is None and cfg.checkpointing.gradient_checkpointing is None
    assert cfg.compile.resolved(device).enabled is on
    assert cfg.checkpointing.resolved(device).gradient_checkpointing is on
    forced = TrainConfig(compile={"enabled": True}, checkpointing=CheckpointConfig(gradient_checkpointing=False))
    assert forced.compile.resolved(device).enabled is True
    assert forced.checkpointing.resolved(device).gradient_checkpointing is False
    assert CompileConfig().enabled is True and CheckpointConfig().gradient_checkpointing is True  # library defaults
