"""examples/fsdp_two_gpus.py under torchrun on CPU ranks (gloo): the plain transformers Trainer on 2 ranks logs the
same per-step losses as on 1 rank with the same global batches, the adapter saved from the sharded run loads on
one process, TRL's SFTTrainer runs too; the accelerate FSDP2 config parses. On GPUs: the multigpu test."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from tests.helpers import require  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "fsdp_two_gpus.py"


def torchrun(nproc: int, out: Path, *args: str, device: str = "cpu", timeout: float = 300) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(EXAMPLE),
        "--device",
        device,
        "--tiny",
        "--eval",
        "0",
        "--out",
        str(out),
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1" if device == "cpu" else "0")
    proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "run_summary.json").read_text())


def example_module():
    spec = importlib.util.spec_from_file_location("fsdp_two_gpus", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_adapter_loads_on_one_process(out: Path, device: str = "cpu") -> None:
    from quickloris.models.adapters import adapter_state_dict
    from quickloris.models.prepare import QLoRAConfig, prepare_model

    ex = example_module()
    model, _ = ex.load(ex.parse(["--tiny", "--device", device]), device)
    prepare_model(model, QLoRAConfig(), adapter=str(out))
    weights = adapter_state_dict(model)
    assert len(weights) == 2 * 7 * 2 and any(bool(t.abs().sum() > 0) for k, t in weights.items() if "lora_B" in k)


def test_trainer_two_ranks_match_one_rank_and_adapter_loads(tmp_path):
    two = torchrun(2, tmp_path / "two", "--steps", "3", "--batch", "4")
    # One rank, the same 8 examples per step as the same two micro-batches of 4 (what the two ranks ran).
    one = torchrun(1, tmp_path / "one", "--steps", "3", "--batch", "4", "--grad-accum", "2")
    assert two["world_size"] == 2 and two["global_batch"] == one["global_batch"] == 8
    assert two["sharding"]["nf4_sharded"] == 14 and two["offload"]
    assert len(two["losses"]) == 3
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)  # bf16 compute, same micro-batch shapes
    assert two["losses"][-1] < two["losses"][0]
    check_adapter_loads_on_one_process(tmp_path / "two")


def test_sft_trainer_two_ranks(tmp_path):
    require("trl")
    require("datasets")
    res = torchrun(2, tmp_path / "sft", "--steps", "2", "--trainer", "sft", "--no-offload")
    assert res["trainer"] == "sft" and len(res["losses"]) == 2 and not res["offload"]
    assert (tmp_path / "sft" / "adapter_model.safetensors").is_file()


def test_accelerate_config_selects_fsdp2():
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "examples" / "fsdp_accelerate.yaml"))
    assert str(cfg.distributed_type).endswith("FSDP") and cfg.fsdp_config["fsdp_version"] == 2
    assert cfg.num_processes == 2 and cfg.mixed_precision == "no"


@pytest.mark.multigpu
def test_trainer_on_two_gpus(tmp_path):
    two = torchrun(2, tmp_path / "two", "--steps", "4", "--batch", "4", "--no-compile", device="cuda", timeout=420)
    one = torchrun(
        1,
        tmp_path / "one",
        "--steps",
        "4",
        "--batch",
        "4",
        "--grad-accum",
        "2",
        "--no-compile",
        device="cuda",
        timeout=420,
    )
    assert two["world_size"] == 2 and two["offload"]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-3)
    compiled = torchrun(2, tmp_path / "compiled", "--steps", "3", "--compile", device="cuda", timeout=420)  # inductor
    assert compiled["compiled"] and compiled["losses"][0] == pytest.approx(two["losses"][0], rel=1e-2)
    check_adapter_loads_on_one_process(tmp_path / "two", "cuda")
    assert torch.cuda.device_count() >= 2
