"""`quickloris train`'s optimizer options do what they say: gradient clipping (on by default, `--max-grad-norm 1.0`),
AdamW's decoupled weight decay (`--weight-decay`) and its betas (`--adam-betas`). The optimizer the run builds is
watched (a recording subclass of torch's AdamW put in its place for the test): the gradients it is handed must be
the clipped ones, and replaying AdamW's update rule, written out below, on them must give the run's weights."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from quickloris.cli.main import main  # noqa: E402
from quickloris.train.config import TrainConfig  # noqa: E402
from tests.helpers import within  # noqa: E402
from tests.train.tiny import save_tiny_llama, task_rows, write_jsonl  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("opt")
    return {"model": save_tiny_llama(d / "model"), "data": write_jsonl(d / "data.jsonl", task_rows("reverse", 16))}


class Recorder:
    """Put in place of torch.optim.AdamW for one run: a real AdamW that records its hyper-parameters, the weights
    before its first step and the gradients it is handed at every step."""

    def __init__(self, monkeypatch):
        real = torch.optim.AdamW
        rec = self
        self.kwargs, self.init, self.grads, self.params = None, None, [], None

        class RecordingAdamW(real):
            def __init__(self, params, **kwargs):
                super().__init__(params, **kwargs)
                rec.kwargs = kwargs
                rec.params = [p for g in self.param_groups for p in g["params"]]

            def step(self, closure=None):
                if rec.init is None:
                    rec.init = [p.detach().clone() for p in rec.params]
                rec.grads.append([p.grad.detach().clone() for p in rec.params])
                return super().step(closure)

        monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)


def _train(files, out, monkeypatch, *extra):
    rec = Recorder(monkeypatch)
    rc = main(
        [
            "train",
            "--model",
            str(files["model"]),
            "--data",
            str(files["data"]),
            "--output-dir",
            str(out),
            "--threads",
            "1",
            "--no-progress",
            "--batch-size",
            "4",
            "--max-steps",
            "4",
            "--warmup-steps",
            "0",
            "--lr-schedule",
            "constant",
            "--no-eval-before",
            "--no-eval-after",
            "--save-every",
            "0",
            *extra,
        ]
    )
    assert rc == 0
    return rec, json.loads((out / "metrics.json").read_text())


def adamw_replay(init, grads, lr, betas, eps, weight_decay):
    """AdamW (Loshchilov & Hutter; torch's default form), from scratch: per step t = 1, 2, ...
    w <- w (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
    w <- w - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).   Computed in float64."""
    b1, b2 = betas
    w = [p.double() for p in init]
    m = [torch.zeros_like(p) for p in w]
    v = [torch.zeros_like(p) for p in w]
    for t, step_grads in enumerate(grads, start=1):
        for i, g in enumerate(step_grads):
            g = g.double()
            w[i] = w[i] * (1 - lr * weight_decay)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            w[i] = w[i] - lr * (m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + eps)
    return w


def _replay_error(rec, lr, betas, weight_decay) -> float:
    """How far the run's weights are from the replay's, in units of the rounding bound (<= 1: equal). Per entry the
    fp32 run rounds each of its few operations per step (|w| changes by ~lr per step): within 2^-20 relative of |w|
    plus lr, summed over the steps, of the float64 replay. A wrong beta or decay moves entries by a sizeable
    fraction of lr."""
    replay = adamw_replay(rec.init, rec.grads, lr, betas, 1e-8, weight_decay)
    steps = len(rec.grads)
    return max(
        float(((p.detach().double() - r).abs() / (steps * 2**-20 * (r.abs() + lr))).max())
        for p, r in zip(rec.params, replay)
    )


def _assert_replays(rec, lr, betas, weight_decay):
    within(_replay_error(rec, lr, betas, weight_decay), 1.0, "the run's weights from AdamW's, in rounding bounds")


def test_gradients_are_clipped_by_default(files, tmp_path, monkeypatch):
    """Default --max-grad-norm 1.0: a step whose gradient norm exceeds it hands AdamW the gradient scaled to norm 1;
    metrics.json logs the norm before clipping."""
    assert TrainConfig().max_grad_norm == 1.0
    rec, m = _train(files, tmp_path / "run", monkeypatch, "--lr", "1e-2", "--max-grad-norm", "1.0")
    norms = [r["grad_norm"] for r in m["steps"]]
    handed = [math.sqrt(sum(float(g.double().pow(2).sum()) for g in step)) for step in rec.grads]
    assert len(handed) == len(norms) == 4
    assert any(n > 1.0 for n in norms), norms  # the tiny model's gradients exceed 1 (else nothing was tested)
    for logged, got in zip(norms, handed):
        assert got == pytest.approx(min(logged, 1.0), rel=1e-5), (logged, got)  # fp32 norm and scaling
    _assert_replays(rec, 1e-2, (0.9, 0.999), 0.0)


def test_no_clipping_when_max_grad_norm_is_0(files, tmp_path, monkeypatch):
    rec, m = _train(files, tmp_path / "run", monkeypatch, "--lr", "1e-2", "--max-grad-norm", "0")
    handed = [math.sqrt(sum(float(g.double().pow(2).sum()) for g in step)) for step in rec.grads]
    norms = [r["grad_norm"] for r in m["steps"]]
    assert any(n > 1.0 for n in norms)
    assert handed == pytest.approx(norms, rel=1e-5)


def test_weight_decay_and_betas_reach_adamw(files, tmp_path, monkeypatch):
    """--weight-decay 0.3 --adam-betas 0.8,0.95: AdamW gets them, and its update (decay w lr wd, moments with those
    betas and bias corrections) replayed on the recorded gradients gives the run's weights."""
    rec, _ = _train(
        files,
        tmp_path / "run",
        monkeypatch,
        "--lr",
        "2e-2",
        "--weight-decay",
        "0.3",
        "--adam-betas",
        "0.8,0.95",
        "--max-grad-norm",
        "0",
    )
    assert rec.kwargs.get("weight_decay") == 0.3 and tuple(rec.kwargs.get("betas", ())) == (0.8, 0.95)
    _assert_replays(rec, 2e-2, (0.8, 0.95), 0.3)
    # the options matter: the default betas or no decay replay to other weights
    for betas, wd in (((0.9, 0.999), 0.3), ((0.8, 0.95), 0.0)):
        assert _replay_error(rec, 2e-2, betas, wd) > 100, (betas, wd)
