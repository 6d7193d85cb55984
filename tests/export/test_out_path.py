"""`quickloris export gguf --out`: an input of the export is never written (even with --overwrite, through
symbolic links, hard links and relative paths), an existing file only with --overwrite, a missing folder is an
error; all of it before the model is loaded, and a refused export writes nothing."""

from __future__ import annotations

import os
import re

import pytest

from quickloris.cli.main import main
from quickloris.export import export_gguf, gguf_export
from quickloris.export.quants import GGMLType
from quickloris.export.writer import GGUFWriter


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the export gets as far as loading the model."""
    monkeypatch.setattr(gguf_export, "_load", lambda *a: pytest.fail("the model was loaded before the check"))


@pytest.fixture
def gguf_model(tmp_path, helpers, bpe_tokenizer):
    path = tmp_path / "base.gguf"
    export_gguf(helpers.tiny_model(vocab_size=len(bpe_tokenizer), layers=1), path, tokenizer=bpe_tokenizer, quant="f32")
    return path


def snapshot(folder):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def export_args(*args) -> list:
    return ["export", "gguf", "--quant", "f32", *args]


def export(*args):
    return main([str(a) for a in export_args(*args)])


@pytest.mark.parametrize("how", ["same", "symlink", "relative", "hardlink"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_the_model_file_is_never_the_output(how, overwrite, tmp_path, gguf_model, no_load, monkeypatch, cli_error):
    monkeypatch.chdir(tmp_path)
    out = {
        "same": gguf_model,
        "symlink": tmp_path / "link.gguf",
        "relative": "sub/../base.gguf",
        "hardlink": tmp_path / "hard.gguf",
    }[how]
    (tmp_path / "sub").mkdir()
    if how == "symlink":
        os.symlink(gguf_model, out)
    elif how == "hardlink":
        os.link(gguf_model, out)
    before = snapshot(tmp_path)
    message = cli_error(export_args("--model", gguf_model, "--out", out, *(["--overwrite"] if overwrite else [])))
    assert re.fullmatch(
        r"--out \S+ is the --model file \(.*\): an export never writes over its own input; choose "
        r"another path \(--overwrite does not apply to inputs\)",
        message,
    ), message
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("target", ["config.json", "model.safetensors", "adapter_config.json"])
def test_files_of_the_model_and_adapter_folders_are_inputs(
    target, tmp_path, helpers, bpe_tokenizer, no_load, cli_error
):
    from peft import LoraConfig, get_peft_model

    base = helpers.tiny_model(vocab_size=len(bpe_tokenizer), layers=1)
    base.save_pretrained(tmp_path / "model")
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    folder = "adapter" if target.startswith("adapter") else "model"
    before = snapshot(tmp_path)
    message = cli_error(
        export_args(
            "--model",
            tmp_path / "model",
            "--adapter",
            tmp_path / "adapter",
            "--out",
            tmp_path / folder / target,
            "--overwrite",
        )
    )
    assert re.match(rf"--out \S+{target} is a file of the --{folder} folder", message), message
    assert snapshot(tmp_path) == before


def test_an_existing_file_needs_overwrite(tmp_path, gguf_model, monkeypatch, cli_error):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"the user's file")
    with monkeypatch.context() as m:
        m.setattr(gguf_export, "_load", lambda *a: pytest.fail("the model was loaded before the check"))
        message = cli_error(export_args("--model", gguf_model, "--out", out))
    assert re.fullmatch(r"--out \S+out.gguf already exists; pass --overwrite to replace it", message), message
    assert out.read_bytes() == b"the user's file"
    assert export("--model", gguf_model, "--out", out, "--overwrite") == 0
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.gguf", "out.gguf"]  # no temporary file left


@pytest.mark.parametrize("case", ["missing-folder", "folder", "dangling-symlink"])
def test_bad_out_paths(case, tmp_path, gguf_model, no_load, cli_error):
    if case == "missing-folder":
        out, match = (
            tmp_path / "no" / "such" / "m.gguf",
            r"--out \S+m.gguf: folder \S+such does not exist \(it is "
            r"not created; make it first\)",
        )
    elif case == "folder":
        out, match = tmp_path, r"--out \S+ is a folder; name the file to write, e.g. \S+model.gguf"
    else:
        out = tmp_path / "dangling.gguf"
        os.symlink(tmp_path / "nowhere", out)
        match = r"--out \S+dangling.gguf already exists; pass --overwrite to replace it"
    before = snapshot(tmp_path)
    message = cli_error(export_args("--model", gguf_model, "--out", out))
    assert re.fullmatch(match, message), message
    assert snapshot(tmp_path) == before and not (tmp_path / "no").exists()


def test_python_api_refuses_to_overwrite(tmp_path, helpers, bpe_tokenizer):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    model = helpers.tiny_model(vocab_size=len(bpe_tokenizer), layers=1)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        export_gguf(model, out, tokenizer=bpe_tokenizer, quant="f32")
    assert out.read_bytes() == b"keep"
    export_gguf(model, out, tokenizer=bpe_tokenizer, quant="f32", overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"


def test_a_file_that_appears_during_the_export_is_kept(tmp_path):
    """Without overwrite the finished file is linked into place, which fails rather than replacing a file that
    another process created meanwhile; the export's data is then removed."""
    out = tmp_path / "m.gguf"
    w = GGUFWriter(out, overwrite=False)
    i = w.add_tensor("a", (2, 32), GGMLType.F32)
    w.begin()
    w.write_tensor_bytes(i, b"\0" * 256)
    out.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError, match="appeared while it was being written"):
        w.finish()
    assert out.read_bytes() == b"someone else's"
    assert os.listdir(tmp_path) == ["m.gguf"]
    with GGUFWriter(tmp_path / "n.gguf", overwrite=False) as w:  # the normal case: in place, nothing left over
        i = w.add_tensor("a", (2, 32), GGMLType.F32)
        w.begin()
        w.write_tensor_bytes(i, b"\0" * 256)
    assert sorted(os.listdir(tmp_path)) == ["m.gguf", "n.gguf"]
