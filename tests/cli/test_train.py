"""`quickloris train` on a tiny random Llama saved as a local Hugging Face folder (CPU, seconds per run): the run
folder (PEFT adapter, config, metrics, loss plot), learning, exact resume, packing, options, clear errors."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickloris.cli.main import build_parser, main  # noqa: E402
from quickloris.cli.train import configs_from_args, groups  # noqa: E402
from quickloris.config import options  # noqa: E402
from quickloris.train.run import run_train  # noqa: E402
from tests.helpers import require  # noqa: E402
from tests.train.tiny import save_tiny_llama, task_rows, write_jsonl  # noqa: E402

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


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    return {
        "model": save_tiny_llama(d / "model"),
        "dir": d,
        "fixed": write_jsonl(d / "fixed.jsonl", FIXED * 8),
        "fixed_eval": write_jsonl(d / "fixed_eval.jsonl", FIXED[:2]),
        "reverse": write_jsonl(d / "reverse.jsonl", task_rows("reverse", 24)),
    }


def _args(files, out, *extra):
    return [
        "train",
        "--model",
        str(files["model"]),
        "--output-dir",
        str(out),
        "--threads",
        "1",
        "--no-progress",
        "--batch-size",
        "4",
        *map(str, extra),
    ]


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


def test_run_folder_adapter_loads_in_peft_and_the_model_learns(files, tmp_path, capsys):
    from peft import PeftModel
    from safetensors.torch import load_file

    out = tmp_path / "run"
    rc = main(
        _args(
            files,
            out,
            "--data",
            files["fixed"],
            "--eval-data",
            files["fixed_eval"],
            "--max-steps",
            80,
            "--lr",
            "1e-2",
            "--warmup-steps",
            3,
            "--save-every",
            30,
            "--lora-dropout",
            "0.05",
        )
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "eval before: exact match 0.0%" in printed and "adapter (PEFT format)" in printed
    m = _metrics(out)
    assert [r["step"] for r in m["steps"]] == list(range(1, 81)) and m["total_steps"] == 80
    assert m["summary"]["loss_last"] < 0.05 * m["summary"]["loss_first"]  # a constant answer is learnt
    assert m["eval"]["before"]["accuracy"] == 0.0 and m["eval"]["after"]["accuracy"] >= 0.5
    assert all(r["trained_tokens"] > 0 and r["tokens_per_s"] > 0 and r["memory_gib"] > 0 for r in m["steps"])
    cfg = json.loads((out / "config.json").read_text())
    for key, cls in zip(("model", "data", "qlora", "train", "eval"), (c for _, c in groups())):
        assert set(cfg[key]) == {f.name for f in dataclasses.fields(cls)}
    assert cfg["train"]["max_steps"] == 80 and cfg["qlora"]["lora_dropout"] == 0.05
    assert cfg["resolved"]["device"] == "cpu" and cfg["resolved"]["compile"] is False
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000060", "step-000080"]  # the last 2

    # PEFT reads the adapter; on the NF4-rounded base it computes what quickloris' model computes.
    from quickloris.models.adapters import load_adapter
    from quickloris.models.prepare import QLoRAConfig, prepare_model
    from quickloris.quant.nf4 import dequantize_nf4_reference, quantize_nf4

    adapter = out / "adapter"
    saved = load_file(adapter / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in saved.items())
    base = transformers.AutoModelForCausalLM.from_pretrained(files["model"]).eval()
    ours = prepare_model(transformers.AutoModelForCausalLM.from_pretrained(files["model"]), QLoRAConfig(r=16))
    load_adapter(ours, adapter)
    with torch.no_grad():
        for _name, mod in base.model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                packed, state = quantize_nf4(mod.weight)
                mod.weight.copy_(dequantize_nf4_reference(packed, state, torch.float32))
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.randint(3, 300, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(input_ids=ids).logits, ours.eval()(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )


def test_resume_reproduces_the_uninterrupted_loss_curve(files, tmp_path, capsys):
    """Interrupted after step 5 (last checkpoint at 4), resumed: every step's loss and the final adapter are
    bit-identical to a run that never stopped (dropout on, so the RNG state must come back too)."""
    opts = [
        "--data",
        files["reverse"],
        "--max-steps",
        9,
        "--save-every",
        4,
        "--grad-accum",
        2,
        "--lora-dropout",
        "0.1",
        "--lr",
        "5e-3",
        "--no-eval-before",
        "--no-eval-after",
    ]
    assert main(_args(files, tmp_path / "full", *opts)) == 0

    class Stop(Exception):
        pass

    def interrupt(state):
        if state.step == 5:
            raise Stop

    args = build_parser(["train"]).parse_args(_args(files, tmp_path / "cut", *opts))
    with pytest.raises(Stop):
        run_train(*configs_from_args(args), on_step_end=interrupt, echo=lambda m: None)
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-000004"]
    capsys.readouterr()
    assert main(_args(files, tmp_path / "cut", *opts)) == 2  # an output folder holding a run is not overwritten
    assert "holds a run (checkpoint step-000004): continue it with --resume" in capsys.readouterr().err
    assert main(_args(files, tmp_path / "cut", *opts, "--resume")) == 0
    full, cut = _metrics(tmp_path / "full"), _metrics(tmp_path / "cut")
    assert [r["loss"] for r in cut["steps"]] == [r["loss"] for r in full["steps"]]
    assert [r["grad_norm"] for r in cut["steps"]] == [r["grad_norm"] for r in full["steps"]]
    assert len({r["loss"] for r in full["steps"]}) == 9
    a = (tmp_path / "full" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "cut" / "adapter" / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(_args(files, tmp_path / "cut", *opts, "--resume", "--lr", "1e-2")) == 2
    assert "train.lr: 0.005 -> 0.01" in capsys.readouterr().err


@pytest.mark.parametrize("packing", [False, True])
def test_one_epoch_trains_every_trained_token_once(files, tmp_path, packing, capsys):
    from quickloris.data.chat import tokenize_records
    from quickloris.data.jsonl import load_jsonl
    from tests.train.tiny import chat_tokenizer

    out = tmp_path / "run"
    flag = "--packing" if packing else "--no-packing"
    assert (
        main(
            _args(
                files,
                out,
                "--data",
                files["reverse"],
                flag,
                "--max-seq-len",
                64,
                "--batch-size",
                2,
                "--no-eval-before",
                "--no-eval-after",
            )
        )
        == 0
    )
    _, stats = tokenize_records(chat_tokenizer(), load_jsonl(files["reverse"]), max_seq_len=64)
    m = _metrics(out)
    assert sum(r["trained_tokens"] for r in m["steps"]) == stats.trainable_tokens
    assert sum(r["tokens"] for r in m["steps"]) == stats.tokens
    assert {r["epoch"] for r in m["steps"]} == {0}
    rows = 24 / 2 if not packing else None
    if rows:
        assert len(m["steps"]) == rows
    else:  # several examples per packed row: fewer, longer steps
        assert len(m["steps"]) < 12
    assert "packed" in capsys.readouterr().out if packing else True


def test_readme_documents_every_option():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Options of `quickloris train`") :]
    documented_here = ("model", "data", "LoRA and quantization", "training", "evaluation")  # FSDP: its own section
    for _, cls in (g for g in groups() if g[0] in documented_here):
        for o in options(cls):
            assert f"`{o.flag}" in section, f"README lacks {o.flag}"
    vlm = readme[readme.index("## Vision-language models") : readme.index("## GGUF export (llama.cpp")]
    for _, cls in (g for g in groups() if g[0].startswith("vision-language models")):
        for o in options(cls):
            assert f"| `{o.flag}" in vlm, f"README's vision-language table lacks {o.flag}"


def test_help_lists_every_option_once(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    flags = [o.flag for _, cls in groups() for o in options(cls)]
    assert len(flags) == len(set(flags))  # each option declared once, however configs nest
    for flag in flags:
        assert flag in text
    # the flags of the nested compile / checkpointing configs that README, docs and scripts use
    assert {
        "--compile",
        "--gradient-checkpointing",
        "--checkpoint-in-graph",
        "--checkpoint-keep",
        "--skip-checkpoint-last",
    } <= set(flags)


CASES = {  # option values -> the one line printed (after "quickloris train: error: ")
    "missing-model": (lambda d: ["--model", d / "nope"], r"--model: model '.*nope' does not exist"),
    "missing-data": (lambda d: ["--data", d / "nope.jsonl"], r"--data '.*nope\.jsonl' does not exist"),
    "data-is-a-folder": (
        lambda d: ["--data", d],
        r"--data: .*in: a folder that is not a datasets save_to_disk folder \(no state.json or dataset_dict.json\)",
    ),
    "missing-eval-data": (lambda d: ["--eval-data", d / "e.jsonl"], r"--eval-data '.*e\.jsonl' does not exist"),
    "missing-adapter": (lambda d: ["--adapter", d / "lora"], r"--adapter '.*lora' does not exist"),
    "not-an-adapter": (lambda d: ["--adapter", d], r"--adapter '.*' is not a PEFT adapter folder"),
    "unknown-format": (lambda d: ["--model", _file(d / "weights.bin", b"\0" * 16)], "--model: unknown model format"),
    "folder-without-config": (
        lambda d: ["--model", _folder(d / "empty")],
        "--model: unknown model format.*no config.json",
    ),
    "unsupported-architecture": (
        lambda d: ["--model", _model_copy(d, architectures=["GPT2LMHeadModel"])],
        r"--model: '.*' is a GPT2LMHeadModel: not a decoder-only \*ForCausalLM; "
        r"quickloris supports Gemma2ForCausalLM, .*LlamaForCausalLM",
    ),
    "no-tokenizer": (
        lambda d: ["--model", _model_copy(d, tokenizer=False)],
        r"--model: no tokenizer in '.*' \(looked for tokenizer\.json, tokenizer\.model, vocab\.json "
        r"\+ merges\.txt",
    ),
    "unknown-target": (
        lambda d: ["--target-modules", "q_proj,qproj,mlp"],
        r"--target-modules names qproj, mlp, not a linear layer of this model's decoder",
    ),
    "malformed-line": (
        lambda d: ["--data", write_jsonl(d / "bad.jsonl", [FIXED[0], FIXED[1], '{"messages": [}'])],
        r"bad\.jsonl:3: invalid JSON",
    ),
    "no-trainable-tokens": (
        lambda d: [
            "--chat-template",
            _file(
                d / "t.jinja",
                b"{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}\n{% endif %}{% endfor %}",
            ),
        ],
        "no trainable tokens",
    ),
    "too-long": (
        lambda d: ["--max-seq-len", 1024],
        r"--max-seq-len=1024 is longer than the model can take \(max_position_embeddings=256\)",
    ),
    "bad-option": (lambda d: ["--grad-accum", 0], "--grad-accum must be a positive int, got 0$"),
    "bad-lr": (lambda d: ["--lr", "-1"], r"--lr must be > 0, got -1\.0$"),
    "bad-betas": (lambda d: ["--adam-betas", "0.9"], r"--adam-betas must be two numbers in \[0, 1\)"),
    "bad-device": (lambda d: ["--device", "tpu"], "--device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    "bad-task": (lambda d: ["--task", "sums"], "--task 'sums' is an unknown task; choose one of addition, reverse"),
    "bad-eval-data": (
        lambda d: ["--eval-data", write_jsonl(d / "eval.jsonl", [{"prompt": "1 + 2 =", "completion": " 3"}])],
        r"eval\.jsonl:1: --eval-data needs chat records",
    ),
    "bad-checkpoint-keep": (
        lambda d: ["--checkpoint-in-graph", "--checkpoint-keep", "attention,mlp"],
        r"--checkpoint-keep must be a list of attention / linears, got \['attention', 'mlp'\]",
    ),
    "keep-without-in-graph": (
        lambda d: ["--checkpoint-keep", "linears"],
        r"--checkpoint-keep=\['linears'\] needs --checkpoint-in-graph",
    ),
    "skip-last-negative": (lambda d: ["--skip-checkpoint-last", -1], "--skip-checkpoint-last must be an int >= 0"),
    "resume-and-overwrite": (lambda d: ["--resume", "--overwrite"], "--overwrite starts the run over, --resume"),
    "cuda-graphs-with-offload": (
        lambda d: ["--compile-mode", "reduce-overhead", "--checkpoint-offload"],
        r"--compile-mode='reduce-overhead' \(CUDA graphs\) cannot be combined with checkpoint offload yet "
        r"\(--checkpoint-offload",
    ),
    "output-is-a-file": (
        lambda d: ["--output-dir", _file(d / "out.txt", b"x")],
        r"--output-dir '.*out\.txt' is a file",
    ),
    "output-under-a-file": (
        lambda d: ["--output-dir", _file(d / "f", b"x") / "run"],
        r"--output-dir '.*run' is inside '.*f', which is a file",
    ),
}


def _file(path, data):
    path.write_bytes(data)
    return path


def _folder(path):
    path.mkdir()
    return path


def _model_copy(d, *, tokenizer=True, **config):
    """The tiny model folder, copied with its config.json changed / its tokenizer files left out."""
    import shutil

    src = _model_copy.source
    dst = d / "model-copy"
    shutil.copytree(src, dst, ignore=None if tokenizer else shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    return dst


@pytest.mark.parametrize("case", sorted(CASES))
def test_clear_errors_before_the_model_loads(files, tmp_path, case, capsys, monkeypatch):
    """Every bad input: exit status 2, one line naming the option (or file:line), no traceback, nothing written,
    and the model never loaded (each check needs only files)."""
    import quickloris.models.loading as loading

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(loading, "load_model", no_load)
    _model_copy.source = files["model"]
    d = tmp_path / "in"
    d.mkdir()
    args, expected = CASES[case]
    # a repeated option: the last one counts
    rc = main(_args(files, tmp_path / "out", "--data", files["fixed"], *args(d)))
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quickloris train: error: "), err
    assert re.search(expected, lines[0][len("quickloris train: error: ") :]), lines[0]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.rglob(".quickloris*")]  # no marker, no probe left anywhere


@pytest.mark.parametrize("targets, trained", [("all-linear", 7), ("q_proj,v_proj", 2), ("down_proj", 1)])
def test_valid_target_modules_pass_the_check(files, tmp_path, targets, trained):
    out = tmp_path / "run"
    assert (
        main(
            _args(
                files,
                out,
                "--data",
                files["fixed"],
                "--target-modules",
                targets,
                "--max-steps",
                1,
                "--eval-data",
                files["fixed_eval"],
                "--no-eval-before",
                "--no-eval-after",
            )
        )
        == 0
    )
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert len(cfg["target_modules"]) == trained


def test_usage_errors_exit_2_without_traceback_and_debug_shows_it(files, tmp_path, monkeypatch):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "quickloris", "train", "--batch-size", "x", "--output-dir", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "quickloris train: error: argument --batch-size: invalid int value: 'x'",
        "(see quickloris train --help)",
    ]
    argv = _args(files, tmp_path / "out", "--grad-accum", 0)
    with pytest.raises(ValueError, match=r"TrainConfig\.grad_accum must be a positive int, got 0"):
        main([*argv, "--debug"])  # the Python-side message, with its traceback
    monkeypatch.setenv("QUICKLORIS_DEBUG", "1")
    with pytest.raises(ValueError, match=r"TrainConfig\.grad_accum"):
        main(argv)


def test_bnb_4bit_folder_trains_on_its_own_bytes(files, tmp_path):
    """A pre-quantized *-bnb-4bit folder: with --no-quantize every target layer must already be NF4 (a 16-bit one
    raises), so the file's bytes are what is trained on; `quickloris eval --adapter` then reproduces the run."""
    require("bitsandbytes")
    qcfg = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        files["model"], quantization_config=qcfg, device_map="cpu"
    )
    folder = tmp_path / "tiny-bnb-4bit"
    quantized.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(files["model"]).save_pretrained(folder)
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                str(folder),
                "--output-dir",
                str(out),
                "--threads",
                "1",
                "--no-progress",
                "--data",
                str(files["fixed"]),
                "--eval-data",
                str(files["fixed_eval"]),
                "--max-steps",
                "6",
                "--batch-size",
                "4",
                "--no-quantize",
                "--no-eval-before",
            ]
        )
        == 0
    )
    m = _metrics(out)
    assert m["resolved"]["model_format"] == "bnb-4bit" and len(m["steps"]) == 6
    res = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(folder),
                "--adapter",
                str(out / "adapter"),
                "--eval-data",
                str(files["fixed_eval"]),
                "--threads",
                "1",
                "--output",
                str(res),
            ]
        )
        == 0
    )
    assert json.loads(res.read_text())["samples"] == m["eval"]["after"]["samples"]
