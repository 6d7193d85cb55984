"""`torchrun --nproc-per-node 2 -m quickloris train --fsdp` on CPU ranks (gloo): the same per-step losses and the
same adapter as `quickloris train` in one process (fp32: the rows of each micro-batch are split over the ranks, the
token count is the whole step's), evaluation before/after runs on the sharded model, rank 0 writes the run folder;
bad combinations are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from tests.tiny import chat_tokenizer, tiny_model  # noqa: E402
from tests.train.tiny import write_jsonl  # noqa: E402

ROWS = [
    {
        "messages": [
            {"role": "system", "content": "Reverse the digits."},
            {"role": "user", "content": q},
            {"role": "assistant", "content": q[::-1]},
        ]
    }
    for q in ("12345", "67890", "24680", "13579")
]


def _shardable_llama(folder):
    """A tiny Llama whose NF4 weights split over 2 ranks on whole 16384-value groups, with the tests' tokenizer."""
    tok = chat_tokenizer()  # with its ChatML template
    tiny_model(
        seed=0,
        vocab_size=len(tok),
        hidden=256,
        head_dim=64,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    ).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def train_cli(nproc, args, out):
    """`quickloris train ARGS` in one process (nproc 0) or under torchrun on `nproc` CPU ranks
    (gloo): its stdout and the run's metrics.json."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"] if nproc else ["-m"]
    proc = subprocess.run(
        [sys.executable, *launcher, "quickloris", "train", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout, json.loads((out / "metrics.json").read_text())


def _train(nproc, tmp_path, out, *extra):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS * 6)
    evald = write_jsonl(tmp_path / "eval.jsonl", ROWS[:2])
    args = [
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(data),
        "--eval-data",
        str(evald),
        "--output-dir",
        str(out),
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--lr",
        "1e-2",
        "--warmup-steps",
        "1",
        "--no-progress",
        "--threads",
        "1",
        "--save-every",
        "2",
        *extra,
    ]
    return train_cli(nproc, args, out)


def test_train_fsdp_two_ranks_matches_one_process(tmp_path):
    from safetensors.torch import load_file

    _shardable_llama(tmp_path / "model")
    printed, sharded = _train(2, tmp_path, tmp_path / "fsdp", "--fsdp", "--no-mixed-precision")
    _, single = _train(0, tmp_path, tmp_path / "single")
    assert "FSDP2 over 2 ranks: 14 NF4 weights sharded, 0 replicated" in printed
    assert printed.count("eval before") == 1  # rank 0 reports; both ranks generated in step
    # Per-step losses and pre-clip gradient norms: both runs sum the same fp32 terms in another order (rows split
    # over ranks, then all-reduced), so they agree to a few ulps of fp32 accumulation. The gradient norm is what a
    # wrong gradient scale (FSDP2's averaging not undone) changes; AdamW's update does not see it.
    a, b = sharded["steps"], single["steps"]
    assert len(a) == 3
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-5)
    assert [r["trained_tokens"] for r in a] == [r["trained_tokens"] for r in b]
    assert sharded["eval"]["after"]["accuracy"] == single["eval"]["after"]["accuracy"]
    wa = load_file(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    # The weights: AdamW moves each entry by lr_s * m/(sqrt(v)+eps) per step, a quantity of size ~lr_s whatever
    # the gradient's size. An entry whose gradient is a near-cancelling sum (|g| ~ its rounding error) can move
    # differently in the two runs by up to 2 * lr_s per step (a sign flip), depending on the CPU's summation order
    # (vector width, threads); that is the only bound the mechanism gives element-wise. The per-step losses and
    # gradient norms above are the tight check of the trajectory.
    bound = 2 * sum(r["lr"] for r in b)
    for name in wa:
        assert (wa[name] - wb[name]).abs().max().item() <= bound, name
    cfg = json.loads((tmp_path / "fsdp" / "config.json").read_text())
    assert cfg["resolved"]["fsdp"]["world_size"] == 2
    assert not (tmp_path / "fsdp" / "checkpoints").exists()  # no resumable checkpoint from a sharded run


def test_train_fsdp_refuses_what_it_cannot_do(tmp_path):
    from quickloris.parallel.fsdp import FSDPOptions
    from quickloris.train.config import TrainConfig
    from quickloris.train.loop import train_loop

    assert FSDPOptions().sharding() is None and FSDPOptions(fsdp=True, cpu_offload=True).sharding().cpu_offload

    class Ctx:
        rank, world_size = 0, 2

    from quickloris.data.config import DataConfig
    from quickloris.models.prepare import QLoRAConfig
    from quickloris.train.config import EvalConfig, ModelConfig
    from quickloris.train.run import run_train

    with pytest.raises(ValueError, match="--resume with --fsdp"):
        run_train(
            ModelConfig(device="cpu"),
            DataConfig(),
            QLoRAConfig(),
            TrainConfig(resume=True, output_dir=str(tmp_path / "r")),
            EvalConfig(),
            FSDPOptions(fsdp=True),
        )
    with pytest.raises(ValueError, match="--batch-size \\(3\\) must be a multiple of 2"):
        train_loop(
            torch.nn.Linear(2, 2),
            [],
            TrainConfig(batch_size=3),
            optimizer=None,
            pad_token_id=0,
            packing=False,
            max_seq_len=8,
            dist=Ctx(),
            device=torch.device("cpu"),
        )


@pytest.mark.parametrize("callers", [False, True], ids=["started-here", "callers"])
def test_run_train_ends_the_process_group_it_started_and_keeps_a_callers(tmp_path, monkeypatch, callers):
    """A gloo group left to the interpreter's exit aborts a rank now and then ("terminate called without an active
    exception", SIGABRT: CI saw it on the two-rank run above); `run_train` ends the group it started, on every
    path, and leaves one its caller started. In-process job of one (no launcher)."""
    import torch.distributed as dist

    from quickloris.cli.main import main
    from quickloris.parallel.fsdp import free_port
    from tests.train.tiny import save_tiny_llama, task_rows

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # recorded, so the job-of-one values init_distributed sets are undone after
        monkeypatch.delenv(key)
    assert not dist.is_initialized()
    if callers:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        data = write_jsonl(tmp_path / "data.jsonl", task_rows("reverse", 8))
        args = [
            "train",
            "--model",
            str(save_tiny_llama(tmp_path / "model")),
            "--data",
            str(data),
            "--output-dir",
            str(tmp_path / "run"),
            "--threads",
            "1",
            "--no-progress",
            "--batch-size",
            "4",
            "--max-steps",
            "1",
            "--fsdp",
            "--no-mixed-precision",
        ]
        assert main(args) == 0
        assert dist.is_initialized() == callers
        assert (
            main(
                [*args[:6], str(tmp_path / "bad"), *args[7:], "--lr", "1e30", "--max-steps", "3", "--warmup-steps", "0"]
            )
            != 0
        )  # diverges: the raising path ends the group too
        assert dist.is_initialized() == callers
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
