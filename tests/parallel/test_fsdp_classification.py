"""`torchrun --nproc-per-node 2 -m quickloris train --task-type classification --fsdp` on CPU ranks (gloo): the same
per-step losses, gradient norms, evaluation and adapter (score head included) as the one-process run (fp32: each
micro-batch's rows split over the ranks, normalised by the whole step's text count)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from tests.parallel.test_fsdp_train_cli import _shardable_llama, train_cli  # noqa: E402
from tests.train.tiny import write_jsonl  # noqa: E402

ROWS = [
    {"text": f"{a} {w}", "label": lab}
    for w, lab in (("good", "pos"), ("bad", "neg"), ("meh", "mid"))
    for a in ("it was", "so", "very", "quite")
]


def _train(nproc, tmp_path, out, *extra):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS * 2)
    evald = write_jsonl(tmp_path / "eval.jsonl", ROWS[::2])
    args = [
        "--task-type",
        "classification",
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
        "--class-weights",
        "auto",
        *extra,
    ]
    return train_cli(nproc, args, out)


@pytest.mark.slow  # 89 s on the shared 2-core CPU machine (two ranks + one process, each loading transformers)
def test_classification_fsdp_two_ranks_matches_one_process(tmp_path):
    from safetensors.torch import load_file

    _shardable_llama(tmp_path / "model")
    printed, sharded = _train(2, tmp_path, tmp_path / "fsdp", "--fsdp", "--no-mixed-precision")
    _, single = _train(0, tmp_path, tmp_path / "single")
    assert "FSDP2 over 2 ranks" in printed and printed.count("eval before") == 1
    a, b = sharded["steps"], single["steps"]
    assert len(a) == 3 and [r["trained_tokens"] for r in a] == [r["trained_tokens"] for r in b] == [8, 8, 8]
    # The same fp32 terms summed in another order (rows split over ranks, then all-reduced): a few fp32 ulps.
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-5)
    for when in ("before", "after"):
        assert sharded["eval"][when]["confusion"] == single["eval"][when]["confusion"]
    wa = load_file(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and "base_model.model.score.weight" in wa
    # AdamW moves each entry by at most ~lr_s per step whatever its gradient's size; a near-cancelling gradient
    # entry may flip sign between the two summation orders: the element-wise bound the mechanism gives
    # (tests/parallel/test_fsdp_train_cli.py).
    bound = 2 * sum(r["lr"] for r in b)
    for name in wa:
        assert (wa[name] - wb[name]).abs().max().item() <= bound, name
    assert (tmp_path / "fsdp" / "adapter" / "labels.json").read_text() == (
        tmp_path / "single" / "adapter" / "labels.json"
    ).read_text()
