"""`quickloris train --model VLM_FOLDER --data vlm.jsonl` on tiny random VLMs saved as Hugging Face folders (config,
safetensors, tokenizer with the chat template, image processor): the run folder and the PEFT adapter (language-model
LoRA; vision LoRA with --train-vision), padded and packed, --image-max-size, the embedded visual task, and options
that do not apply refused in one line naming them (--eval-data on VLMs: tests/cli/test_eval_vision.py)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickloris.cli.main import main  # noqa: E402
from tests.models.test_vision import write_data  # noqa: E402
from tests.vlm_tiny import image_processor, vlm_model, vlm_tokenizer  # noqa: E402


def save_vlm(row: str, folder):
    tok = vlm_tokenizer(row)
    model = vlm_model(row, tok)
    model.config.text_config._attn_implementation = None  # saved without the test's eager choice
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    image_processor(row).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    d = tmp_path_factory.mktemp("vlm")
    write_data(d, 0)
    return {"model": save_vlm("qwen2_vl", d / "qwen"), "data": d / "vlm.jsonl", "dir": d}


def _train(model, out, *extra):
    args = [
        "train",
        "--model",
        str(model),
        "--output-dir",
        str(out),
        "--threads",
        "1",
        "--no-progress",
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--lr",
        "1e-3",
        "--r",
        "4",
        *map(str, extra),
    ]
    return main(args)


def _adapter_keys(out):
    from safetensors import safe_open

    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_train_on_vlm_folder(qwen, tmp_path, capsys, packing):
    out = tmp_path / "run"
    extra = ["--data", qwen["data"], "--image-max-size", "56"] + (["--packing"] if packing else [])
    assert _train(qwen["model"], out, *extra) == 0
    text = capsys.readouterr().out
    assert "3 examples" in text and "no evaluation: training on --data" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["steps"]) == 2 and all(h["trained_tokens"] > 0 and h["loss"] > 0 for h in metrics["steps"])
    keys = _adapter_keys(out)
    assert keys and all(".language_model.layers." in k for k in keys)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4


def test_train_vision_adds_vision_lora(qwen, tmp_path):
    out = tmp_path / "run"
    assert _train(qwen["model"], out, "--data", qwen["data"], "--train-vision") == 0
    keys = _adapter_keys(out)
    assert any(".visual." in k for k in keys) and any(".language_model." in k for k in keys)


def test_visual_task_scores_before_and_after(qwen, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(qwen["model"], out, "--visual-task", "shapes", "--num-train", "8", "--num-eval", "3") == 0
    text = capsys.readouterr().out
    assert "3 held-out problems of visual task 'shapes'" in text
    ev = json.loads((out / "metrics.json").read_text())["eval"]
    assert set(ev) == {"before", "after"} and ev["after"]["total"] == 3


@pytest.mark.parametrize(
    "extra,message",
    [
        ([], "--visual-task or --data is needed"),
        (["--data", "D", "--visual-task", "dots"], "--visual-task and --data are exclusive"),
        (["--data", "D", "--image-max-size", "20"], "--image-max-size=20 is smaller than the model's patch multiple"),
    ],
)
def test_vlm_options_refused_in_one_line(qwen, tmp_path, capsys, extra, message):
    extra = [str(qwen["data"]) if e == "D" else e for e in extra]
    assert _train(qwen["model"], tmp_path / "run", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_image_options_refused_for_a_text_model(tmp_path, capsys):
    from tests.train.tiny import save_tiny_llama

    model = save_tiny_llama(tmp_path / "llama")
    capsys.readouterr()
    assert _train(model, tmp_path / "run", "--image-max-size", "64") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--image-max-size applies to vision-language models" in err[0], err


@pytest.mark.parametrize("row", ["llava", "mllama"])
def test_other_families_train_in_bf16(tmp_path, row):
    """Llava (packed) and Mllama (its image rows only through the vision tower) from saved folders, the whole model
    in bf16 (the image processor's fp32 pixels are cast to the tower's dtype)."""
    write_data(tmp_path, 1)
    folder = save_vlm(row, tmp_path / row)
    extra = ["--dtype", "bfloat16", "--data", tmp_path / "vlm.jsonl"] + (["--packing"] if row == "llava" else [])
    assert _train(folder, tmp_path / "run", *extra) == 0
    steps = json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"]
    assert len(steps) == 2 and all(s["loss"] == s["loss"] and s["loss"] > 0 for s in steps)


@pytest.mark.parametrize("row", ["qwen2_vl", "llava"])
def test_a_train_vision_adapter_loads_back(tmp_path, row):
    """An adapter written with --train-vision (PEFT's one target list then also names vision linears that are no
    decoder linears: Qwen's ``qkv`` / ``fc1``, CLIP's ``out_proj`` / ``fc1``) prepares the model again with its vision
    LoRA - as eval, export and a continued run load it - and every LoRA tensor comes back as saved."""
    from safetensors.torch import load_file

    from quickloris.models.adapters import adapter_state_dict
    from quickloris.models.prepare import prepare_model, qlora_config

    write_data(tmp_path, 0)
    folder = save_vlm(row, tmp_path / row)
    out = tmp_path / "run"
    assert _train(folder, out, "--data", tmp_path / "vlm.jsonl", "--train-vision", "--lr", "1e-2") == 0
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(folder))
    prepare_model(model, adapter=str(out / "adapter"))
    assert qlora_config(model).train_vision
    loaded = adapter_state_dict(model)
    assert sorted(loaded) == sorted(saved) and any(".lora_B." in k and saved[k].abs().max() > 0 for k in saved)
    for key, t in saved.items():
        assert torch.equal(loaded[key].to(t.dtype), t), key
