"""`quickloris export gguf`: options derived from GGUFExportConfig, a real export from folders."""

from __future__ import annotations

import dataclasses
import re

import gguf
import numpy as np
import pytest
import torch

from quickloris.cli.main import main
from quickloris.export.gguf_export import GGUFExportConfig
from quickloris.export.quants import GGMLType, quantize


def test_help_lists_every_config_field(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", "gguf", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(GGUFExportConfig):
        assert "--" + f.name.replace("_", "-") in out
    assert "{f32,f16,bf16,q8_0,q4_0,q4_k_s,q4_k_m,q5_k_s,q5_k_m,q6_k}" in out


def test_readme_documents_every_option():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("Options of `quickloris export gguf`") :]
    for f in dataclasses.fields(GGUFExportConfig):
        assert f"| `--{f.name.replace('_', '-')}" in section, f"README lacks --{f.name}"


def test_export_from_model_and_adapter_folders(tmp_path, seed, helpers, bpe_tokenizer, capsys):
    from peft import LoraConfig, get_peft_model

    base = helpers.tiny_model(vocab_size=len(bpe_tokenizer), hidden=64, inter=256)
    base.save_pretrained(tmp_path / "model")
    bpe_tokenizer.save_pretrained(tmp_path / "model")
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    lora.save_pretrained(tmp_path / "adapter")
    expected = lora.merge_and_unload().model.layers[1].mlp.down_proj.weight.detach()
    out = tmp_path / "out.gguf"
    # a PEFT adapter trained on the 16-bit model: merged into that (the default would be the NF4 base)
    rc = main(
        [
            "export",
            "gguf",
            "--model",
            str(tmp_path / "model"),
            "--adapter",
            str(tmp_path / "adapter"),
            "--out",
            str(out),
            "--quant",
            "q4_k_m",
            "--threads",
            "2",
            "--name",
            "tiny",
            "--merge-base",
            "original",
        ]
    )
    assert rc == 0
    assert f"wrote {out}" in capsys.readouterr().out
    r = gguf.GGUFReader(out)
    assert r.fields["general.name"].contents() == "tiny"
    assert r.fields["general.file_type"].contents() == 15
    t = {x.name: x for x in r.tensors}["blk.1.ffn_down.weight"]  # rows of 256: Q4_K, or Q6_K in "more bits" layers
    assert t.tensor_type.name in ("Q4_K", "Q6_K")
    ours = quantize(expected.numpy(), GGMLType[t.tensor_type.name])
    assert np.array_equal(np.asarray(t.data), ours)


def test_bad_model_paths_are_reported(tmp_path, capsys):
    assert main(["export", "gguf", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err  # one line, exit status 2 (quickloris.cli.main)
    with pytest.raises(SystemExit):
        main(["export", "gguf", "--quant", "q3_k", "--out", str(tmp_path / "x.gguf")])


def test_export_from_a_bnb_4bit_folder(tmp_path, helpers, bpe_tokenizer):
    """A pre-quantized bitsandbytes NF4 folder: the file holds exactly bitsandbytes' dequantized weights."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    helpers.tiny_model(vocab_size=len(bpe_tokenizer), hidden=128, inter=256).save_pretrained(tmp_path / "base")
    q = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base",
        device_map="cpu",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
        ),
    )
    q.save_pretrained(tmp_path / "bnb")
    bpe_tokenizer.save_pretrained(tmp_path / "bnb")
    assert (
        main(["export", "gguf", "--model", str(tmp_path / "bnb"), "--quant", "f32", "--out", str(tmp_path / "x.gguf")])
        == 0
    )
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "x.gguf").tensors}
    w = q.model.layers[1].mlp.down_proj.weight
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight"], bnbf.dequantize_4bit(w.data, w.quant_state).float())


@pytest.mark.parametrize("model_format", ["folder", "gguf"])
def test_an_adapter_for_another_model_is_one_line(
    model_format, tmp_path, helpers, bpe_tokenizer, monkeypatch, cli_error
):
    """Checked from config.json before a folder model is loaded; a GGUF model right after loading (reading its
    config from the file costs about as much as loading it); nothing is written."""
    from peft import LoraConfig, get_peft_model

    from quickloris.export import export_gguf, gguf_export

    other = helpers.tiny_model(vocab_size=len(bpe_tokenizer), hidden=32, inter=64)
    get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj", "down_proj"])).save_pretrained(tmp_path / "adapter")
    base = helpers.tiny_model(vocab_size=len(bpe_tokenizer), hidden=64, inter=128)
    if model_format == "folder":
        base.save_pretrained(tmp_path / "model")
        bpe_tokenizer.save_pretrained(tmp_path / "model")
        model = tmp_path / "model"
        monkeypatch.setattr(gguf_export, "_load", lambda *a: pytest.fail("the model was loaded before the check"))
    else:
        model = tmp_path / "model.gguf"
        export_gguf(base, model, tokenizer=bpe_tokenizer, quant="f32")
    message = cli_error(
        ["export", "gguf", "--model", model, "--adapter", tmp_path / "adapter", "--out", tmp_path / "x.gguf"],
        after_load=model_format == "gguf",
    )
    assert re.fullmatch(
        r"--adapter \S+adapter does not fit --model \S+model(\.gguf)?: model\.layers\.0\.mlp\."
        r"down_proj takes 128 inputs, but the adapter's lora_A is \[2, 64\]",
        message,
    ), message
    assert not (tmp_path / "x.gguf").exists()
