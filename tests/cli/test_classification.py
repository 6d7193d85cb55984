"""`quickloris train --task-type classification` and `quickloris eval --task-type classification` on a tiny random
Llama (CPU, seconds): the run folder (adapter with the score head and the labels, metrics with accuracy and
macro-F1 before / after), the adapter in the real PEFT, eval reproducing the run, packing, exact resume, class
weights, clear errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickloris.cli.main import build_parser, main  # noqa: E402
from quickloris.cli.train import configs_from_args  # noqa: E402
from quickloris.train.run import run_train  # noqa: E402
from tests.train.tiny import save_tiny_llama, write_jsonl  # noqa: E402

# The class is given by a word: learnable by a tiny random model in a few dozen steps.
WORDS = {"good": "positive", "fine": "positive", "bad": "negative", "poor": "negative", "so-so": "neutral"}
ROWS = [
    {"text": f"{a} {w} {b}", "label": lab}
    for w, lab in WORDS.items()
    for a in ("it was", "that is", "so")
    for b in ("today", "again")
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls")
    return {
        "model": save_tiny_llama(d / "model"),
        "dir": d,
        "train": write_jsonl(d / "train.jsonl", ROWS * 2),
        "eval": write_jsonl(d / "eval.jsonl", ROWS[::3]),
        "ints": write_jsonl(
            d / "ints.jsonl",
            [{"text": r["text"], "label": sorted(set(WORDS.values())).index(r["label"])} for r in ROWS],
        ),
    }


def _args(files, out, *extra):
    return [
        "train",
        "--task-type",
        "classification",
        "--model",
        str(files["model"]),
        "--output-dir",
        str(out),
        "--threads",
        "1",
        "--no-progress",
        "--batch-size",
        "6",
        *map(str, extra),
    ]


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


def test_train_learns_and_the_adapter_loads_in_peft_and_eval(files, tmp_path, capsys):
    from peft import PeftModel

    out = tmp_path / "run"
    assert (
        main(
            _args(
                files,
                out,
                "--data",
                files["train"],
                "--eval-data",
                files["eval"],
                "--max-steps",
                40,
                "--lr",
                "1e-2",
                "--warmup-steps",
                2,
                "--save-every",
                20,
                "--class-weights",
                "auto",
            )
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "labels negative, neutral, positive" in printed and "class weights: negative 0.8333, neutral 1.667" in printed
    )
    assert re.search(r"eval before: accuracy [\d.]+% \(\d+/10\), macro-F1", printed)
    assert re.search(r"    neutral +[\d.]+% +[\d.]+% +[\d.]+% +2\n", printed)  # the per-class table
    m = _metrics(out)
    before, after = m["eval"]["before"], m["eval"]["after"]
    assert after["accuracy"] == 1.0 and after["macro_f1"] == 1.0 and before["accuracy"] < 0.8
    assert after["confusion"] == [[4, 0, 0], [0, 2, 0], [0, 0, 4]] and after["labels"] == [
        "negative",
        "neutral",
        "positive",
    ]
    assert m["summary"]["loss_last"] < 0.1 * m["summary"]["loss_first"]
    assert all(r["trained_tokens"] == 6 for r in m["steps"])  # texts per step
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["task_type"] == "classification" and cfg["resolved"]["labels"] == [
        "negative",
        "neutral",
        "positive",
    ]
    assert cfg["resolved"]["class_weights"] == pytest.approx([30 / 36, 30 / 18, 30 / 36])
    adapter = out / "adapter"
    assert json.loads((adapter / "labels.json").read_text())["id2label"] == {
        "0": "negative",
        "1": "neutral",
        "2": "positive",
    }
    for ckpt in (out / "checkpoints").iterdir():  # checkpoints hold the head too (resume restores it)
        assert json.loads((ckpt / "adapter_config.json").read_text())["modules_to_save"] == ["score"]

    # quickloris eval reproduces the run's "after"
    res = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--task-type",
                "classification",
                "--model",
                str(files["model"]),
                "--adapter",
                str(adapter),
                "--eval-data",
                str(files["eval"]),
                "--threads",
                "1",
                "--output",
                str(res),
            ]
        )
        == 0
    )
    got = json.loads(res.read_text())
    assert (got["accuracy"], got["macro_f1"], got["confusion"]) == (
        after["accuracy"],
        after["macro_f1"],
        after["confusion"],
    )

    # the real PEFT on transformers' classifier of the same base (its linears rounded to NF4 as ours are)
    from quickloris.quant.nf4 import dequantize_nf4_reference, quantize_nf4

    labels = json.loads((adapter / "labels.json").read_text())
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        files["model"],
        num_labels=labels["num_labels"],
        id2label={int(k): v for k, v in labels["id2label"].items()},
        label2id=labels["label2id"],
    ).eval()
    with torch.no_grad():
        for _name, mod in base.model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                packed, state = quantize_nf4(mod.weight)
                mod.weight.copy_(dequantize_nf4_reference(packed, state, torch.float32))
    pm = PeftModel.from_pretrained(base, adapter).eval()
    tok = transformers.AutoTokenizer.from_pretrained(files["model"])
    enc = tok([r["text"] for r in ROWS[::3]], padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = pm(**enc).logits.argmax(-1).tolist()
    assert [pm.config.id2label[p] for p in pred] == [r["label"] for r in ROWS[::3]]


def test_packing_int_labels_and_eval_on_the_embedded_task(files, tmp_path, capsys):
    out = tmp_path / "packed"
    assert (
        main(
            _args(
                files,
                out,
                "--data",
                files["ints"],
                "--packing",
                "--max-seq-len",
                64,
                "--batch-size",
                1,
                "--max-steps",
                3,
                "--no-eval-before",
                "--no-eval-after",
            )
        )
        == 0
    )
    m = _metrics(out)
    assert len(m["steps"]) == 3 and all(r["trained_tokens"] > 1 for r in m["steps"])  # several texts per packed row
    assert json.loads((out / "adapter" / "labels.json").read_text())["label2id"] == {"0": 0, "1": 1, "2": 2}
    capsys.readouterr()
    # the embedded task (sentiment) by default, its held-out split scored
    out = tmp_path / "embedded"
    assert main(_args(files, out, "--num-train", 24, "--num-eval", 10, "--max-steps", 2, "--no-eval-before")) == 0
    printed = capsys.readouterr().out
    assert "embedded classification task 'sentiment': 24 texts, labels negative, positive" in printed
    assert "eval: 10 held-out texts of task 'sentiment'" in printed
    assert _metrics(out)["eval"]["after"]["total"] == 10
    res = tmp_path / "e.json"
    assert (
        main(
            [
                "eval",
                "--task-type",
                "classification",
                "--model",
                str(files["model"]),
                "--adapter",
                str(out / "adapter"),
                "--num-eval",
                "10",
                "--threads",
                "1",
                "--output",
                str(res),
            ]
        )
        == 0
    )
    assert json.loads(res.read_text())["confusion"] == _metrics(out)["eval"]["after"]["confusion"]


def test_resume_reproduces_the_uninterrupted_run(files, tmp_path):
    """Interrupted after step 5 (checkpoint at 4), resumed: the same losses and the same adapter, score head
    included, as a run that never stopped."""
    opts = [
        "--data",
        files["train"],
        "--max-steps",
        8,
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
        "--class-weights",
        "negative=2",
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
    assert main(_args(files, tmp_path / "cut", *opts, "--resume")) == 0
    full, cut = _metrics(tmp_path / "full"), _metrics(tmp_path / "cut")
    assert [r["loss"] for r in cut["steps"]] == [r["loss"] for r in full["steps"]]
    assert len({r["loss"] for r in full["steps"]}) == 8
    a = (tmp_path / "full" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "cut" / "adapter" / "adapter_model.safetensors").read_bytes()
    # class weights are part of what a resumed run must match
    assert main(_args(files, tmp_path / "cut", *opts[:-2], "--resume", "--class-weights", "auto")) == 2


def _bad(files, d):
    return {
        "weights-on-causal": (
            ["--task-type", "causal_lm", "--class-weights", "auto"],
            "--class-weights weighs the classes of --task-type classification",
        ),
        "weights-syntax": (
            ["--class-weights", "1,x"],
            "--class-weights must be none, auto, w1,w2,... or label=w,...: has 'x', not a number",
        ),
        "weights-count": (
            ["--class-weights", "1,2"],
            "--class-weights gives 2 weights but the data has 3 labels "
            r"\(negative, neutral, positive, in this order\)",
        ),
        "weights-name": (["--class-weights", "good=2"], "--class-weights names 'good', not a label of the data"),
        "unseen-eval-label": (
            ["--eval-data", write_jsonl(d / "e.jsonl", [ROWS[0], {"text": "x", "label": "meh"}])],
            r"e\.jsonl:2: label 'meh' is not one of the labels of the training data",
        ),
        "chat-rows": (
            ["--data", write_jsonl(d / "chat.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])],
            r"chat\.jsonl:1: missing 'text', 'label' \(a chat record",
        ),
        "one-label": (
            ["--data", write_jsonl(d / "one.jsonl", [{"text": "a", "label": "x"}] * 3)],
            "the data has one label only",
        ),
        "generative-task": (["--task", "addition"], "--task 'addition' is not a classification task"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "weights-on-causal",
        "weights-syntax",
        "weights-count",
        "weights-name",
        "unseen-eval-label",
        "chat-rows",
        "one-label",
        "generative-task",
    ],
)
def test_clear_errors_before_the_model_loads(files, tmp_path, case, capsys, monkeypatch):
    import quickloris.models.loading as loading

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(loading, "load_model", no_load)
    d = tmp_path / "in"
    d.mkdir()
    extra, expected = _bad(files, d)[case]
    data = [] if case == "generative-task" or "--data" in extra else ["--data", files["train"]]
    rc = main(_args(files, tmp_path / "out", *data, *extra))
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.search(expected, lines[0]), err
    assert not (tmp_path / "out").exists()


def test_adapter_mismatches_and_eval_errors(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(_args(files, out, "--data", files["train"], "--max-steps", 1, "--no-eval-before", "--no-eval-after")) == 0
    )
    two = write_jsonl(tmp_path / "two.jsonl", [r for r in ROWS if r["label"] != "neutral"])
    capsys.readouterr()
    assert main(_args(files, tmp_path / "o2", "--data", two, "--adapter", out / "adapter")) == 2
    assert (
        "--adapter '" in (err := capsys.readouterr().err)
        and "classifies negative, neutral, positive, but the data's labels are negative, positive" in err
    )
    # a classifier adapter is not a causal LM adapter, and the other way round
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]}],
    )
    assert (
        main(
            [
                "eval",
                "--model",
                str(files["model"]),
                "--adapter",
                str(out / "adapter"),
                "--eval-data",
                str(chat),
                "--threads",
                "1",
            ]
        )
        == 2
    )
    assert (
        "holds a classification head (score): load it into a sequence classifier (--task-type "
        "classification)" in capsys.readouterr().err
    )
    assert (
        main(
            ["eval", "--task-type", "classification", "--model", str(files["model"]), "--eval-data", str(files["eval"])]
        )
        == 2
    )
    assert "--adapter is required with --task-type classification" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], ROWS[1], {"text": "x", "label": "meh"}])
    assert (
        main(
            [
                "eval",
                "--task-type",
                "classification",
                "--model",
                str(files["model"]),
                "--adapter",
                str(out / "adapter"),
                "--eval-data",
                str(bad),
            ]
        )
        == 2
    )
    assert re.search(r"bad\.jsonl:3: label 'meh' is not one of the labels of the adapter", capsys.readouterr().err)
    # --overwrite with a causal run removes the classifier's files (labels.json too: a file a run writes)
    assert (
        main(
            [
                "train",
                "--model",
                str(files["model"]),
                "--output-dir",
                str(out),
                "--overwrite",
                "--data",
                str(chat),
                "--max-steps",
                "1",
                "--threads",
                "1",
                "--no-progress",
                "--no-eval-before",
                "--no-eval-after",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--task-type",
                "classification",
                "--model",
                str(files["model"]),
                "--adapter",
                str(out / "adapter"),
                "--eval-data",
                str(files["eval"]),
            ]
        )
        == 2
    )
    assert "has no labels.json: it is not a sequence classification adapter" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("attention,packing", [("sdpa", False), ("flex", True)])
def test_gpu_fast_path_classifier_learns_without_graph_breaks(files, tmp_path, attention, packing):
    """On a GPU the defaults are the fast path (bf16, fused NF4 kernel, regional compile, checkpointing): the
    classifier compiles with 0 graph breaks, learns, and `quickloris eval` reproduces its numbers."""
    from quickloris.parallel.compile import compile_stats, reset_compile_stats

    out = tmp_path / "run"
    model = save_tiny_llama(tmp_path / "model", heads=3, kv_heads=1)  # head_dim 16: flex's GPU kernels need >= 16
    reset_compile_stats()
    assert (
        main(
            [
                "train",
                "--task-type",
                "classification",
                "--model",
                str(model),
                "--output-dir",
                str(out),
                "--no-progress",
                "--batch-size",
                "6",
                "--data",
                str(files["train"]),
                "--eval-data",
                str(files["eval"]),
                "--max-steps",
                "40",
                "--lr",
                "1e-2",
                "--warmup-steps",
                "2",
                "--attention",
                attention,
                "--packing" if packing else "--no-packing",
                "--max-seq-len",
                "64",
            ]
        )
        == 0
    )
    m = _metrics(out)
    stats = compile_stats()
    print("compile:", stats)
    assert m["resolved"]["device"].startswith("cuda") and m["resolved"]["dtype"] == "torch.bfloat16"
    assert m["resolved"]["compile"] is True and m["resolved"]["gradient_checkpointing"] is True
    assert stats["graph_breaks"] == 0 and stats["unique_graphs"] >= 1
    assert m["eval"]["after"]["accuracy"] == 1.0 > m["eval"]["before"]["accuracy"]
    res = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--task-type",
                "classification",
                "--model",
                str(model),
                "--adapter",
                str(out / "adapter"),
                "--eval-data",
                str(files["eval"]),
                "--output",
                str(res),
            ]
        )
        == 0
    )
    assert json.loads(res.read_text())["confusion"] == m["eval"]["after"]["confusion"]
