"""`quickloris bench loss` pieces that run without a GPU: the training and GRPO comparisons at toy size on CPU
(bitsandbytes NF4 + PEFT LoRA included), the summary table over their real output, and the no-CUDA message."""

from __future__ import annotations

import argparse

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from benchmarks.loss import bench  # noqa: E402
from benchmarks.loss import models as loss_models  # noqa: E402

TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=True,
)


@pytest.mark.parametrize("quantize", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["lora", "qlora"])
def test_chunked_bench_train_and_grpo_on_cpu(seed, quantize):
    if quantize:
        pytest.importorskip("bitsandbytes")
    train = loss_models.train_compare(
        TINY,
        steps=3,
        batch=2,
        seq=40,
        device="cpu",
        dtype=torch.float32,
        quantize=quantize,
        lr=1e-3,
        seed=seed % 1000,
        log=lambda s: None,
    )
    for mode in ("chunked", "chunked_grad_in_forward"):
        assert len(train[mode]["losses"]) == 3 and train[mode]["within_1e-3"]
        assert train[mode]["max_rel_diff_vs_hf"] < 1e-5  # fp32: the same numbers up to rounding order
    grpo = loss_models.grpo_compare(
        dict(TINY, tie_word_embeddings=False),
        device="cpu",
        dtype=torch.float32,
        group_size=4,
        prompt=16,
        completion=32,
        chunk_size=40,
        seed=seed % 1000,
    )
    assert grpo["same_grad_names"] and grpo["lora_params"] == 2 * 7 * 2
    assert grpo["loss_rel_diff"] < 1e-5 and grpo["lora_grad_rel_diff"] < 1e-4
    table = bench.summary({"train60": train, "grpo": [grpo]})
    assert "train60 chunked: max rel loss diff" in table and "grpo float32" in table


def test_chunked_bench_without_cuda_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--parts", "spec"])) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--parts"):
        bench.run(parser.parse_args(["--parts", "memroy"]))


def test_chunked_bench_memory_and_spec_parts_on_cpu(seed):
    """The memory and spec parts' code at toy sizes (peak memory is only measured on CUDA: reported as None)."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        [
            "--tokens",
            "48",
            "--hidden",
            "32",
            "--vocab",
            "500",
            "--reps",
            "1",
            "--sweep-tokens",
            "64",
            "--budgets-mib",
            "1",
        ]
    )
    mem = bench.part_memory(args, device="cpu")
    # naive, recompute, grad_in_forward for both heads; vocab_blocked (kernels, PyTorch formulas) for the trainable one
    assert len(mem["rows"]) == 3 + 5 and len(mem["budget_sweep"]) == 6
    assert {r["method"] for r in mem["rows"] if not r["w_grad"]} == {"naive", "recompute", "grad_in_forward"}
    losses = {(r["tokens"], r["w_grad"]): set() for r in mem["rows"]}
    for r in mem["rows"]:
        losses[(r["tokens"], r["w_grad"])].add(round(r["loss"], 3))
    assert all(len(v) == 1 for v in losses.values()), "naive and chunked losses differ"
    # the narrow selection the device command uses: only the trainable head, only the named methods, no sweep
    narrow = parser.parse_args(
        ["--tokens", "40", "--hidden", "16", "--vocab", "300", "--reps", "1", "--budgets-mib", "", "--heads",
         "trainable", "--methods", "naive,vocab_blocked,vocab_blocked_torch"]
    )  # fmt: skip
    few = bench.part_memory(narrow, device="cpu")
    assert [r["method"] for r in few["rows"]] == ["naive", "vocab_blocked", "vocab_blocked_torch"]
    assert all(r["w_grad"] for r in few["rows"]) and few["budget_sweep"] == []
    assert len({round(r["loss"], 3) for r in few["rows"]}) == 1
    with pytest.raises(ValueError, match="--methods"):
        bench.part_memory(parser.parse_args(["--methods", "fast"]), device="cpu")
    spec = bench.part_spec(args, device="cpu", sizes=(2, 24, 32, 300), chunks=(None, 16))
    for row in spec["rows"]:
        assert row["loss_close"] and row["grad_W_close"]
        assert row["autograd_loss_close"] and row["autograd_grad_X_close"] and row["autograd_grad_W_close"]
        # the specification's NaiveLinear doubles dX (it returns X.grad after accumulating it into the leaf)
        assert abs(row["spec_naive_dX_over_autograd_dX"] - 2.0) < 1e-4 and not row["grad_X_close"]
    table = bench.summary({"memory": mem, "spec": spec})
    assert (
        "grad_in_forward" in table
        and "vocab_blocked_torch" in table
        and "budget" in table
        and "spec test_comparison" in table
    )
