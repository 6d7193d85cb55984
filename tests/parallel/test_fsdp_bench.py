"""`quickloris bench fsdp --tiny --device cpu`: the one-command 2-GPU benchmark runs end to end on 2 gloo ranks
(torchrun), records JSON with provenance and the loss-parity PNG; its loss parity holds on CPU too."""

from __future__ import annotations

import json

import pytest

from benchmarks.fsdp.bench import derive, plot, summary
from quickloris.cli.main import main


def _run(tmp_path, *extra):
    assert main(["bench", "fsdp", "--tiny", "--device", "cpu", "--out", str(tmp_path), "--timeout", "400", *extra]) == 0
    (path,) = (tmp_path / "fsdp").glob("fsdp-*.json")
    return path, json.loads(path.read_text())


def test_bench_fsdp_tiny_cpu(tmp_path):
    path, rec = _run(tmp_path, "--compile-steps", "0")
    res = rec["results"]
    assert rec["environment"]["commit"] and res["world_size"] == 2 and res["tiny"]
    assert set(res["phases"]) == {"single", "offload", "sharded"}
    off = res["phases"]["offload"]
    assert off["fsdp"]["world_size"] == 2 and off["fsdp"]["nf4_sharded"] == 14 and not off["fsdp"]["nf4_replicated"]
    assert off["fsdp"]["config"]["cpu_offload"] and not res["phases"]["sharded"]["fsdp"]["config"]["cpu_offload"]
    parity = res["derived"]["loss_parity"]
    # Identical, not close: the one-process phase runs the same micro-batches with the same kernels, and with 2
    # ranks each reduced gradient entry is a sum of two terms, whose order cannot change its rounding.
    assert parity["steps"] == 4 and parity["max_rel_diff"] == 0.0 and parity["ok"]
    assert parity["lora_vs_single"]["rel_fro"] == 0.0 and parity["lora_vs_single"]["max_abs"] == 0.0
    assert res["derived"]["scaling_efficiency"]["value"] > 0
    assert path.with_suffix(".png").stat().st_size > 10_000
    assert "loss_parity" in summary(res)
    (report,) = (tmp_path / "reports").glob("fsdp_cpu_*.md")  # the readable report, PNG named beside the JSON
    text = report.read_text()
    assert f"## {path.name}" in text and f"`{path.with_suffix('.png').name}`" in text and "Loss parity over 4" in text


@pytest.mark.slow
def test_bench_fsdp_tiny_cpu_compiled_phase(tmp_path):
    _, rec = _run(tmp_path, "--phases", "offload,compiled")
    comp = rec["results"]["phases"]["compiled"]
    assert comp["compile"]["graph_breaks"] == 0 and len(comp["losses"]) == 2


def test_derive_and_plot_from_phases(tmp_path):
    res = {
        "world_size": 2,
        "shape": "tiny",
        "global_batch_tokens": 128,
        "phases": {
            "single": {"losses": [3.0, 2.5, 2.0], "tokens_per_s_per_gpu": 100.0, "peak_gib": 10.0, "first_step_s": 1.0},
            "offload": {
                "losses": [3.0, 2.5005, 2.0],
                "tokens_per_s_per_gpu": 80.0,
                "peak_gib": 4.0,
                "first_step_s": 1.0,
                "world_size": 2,
            },
            "sharded": {"losses": [3.0], "tokens_per_s_per_gpu": 95.0, "peak_gib": 6.0, "first_step_s": 1.0},
            "compiled": {
                "losses": [3.0],
                "tokens_per_s_per_gpu": 120.0,
                "peak_gib": 4.0,
                "first_step_s": 9.0,
                "compile": {"graph_breaks": 0},
            },
        },
    }
    d = derive(res)
    assert d["loss_parity"]["max_rel_diff"] == pytest.approx(0.0005 / 2.5) and d["loss_parity"]["ok"]
    assert d["scaling_efficiency"]["value"] == pytest.approx(0.95) and d["scaling_efficiency"]["ok"]
    assert d["compile"]["speedup_vs_eager_offload"] == pytest.approx(1.5) and d["compile"]["graph_breaks"] == 0
    assert d["peak_gib_per_gpu"] == {"single": 10.0, "offload": 4.0, "sharded": 6.0, "compiled": 4.0}
    assert plot(res, tmp_path / "p.png").stat().st_size > 10_000
    assert plot({"phases": {}}, tmp_path / "q.png") is None
