"""`quickloris eval` reproduces a train run's before/after numbers from its adapter folder; embedded tasks and
--eval-data files; clear errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickloris.cli.main import main  # noqa: E402
from tests.train.tiny import save_tiny_llama, write_jsonl  # noqa: E402

FIXED = [{"messages": [{"role": "system", "content": "Reverse the digits."}, {"role": "user", "content": q},
                       {"role": "assistant", "content": "97531"}]} for q in ("12345", "67890", "13579", "24680")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained to answer every prompt with one constant string (learnt in ~1 s of CPU)."""
    d = tmp_path_factory.mktemp("eval")
    n = torch.get_num_threads()
    model = save_tiny_llama(d / "model", seed=0)
    data = write_jsonl(d / "train.jsonl", FIXED * 8)
    held = write_jsonl(d / "held.jsonl", FIXED[:3])
    out = d / "run"
    rc = main(["train", "--model", str(model), "--data", str(data), "--eval-data", str(held), "--output-dir",
               str(out), "--threads", "1", "--no-progress", "--batch-size", "4", "--max-steps", "80", "--lr", "1e-2",
               "--warmup-steps", "3", "--save-every", "0"])
    torch.set_num_threads(n)
    assert rc == 0
    return {"model": model, "held": held, "out": out, "dir": d,
            "metrics": json.loads((out / "metrics.json").read_text())}


def _eval(run, *extra):
    out = run["dir"] / f"eval-{len(list(run['dir'].glob('eval-*.json')))}.json"
    rc = main(["eval", "--model", str(run["model"]), "--threads", "1", "--output", str(out), *map(str, extra)])
    assert rc == 0
    return json.loads(out.read_text())


def test_adapter_reproduces_the_after_number(run):
    after = run["metrics"]["eval"]["after"]
    assert after["accuracy"] > run["metrics"]["eval"]["before"]["accuracy"]  # something was learnt
    result = _eval(run, "--adapter", run["out"] / "adapter", "--eval-data", run["held"])
    assert result["nf4"] is True and result["total"] == 3
    assert (result["accuracy"], result["samples"]) == (after["accuracy"], after["samples"])


def test_nf4_base_reproduces_the_before_number(run):
    before = run["metrics"]["eval"]["before"]
    result = _eval(run, "--nf4", "--eval-data", run["held"], "--eval-batch-size", 2)
    assert (result["accuracy"], result["samples"]) == (before["accuracy"], before["samples"])
    dense = _eval(run, "--eval-data", run["held"])
    assert dense["nf4"] is False and dense["total"] == 3


def test_nf4_settings_come_from_the_run_config(tmp_path):
    from quickloris.train.evaluation import run_quantization

    (tmp_path / "adapter").mkdir()
    assert run_quantization(tmp_path / "adapter").blocksize == 64  # no run config: the defaults
    (tmp_path / "config.json").write_text(json.dumps({"qlora": {"blocksize": 128, "double_quant": False,
                                                                "lora_dtype": "bfloat16"}}))
    cfg = run_quantization(tmp_path / "adapter")
    assert (cfg.blocksize, cfg.double_quant, cfg.lora_dtype, cfg.chunked_loss) == (128, False, "bfloat16", False)


def test_embedded_task_and_dense_model(run, capsys):
    result = _eval(run, "--task", "reverse", "--num-eval", 6, "--max-new-tokens", 3, "--seed", 4)
    assert result["total"] == 6 and result["nf4"] is False and result["max_new_tokens"] == 3
    assert 0.0 <= result["accuracy"] <= 1.0 and len(result["samples"]) == 3
    from quickloris.data.tasks import get_task

    expected = get_task("reverse").generate("heldout", 6, 4)
    assert [s["question"] for s in result["samples"]] == [ex.question for ex in expected[:3]]
    assert "6 held-out problems of task 'reverse' (seed 4)" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["no-nf4-adapter", "multi-line-answer", "ends-with-user", "missing-file",
                                  "unknown-task"])
def test_clear_errors(run, tmp_path, case, capsys):
    """One line naming the option or file:line, exit status 2, no traceback."""
    d = tmp_path
    if case == "no-nf4-adapter":
        args, match = ["--adapter", run["out"] / "adapter", "--no-nf4"], "NF4 base"
    elif case == "multi-line-answer":
        f = write_jsonl(d / "e.jsonl", [FIXED[0], {"messages": [{"role": "user", "content": "q"},
                                                                {"role": "assistant", "content": "a\nb"}]}])
        args, match = ["--eval-data", f], r"e\.jsonl:2: the reference answer must be one line"
    elif case == "ends-with-user":
        f = write_jsonl(d / "e.jsonl", [{"messages": [{"role": "assistant", "content": "hi"},
                                                      {"role": "user", "content": "q"}]}])
        args, match = ["--eval-data", f], r"e\.jsonl:1: the last message must be"
    elif case == "missing-file":
        args, match = ["--eval-data", d / "none.jsonl"], "none.jsonl"
    else:
        args, match = ["--task", "multiplication"], "--task 'multiplication' is an unknown task"
    capsys.readouterr()
    assert main(["eval", "--model", str(run["model"]), "--threads", "1", *map(str, args)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    if case == "no-nf4-adapter":  # checked after the model loads (run_eval), so transformers' progress bar precedes
        err = err[-1:]
    assert len(err) == 1 and err[0].startswith("quickloris eval: error: ") and re.search(match, err[0]), err
