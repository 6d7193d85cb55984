"""The loss plot is a real PNG written atomically; the moving average is the bias-corrected EMA with gaps where a
step has no finite loss; metrics.json is strict JSON even when the loss went NaN / inf."""

from __future__ import annotations

import json
import math

import pytest

from quickloris.train.report import plot_loss, smooth, summarize, write_metrics


def test_smooth_is_the_bias_corrected_ema():
    values = [4.0, 2.0, float("nan"), 1.0]
    m1 = 0.1 * 4.0
    m2 = 0.9 * m1 + 0.1 * 2.0
    m3 = 0.9 * m2 + 0.1 * 1.0
    out = smooth(values)
    assert out[0] == pytest.approx(4.0)  # bias correction: the first value itself
    assert out[1] == pytest.approx(m2 / (1 - 0.9**2))
    assert math.isnan(out[2])  # a gap in the plot, not a plateau; the average skips it
    assert out[3] == pytest.approx(m3 / (1 - 0.9**3))
    assert math.isnan(smooth([float("nan")])[0])
    assert math.isnan(smooth([1.0, float("inf"), None])[1]) and math.isnan(smooth([1.0, None])[1])


def test_plot_and_summary(tmp_path):
    pytest.importorskip("matplotlib")
    history = [
        {"step": s, "loss": 3.0 / s, "tokens": 100, "trained_tokens": 10, "memory_gib": 0.5 + s / 100}
        for s in range(1, 41)
    ]
    path = tmp_path / "sub" / "loss.png"
    plot_loss(history, path, title="t", evals={"before": {"accuracy": 0.0}, "after": {"accuracy": 0.5}})
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [p.name for p in path.parent.iterdir()] == ["loss.png"]  # no temporary file left behind
    s = summarize(history, elapsed=8.0)
    assert s["steps"] == 40 and s["tokens"] == 4000 and s["tokens_per_s"] == 500.0
    assert s["loss_first"] == pytest.approx(sum(3.0 / k for k in range(1, 11)) / 10)
    assert s["loss_last"] == pytest.approx(sum(3.0 / k for k in range(31, 41)) / 10)
    assert s["peak_memory_gib"] == pytest.approx(0.9)


def test_a_diverged_history_gives_valid_json_and_a_plot(tmp_path):
    """Steps 4-5 went NaN / inf (what `metrics.json` and `loss.png` of a diverged run hold): the summary uses the
    finite steps, the file parses as strict JSON with null for the non-finite values, the plot is written."""
    pytest.importorskip("matplotlib")
    losses = [3.0, 2.5, 2.0, float("nan"), float("inf")]
    history = [
        {"step": s + 1, "loss": v, "grad_norm": v, "tokens": 10, "trained_tokens": 5, "memory_gib": 0.1}
        for s, v in enumerate(losses)
    ]
    metrics = write_metrics(tmp_path / "metrics.json", history, 1.0, {}, {"diverged": {"step": 4}})
    back = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"JSON has {c}"))
    assert back == metrics and [r["loss"] for r in back["steps"]] == [3.0, 2.5, 2.0, None, None]
    assert back["summary"]["loss_first"] == pytest.approx(3.0) and back["summary"]["loss_last"] == pytest.approx(2.0)
    plot_loss(history, tmp_path / "loss.png", diverged_at=4)
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
