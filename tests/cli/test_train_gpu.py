"""`quickloris train` on a GPU takes the fast path by default: bf16, the fused NF4 kernel, regional
torch.compile (0 graph breaks), checkpointing on; evaluation runs the compiled model eagerly. Tiny models only
(the device has no embedded SmolLM2), plus SmolLM2's shapes with random weights for a few steps."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from quickloris.cli.main import build_parser  # noqa: E402
from quickloris.cli.train import configs_from_args  # noqa: E402
from quickloris.parallel.compile import compile_stats, reset_compile_stats  # noqa: E402
from quickloris.train.run import run_train  # noqa: E402
from tests.train.tiny import chat_tokenizer, save_tiny_llama, task_rows, write_jsonl  # noqa: E402

FIXED = [
    {
        "messages": [
            {"role": "system", "content": "Add the two numbers."},
            {"role": "user", "content": q},
            {"role": "assistant", "content": "1234"},
        ]
    }
    for q in ("1 + 2", "3 + 4", "5 + 6", "7 + 8")
]


def _train(argv):
    args = build_parser(["train"]).parse_args(["train", *map(str, argv)])
    lines: list[str] = []
    result = run_train(*configs_from_args(args), echo=lines.append)
    print("\n".join(lines))
    return result


@pytest.mark.gpu
@pytest.mark.parametrize("attention,packing", [("sdpa", False), ("flex", True)])
def test_fast_path_learns_without_graph_breaks(tmp_path, attention, packing):
    model = save_tiny_llama(tmp_path / "model", heads=3, kv_heads=1)  # head_dim 16: flex's GPU kernels need >= 16
    data = write_jsonl(tmp_path / "train.jsonl", FIXED * 8)
    held = write_jsonl(tmp_path / "held.jsonl", FIXED[:3])
    reset_compile_stats()
    result = _train(
        [
            "--model",
            model,
            "--data",
            data,
            "--eval-data",
            held,
            "--output-dir",
            tmp_path / "run",
            "--max-steps",
            80,
            "--lr",
            "1e-2",
            "--warmup-steps",
            3,
            "--batch-size",
            4,
            "--attention",
            attention,
            "--packing" if packing else "--no-packing",
            "--max-seq-len",
            64,
            "--no-progress",
            "--save-every",
            40,
        ]
    )
    m = result.metrics
    assert m["resolved"]["device"].startswith("cuda") and m["resolved"]["dtype"] == "torch.bfloat16"
    assert m["resolved"]["compile"] is True and m["resolved"]["gradient_checkpointing"] is True
    stats = compile_stats()
    print("compile:", stats)
    assert stats["graph_breaks"] == 0 and stats["unique_graphs"] >= 1
    assert m["summary"]["loss_last"] < 0.2 * m["summary"]["loss_first"]
    assert m["eval"]["after"]["accuracy"] > m["eval"]["before"]["accuracy"]
    assert m["summary"]["peak_memory_gib"] > 0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.gpu
def test_smollm2_shapes_random_weights(tmp_path):
    """The demo's model shapes (hidden 576, 30 layers, 9/3 heads, vocab 49152), random weights, on the embedded
    addition task: steps run compiled; prints the step time a GPU `make demo` would see."""
    from tests.tiny import tiny_model

    tok = chat_tokenizer()
    tiny_model(
        seed=0,
        vocab_size=49152,
        hidden=576,
        inter=1536,
        layers=30,
        heads=9,
        kv_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    ).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", task_rows("addition", 160))
    reset_compile_stats()
    result = _train(
        [
            "--model",
            tmp_path / "model",
            "--data",
            data,
            "--output-dir",
            tmp_path / "run",
            "--max-steps",
            20,
            "--no-progress",
            "--log-every",
            5,
        ]
    )
    steps = result.metrics["steps"]
    warm = sorted(r["seconds"] for r in steps[5:])
    print(
        f"SmolLM2 shapes: median step {warm[len(warm) // 2] * 1e3:.1f} ms after compile, first step "
        f"{steps[0]['seconds']:.1f} s, peak {result.metrics['summary']['peak_memory_gib']:.2f} GiB"
    )
    assert compile_stats()["graph_breaks"] == 0
    assert all(r["loss"] == r["loss"] for r in steps)  # finite
