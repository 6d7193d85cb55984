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

FIXED = [
    {
        "messages": [
            {"role": "system", "content": "Reverse the digits."},
            {"role": "user", "content": q},
            {"role": "assistant", "content": "97531"},
        ]
    }
    for q in ("12345", "67890", "13579", "24680")
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained to answer every prompt with one constant string (learnt in ~1 s of CPU)."""
    d = tmp_path_factory.mktemp("eval")
    n = torch.get_num_threads()
    model = save_tiny_llama(d / "model", seed=0)
    data = write_jsonl(d / "train.jsonl", FIXED * 8)
    held = write_jsonl(d / "held.jsonl", FIXED[:3])
    out = d / "run"
    rc = main(
        [
            "train",
            "--model",
            str(model),
            "--data",
            str(data),
            "--eval-data",
            str(held),
            "--output-dir",
            str(out),
            "--threads",
            "1",
            "--no-progress",
            "--batch-size",
            "4",
            "--max-steps",
            "80",
            "--lr",
            "1e-2",
            "--warmup-steps",
            "3",
            "--save-every",
            "0",
        ]
    )
    torch.set_num_threads(n)
    assert rc == 0
    return {
        "model": model,
        "held": held,
        "out": out,
        "dir": d,
        "metrics": json.loads((out / "metrics.json").read_text()),
    }


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
    (tmp_path / "config.json").write_text(
        json.dumps({"qlora": {"blocksize": 128, "double_quant": False, "lora_dtype": "bfloat16"}})
    )
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


@pytest.mark.parametrize(
    "case", ["no-nf4-adapter", "multi-line-answer", "ends-with-user", "missing-file", "unknown-task"]
)
def test_clear_errors(run, tmp_path, case, capsys):
    """One line naming the option or file:line, exit status 2, no traceback."""
    d = tmp_path
    if case == "no-nf4-adapter":
        args, match = ["--adapter", run["out"] / "adapter", "--no-nf4"], "--no-nf4 with --adapter: an adapter is scored"
    elif case == "multi-line-answer":
        f = write_jsonl(
            d / "e.jsonl",
            [FIXED[0], {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\nb"}]}],
        )
        args, match = ["--eval-data", f], r"e\.jsonl:2: the reference answer must be one line"
    elif case == "ends-with-user":
        f = write_jsonl(
            d / "e.jsonl", [{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}]}]
        )
        args, match = ["--eval-data", f], r"e\.jsonl:1: the last message must be"
    elif case == "missing-file":
        args, match = ["--eval-data", d / "none.jsonl"], "none.jsonl"
    else:
        args, match = ["--task", "multiplication"], "--task 'multiplication' is an unknown task"
    capsys.readouterr()
    assert main(["eval", "--model", str(run["model"]), "--threads", "1", *map(str, args)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("quickloris eval: error: ") and re.search(match, err[0]), err


@pytest.mark.parametrize("case", ["no-nf4-adapter", "missing-adapter", "missing-gguf", "not-gguf", "adapter-misfit"])
def test_checks_before_loading(run, tmp_path, monkeypatch, capsys, case):
    """Checks that need no model fail in one line naming the options (exit status 2), before the tokenizer or the
    model is loaded."""
    import shutil

    from quickloris.models import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    monkeypatch.setattr(loading, "load_tokenizer", lambda *a, **k: pytest.fail("loaded before the check"))
    model, adapter = run["model"], run["out"] / "adapter"
    if case == "no-nf4-adapter":
        args, match = (
            ["--adapter", adapter, "--no-nf4"],
            r"--no-nf4 with --adapter: an adapter is scored on the NF4 "
            r"base it was trained on; to score it merged into the 16-bit weights, export it with `quickloris export "
            r"gguf --merge-base original --quant f16` and score the file with --gguf",
        )
    elif case == "missing-adapter":
        args, match = ["--adapter", tmp_path / "nope"], r"--adapter \S+nope is not a folder"
    elif case == "missing-gguf":
        args, match = ["--gguf", tmp_path / "x.gguf"], r"--gguf \S+x\.gguf is not a file"
    elif case == "not-gguf":
        (tmp_path / "x.gguf").write_text("not a model")
        args = ["--gguf", tmp_path / "x.gguf"]
        match = r"--gguf \S+x\.gguf is not a GGUF file \(it does not start with 'GGUF'\)"
    else:  # the same model with a wider MLP: the adapter's down_proj no longer fits
        model = shutil.copytree(run["model"], tmp_path / "wider")
        cfg = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
        args = ["--adapter", adapter]
        match = (
            r"--adapter \S+adapter does not fit --model \S+wider: model\.layers\.0\.mlp\.down_proj takes 128 "
            r"inputs, but the adapter's lora_A is \[16, 96\]"
        )
    capsys.readouterr()
    assert main(["eval", "--model", str(model), "--threads", "1", *map(str, args)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(f"quickloris eval: error: {match}", err[0]), err


def _greedy_margins(run, prompts_ids, max_new_tokens):
    """Top-1 minus top-2 logit at every greedy step of the model `eval --adapter` scores, and the largest |logit|."""
    from quickloris.models.loading import load_model, resolve_model
    from quickloris.models.prepare import prepare_model
    from quickloris.train.evaluation import run_quantization

    adapter = run["out"] / "adapter"
    model = prepare_model(
        load_model(resolve_model(str(run["model"]))), run_quantization(adapter), adapter=str(adapter)
    ).eval()
    model.config.use_cache = True
    margins, largest = [], 0.0
    with torch.no_grad():
        for ids in prompts_ids:
            out = model.generate(
                torch.tensor([ids]),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                output_scores=True,
                return_dict_in_generate=True,
            )
            for step in out.scores:
                top = step[0].float().topk(2).values
                margins.append(float(top[0] - top[1]))
                largest = max(largest, float(step[0].abs().max()))
    return min(margins), largest


def test_gguf_export_scores_like_the_adapter(run, tmp_path, capsys):
    """The default (NF4-merge) F32 export, scored through llama.cpp, gives the adapter's replies: llama.cpp's
    logits differ from the scored model's by float32 reassociation only (< 1e-4 of the largest logit, see
    tests/export/test_merge_base.py), and every greedy step of these prompts has a top-1/top-2 gap far larger,
    so no argmax can flip. The before / after / exported table shows all three."""
    from quickloris.train.exact_match import prompt_ids

    f32 = tmp_path / "f32.gguf"
    assert (
        main(
            [
                "export",
                "gguf",
                "--model",
                str(run["model"]),
                "--adapter",
                str(run["out"] / "adapter"),
                "--quant",
                "f32",
                "--out",
                str(f32),
            ]
        )
        == 0
    )
    capsys.readouterr()
    from quickloris.data.tasks import get_task
    from quickloris.models.loading import load_tokenizer, resolve_model
    from quickloris.train.runtime import load_eval_examples

    tok = load_tokenizer(resolve_model(str(run["model"])))
    cases = {
        "held": (["--eval-data", run["held"]], load_eval_examples(str(run["held"]))),
        "reverse": (["--task", "reverse", "--num-eval", 12], get_task("reverse").generate("heldout", 12, 0)),
    }
    for name, (extra, examples) in cases.items():
        result = _eval(run, "--adapter", run["out"] / "adapter", "--gguf", f32, *extra)
        before, after, exported = result["rows"]
        assert [r["row"] for r in result["rows"]] == ["before", "after", "exported"]
        assert (exported["correct"], exported["samples"]) == (after["correct"], after["samples"])
        assert (result["accuracy"], result["gguf"], result["nf4"]) == (after["accuracy"], str(f32), True)
        nf4_only = _eval(run, "--nf4", *extra)
        assert (before["correct"], before["samples"]) == (nf4_only["correct"], nf4_only["samples"])
        alone = _eval(run, "--gguf", f32, *extra)  # the file alone: the model is not loaded
        assert (alone["correct"], alone["samples"], alone["nf4"]) == (exported["correct"], exported["samples"], None)
        assert "rows" not in alone
        if name == "held":  # the run's own numbers, and something was learnt
            metrics = run["metrics"]["eval"]
            assert (before["accuracy"], after["accuracy"]) == (
                metrics["before"]["accuracy"],
                metrics["after"]["accuracy"],
            )
            assert after["accuracy"] > before["accuracy"]
        ids = prompt_ids(tok, [ex.prompt_messages() for ex in examples])
        margin, largest = _greedy_margins(run, ids, after["max_new_tokens"])
        assert margin > 100 * 1e-4 * largest, f"{name}: near-tie {margin} (largest logit {largest})"
    out = capsys.readouterr().out
    assert "exact match on --eval-data" in out and "  exported  " in out and "f32.gguf (llama.cpp)" in out


def test_readme_documents_every_eval_option():
    import dataclasses
    from pathlib import Path

    from quickloris.config import iter_flags
    from quickloris.train.config import EvalTaskConfig
    from quickloris.train.vision import VisionConfig

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    start = readme.index("`quickloris eval` takes the **model** and **evaluation** options above and:")
    section = readme[start : readme.index("## Vision-language models")]
    for f in dataclasses.fields(EvalTaskConfig):
        assert f"| `--{f.name.replace('_', '-')}" in section, f"README lacks --{f.name}"
    for flag in iter_flags(VisionConfig):  # named there, documented in the VLM section (tests/cli/test_train.py)
        assert f"`{flag}`" in section, f"README's eval options lack {flag}"
