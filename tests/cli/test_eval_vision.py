"""`quickloris train --eval-data` and `quickloris eval` on vision-language models (tiny random-init Qwen2-VL saved as
a Hugging Face folder): the run's before / after numbers are reproduced by `quickloris eval` from the adapter folder
(--eval-data with images; the embedded --visual-task with vision LoRA), the visual task's count equals an
independent greedy decode (transformers' inputs, `generate`, first-line comparison written here), and bad input is
one line naming the option (and file:line)."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickloris.cli.main import main  # noqa: E402
from tests.cli.test_train_vision import save_vlm  # noqa: E402
from tests.vlm_tiny import draw  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN = 12  # pictures in the training rows


def _fresh_seed() -> int:
    value = int(os.environ.get("QUICKLORIS_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"seed {value} (replay: QUICKLORIS_TEST_SEED={value})")
    return value


def _rows(folder, name: str, first: int, n: int, seed: int):
    """`n` rows of a new picture and "What is it?" -> "blob", then n // 3 + 1 rows "Say hi" -> "hi"."""
    (folder / "images").mkdir(exist_ok=True)
    rows = []
    for i in range(first, first + n):
        draw(seed + i).save(folder / "images" / f"{i}.png")
        image = {"type": "image", "image": f"images/{i}.png"}
        rows.append(([{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}], "blob"))
    rows += [([{"role": "user", "content": "Say hi"}], "hi")] * (n // 3 + 1)
    path = folder / name
    path.write_text(
        "".join(json.dumps({"messages": [*p, {"role": "assistant", "content": a}]}) + "\n" for p, a in rows)
    )
    return path


def _train(model, out, *extra):
    n = torch.get_num_threads()
    common = ["--threads", "1", "--no-progress", "--batch-size", "4", "--r", "4", "--save-every", "0"]
    rc = main(["train", "--model", str(model), "--output-dir", str(out), *common, *map(str, extra)])
    torch.set_num_threads(n)
    return rc


def _eval(folder, model, *extra):
    out = folder / f"eval-{len(list(folder.glob('eval-*.json')))}.json"
    n = torch.get_num_threads()
    rc = main(["eval", "--model", str(model), "--threads", "1", "--output", str(out), *map(str, extra)])
    torch.set_num_threads(n)
    assert rc == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    d = tmp_path_factory.mktemp("vlm-eval")
    seed = _fresh_seed()
    torch.manual_seed(seed)
    return {"dir": d, "seed": seed, "model": save_vlm("qwen2_vl", d / "qwen")}


@pytest.fixture(scope="module")
def data_run(vlm):
    """Trained on --data with --eval-data: held-out rows with new pictures (and the text row)."""
    d = vlm["dir"]
    data, held = _rows(d, "train.jsonl", 0, TRAIN, vlm["seed"]), _rows(d, "held.jsonl", 100, 3, vlm["seed"])
    out = d / "run"
    extra = ["--data", data, "--eval-data", held, "--max-steps", 30, "--lr", "1e-2", "--warmup-steps", 3]
    assert _train(vlm["model"], out, *extra) == 0
    return {"held": held, "out": out, "metrics": json.loads((out / "metrics.json").read_text())}


def test_train_scores_eval_data_and_eval_reproduces_it(vlm, data_run, capsys):
    ev = data_run["metrics"]["eval"]
    assert set(ev) == {"before", "after"} and ev["after"]["total"] == ev["before"]["total"] == 5
    assert ev["after"]["correct"] > ev["before"]["correct"]  # the answers were learnt
    after = _eval(vlm["dir"], vlm["model"], "--adapter", data_run["out"] / "adapter", "--eval-data", data_run["held"])
    keys = ("accuracy", "correct", "total", "max_new_tokens", "samples")
    assert {k: after[k] for k in keys} == {k: ev["after"][k] for k in keys}
    assert (after["nf4"], after["adapter"], after["eval"]) == (
        True,
        str(data_run["out"] / "adapter"),
        f"--eval-data {data_run['held']}",
    )
    before = _eval(vlm["dir"], vlm["model"], "--nf4", "--eval-data", data_run["held"])
    assert {k: before[k] for k in keys} == {k: ev["before"][k] for k in keys}
    plain = _eval(vlm["dir"], vlm["model"], "--eval-data", data_run["held"])  # the model as loaded (no NF4)
    assert (plain["nf4"], plain["total"]) == (False, 5)
    text = capsys.readouterr().out
    assert text.count("eval: --eval-data") == 3 and text.count("\neval: exact match") == 3


@pytest.mark.gpu
def test_gpu_run_is_reproduced_by_eval(vlm, tmp_path):
    """On a GPU, with the fast path's defaults (bf16, compiled regions, activation checkpointing; evaluation runs the
    regions eagerly), `quickloris eval --device cuda` gives the run's before / after on --eval-data."""
    data = _rows(tmp_path, "train.jsonl", 0, TRAIN, vlm["seed"])
    held = _rows(tmp_path, "held.jsonl", 100, 3, vlm["seed"])
    out = tmp_path / "run"
    extra = ["--data", data, "--eval-data", held, "--max-steps", 30, "--lr", "1e-2", "--warmup-steps", 3]
    assert _train(vlm["model"], out, *extra) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resolved"]["dtype"] == "torch.bfloat16" and metrics["resolved"]["compile"]
    ev = metrics["eval"]
    keys = ("accuracy", "correct", "total", "max_new_tokens", "samples")
    after = _eval(tmp_path, vlm["model"], "--device", "cuda", "--adapter", out / "adapter", "--eval-data", held)
    before = _eval(tmp_path, vlm["model"], "--device", "cuda", "--nf4", "--eval-data", held)
    assert {k: after[k] for k in keys} == {k: ev["after"][k] for k in keys}
    assert {k: before[k] for k in keys} == {k: ev["before"][k] for k in keys}
    assert ev["after"]["correct"] > ev["before"]["correct"]


def _reference_count(folder, adapter, problems, max_new_tokens: int) -> tuple[int, list[str]]:
    """The adapter's model (NF4 base + LoRA, as quickloris trained it) fed transformers-built inputs, greedy
    `generate`, first lines compared here."""
    from quickloris.models.prepare import prepare_model, qlora_config
    from quickloris.train.evaluation import run_quantization
    from tests.vlm_tiny import hf_inputs, vlm_tokenizer

    model = transformers.AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32)
    prepare_model(model, run_quantization(str(adapter)), adapter=str(adapter))
    assert qlora_config(model).train_vision and "qkv" not in qlora_config(model).target_modules
    model.eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert tok.chat_template == vlm_tokenizer("qwen2_vl").chat_template
    correct, replies = 0, []
    with torch.no_grad():
        for p in problems:
            inputs = hf_inputs("qwen2_vl", tok, p.prompt_messages(), list(p.images))
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True)
            reply = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            lines = [x.strip() for x in reply.strip().splitlines() if x.strip()]
            correct += (lines[0] if lines else "") == p.answer
            replies.append(reply)
    return correct, replies


def test_visual_task_with_vision_lora(vlm, capsys):
    """--visual-task --train-vision: eval loads the vision LoRA too and gives the run's after number, which equals
    the independent count."""
    from quickloris.data.vision_tasks import visual_problems

    out = vlm["dir"] / "visual"
    task = ["--visual-task", "shapes", "--num-eval", 18]
    extra = [*task, "--num-train", 64, "--train-vision", "--max-steps", 80, "--lr", "1e-2", "--warmup-steps", 3]
    assert _train(vlm["model"], out, *extra) == 0
    after = json.loads((out / "metrics.json").read_text())["eval"]["after"]
    from safetensors import safe_open

    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert any(".visual." in k for k in f.keys())
    result = _eval(vlm["dir"], vlm["model"], "--adapter", out / "adapter", *task)
    assert (result["correct"], result["total"], result["samples"]) == (after["correct"], 18, after["samples"])
    assert result["eval"] == "18 held-out problems of visual task 'shapes' (seed 0)"
    problems = visual_problems("shapes", "heldout", 18, 0, 56)
    correct, replies = _reference_count(vlm["model"], out / "adapter", problems, result["max_new_tokens"])
    assert correct == result["correct"] > 0  # something to count: 80 steps learn at least one shape name
    assert [s["reply"] for s in result["samples"]] == replies[:3]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    from tests.train.tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("llama") / "llama")


def _bad_files(folder):
    """A VLM eval file whose second row names a missing image, and a good VLM eval file."""
    good = _rows(folder, "good.jsonl", 200, 1, 0)
    missing = folder / "missing.jsonl"
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": "images/nope.png"}]},
            {"role": "assistant", "content": "x"},
        ]
    }
    missing.write_text(good.read_text().splitlines()[0] + "\n" + json.dumps(row) + "\n")
    return good, missing


@pytest.mark.parametrize(
    "command,model,extra,message",
    [
        (
            "train",
            "vlm",
            ["--data", "GOOD", "--eval-data", "MISSING"],
            "--eval-data: MISSING:2: messages[0]: image 'images/nope.png' not found",
        ),
        ("eval", "vlm", ["--eval-data", "MISSING"], "--eval-data: MISSING:2: messages[0]: image 'images/nope.png'"),
        (
            "train",
            "text",
            ["--eval-data", "GOOD"],
            "--eval-data: GOOD:1: messages[0]: content part 0 is an image: image parts need a vision model",
        ),
        ("eval", "text", ["--eval-data", "GOOD"], "--eval-data: GOOD:1: messages[0]: content part 0 is an image"),
        ("eval", "text", ["--visual-task", "dots"], "--visual-task applies to vision-language models"),
        ("eval", "vlm", [], "--visual-task or --eval-data is needed to score a vision-language model"),
        (
            "eval",
            "vlm",
            ["--visual-task", "dots", "--eval-data", "GOOD"],
            "--visual-task and --eval-data are exclusive",
        ),
        ("eval", "vlm", ["--task", "addition"], "--task is a text task"),
        ("eval", "vlm", ["--visual-task", "dots", "--gguf", "GGUF"], "--gguf scores a text model's file"),
    ],
)
def test_bad_input_is_one_line(vlm, text_model, tmp_path, capsys, command, model, extra, message):
    good, missing = _bad_files(tmp_path)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    names = {"GOOD": str(good), "MISSING": str(missing), "GGUF": str(gguf)}
    args = [names.get(a, a) for a in extra]
    folder = vlm["model"] if model == "vlm" else text_model
    if command == "train":
        args += ["--output-dir", str(tmp_path / "run"), "--max-steps", "1", "--threads", "1"]
    capsys.readouterr()
    assert main([command, "--model", str(folder), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    for k, v in names.items():
        message = message.replace(k, v)
    assert len(err) == 1 and message in err[0], err
