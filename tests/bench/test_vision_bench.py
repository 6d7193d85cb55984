"""`quickloris bench vision` (benchmarks/vision/bench.py): wiring without a GPU, a CPU smoke run of both parts at toy
sizes (slow), and on the device the learning check: a small random-init Qwen2-VL trained on the embedded ``colors``
task goes from chance to well above it on held-out pictures (``gpu``)."""

from __future__ import annotations

import json

import pytest
import torch

from quickloris.cli.main import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_gpu_says_so_and_fails(capsys):
    assert main(["bench", "vision", "--parts", "speed"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_smoke_run_records_both_parts(tmp_path):
    args = [
        "bench",
        "vision",
        "--tiny",
        "--out",
        str(tmp_path),
        "--learn-steps",
        "4",
        "--learn-batch",
        "2",
        "--learn-eval",
        "2",
        "--speed-batch",
        "2",
        "--speed-steps",
        "1",
        "--speed-lengths",
        "8-24",
        "--speed-pack",
        "120",
    ]
    assert main(args) == 0
    (path,) = (tmp_path / "vision").glob("vision-tiny-*.json")
    rec = json.loads(path.read_text())
    assert {"environment", "results"} <= set(rec)
    learn, speed = rec["results"]["learn"], rec["results"]["speed"]
    assert learn["after"]["total"] == 2 and learn["chance"] == 1 / 6
    assert set(speed["stacks"]) == {"ql_padded", "ql_packed", "hf_peft_bnb", "unsloth"}
    # Unsloth needs a GPU and its own site folder: on this machine its row records why it did not run
    unsloth = speed["stacks"].pop("unsloth")
    assert "Unsloth is not installed" in unsloth["error"], unsloth
    assert all("tokens_per_s" in s for s in speed["stacks"].values()), speed["stacks"]


@pytest.mark.gpu
def test_learning_check_beats_chance(tmp_path):
    """600 steps of 16 pictures (lr 2e-3, LoRA r=16 on the language model and the vision tower): held-out exact match
    on 200 pictures must be at least 3x chance (6 colours: chance 16.7 %) and above the untrained model's."""
    assert main(["bench", "vision", "--parts", "learn", "--out", str(tmp_path)]) == 0
    (path,) = (tmp_path / "vision").glob("vision-*.json")
    learn = json.loads(path.read_text())["results"]["learn"]
    assert learn["after"]["accuracy"] >= 3 * learn["chance"] > learn["before"]["accuracy"], learn


def test_packed_steps_run_one_forward_per_micro_batch_like_train_packing():
    """ql_packed feeds the rows of a step as ``quickloris train --packing`` would: packed rows of <= --speed-pack
    tokens, a micro-batch of --speed-batch of them flattened into one row (one forward), holding exactly the padded
    batch's real tokens. (Until 15276c4 each packed row was a forward of its own.)"""
    import argparse

    from benchmarks.vision import bench

    tok = bench.tokenizer(["lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor"], 400)
    model = bench.qwen2_vl(bench.TINY, tok, 512, torch.float32, "cpu")
    proc = bench.processing(model, tok, 28 * 28 * 256)
    args = argparse.Namespace(seed=3, speed_lengths="8-40", tiny=True)
    group = bench._speed_examples(args, proc, tok, 6)
    lengths = [len(e) for e in group]
    (padded,) = bench.step_batches(proc, [group], None)[0]
    assert padded["input_ids"].shape == (6, max(lengths))
    pack = max(lengths) + 1  # several packed rows
    (one,) = bench.step_batches(proc, [group], pack, 6)[0]
    assert one["input_ids"].shape == (1, sum(lengths))
    assert sorted(one["input_ids"][0].tolist()) == sorted(padded["input_ids"][padded["attention_mask"].bool()].tolist())
    assert one["pixel_values"].shape == padded["pixel_values"].shape
    rows = bench.step_batches(proc, [group], pack, 1)[0]  # micro-batches of one packed row each
    assert len(rows) > 1 and sum(r["input_ids"].shape[1] for r in rows) == sum(lengths)
