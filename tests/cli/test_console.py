"""What the commands print besides their own lines: progress bars only on a terminal or with --progress, never with
--no-progress; the libraries' messages that ask for needless actions dropped, everything else (other warnings,
errors) still printed; nothing left installed after the command."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from quickloris.cli.console import LOG_NOISE, command_console, quiet_noise  # noqa: E402
from quickloris.cli.main import main  # noqa: E402
from tests.helpers import require  # noqa: E402
from tests.train.tiny import save_tiny_llama, task_rows, write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
NOISE = ("clean_up_tokenization_spaces", "pip install kernels")
BAR = re.compile(r"(\S[^\r\n|]*): +\d+%\|")  # a tqdm line: "desc:  40%|████ ..."


def bars(text: str) -> set[str]:
    """The descriptions of the progress bars drawn in `text`."""
    return set(BAR.findall(text))


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize(("name", "prefix"), list(LOG_NOISE))
def test_each_logged_message_dropped_and_nothing_else(name, prefix):
    logger = logging.getLogger(name)
    seen = Records()
    logger.addHandler(seen)
    try:
        with quiet_noise():
            logger.warning(prefix + " and the rest of the message, %s", "with arguments")
            logger.warning("another warning of the same module")
            logger.error(prefix + " at error level")
            logging.getLogger(name + ".child").warning(prefix + " from a child logger: its own")
        logger.warning(prefix + " after the command")
    finally:
        logger.removeHandler(seen)
    assert seen.messages == [
        "another warning of the same module",
        prefix + " at error level",
        prefix + " from a child logger: its own",  # propagated to this logger's handlers, not dropped
        prefix + " after the command",
    ]


@pytest.mark.parametrize("flag", [True, False, None])
def test_transformers_bars_follow_and_are_restored(flag):
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    with command_console(flag):
        # None: pytest's captured stderr is not a terminal
        assert hf_logging.is_progress_bar_enabled() is bool(flag)
    assert hf_logging.is_progress_bar_enabled() is before


@pytest.mark.parametrize(("rank", "flag", "expected"), [("1", None, False), ("1", True, True), ("0", None, None)])
def test_other_ranks_draw_no_bars_unless_forced(monkeypatch, rank, flag, expected):
    from quickloris.utils.progress import _FORCED

    monkeypatch.setenv("RANK", rank)
    with command_console(flag):
        assert _FORCED.get() is expected


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model whose tokenizer files ask for clean_up_tokenization_spaces (as the tokenizer transformers
    builds from the embedded SmolLM2 GGUF does), addition data, and a 2-step run's adapter."""
    d = tmp_path_factory.mktemp("console")
    model = save_tiny_llama(d / "model", seed=0)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    write_jsonl(d / "train.jsonl", task_rows("addition", 16))
    write_jsonl(d / "held.jsonl", task_rows("addition", 6, "heldout"))
    return d


def cli(*args: str) -> subprocess.CompletedProcess:
    """`quickloris ARGS` in its own process, stdout and stderr piped (so not a terminal)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    return subprocess.run(
        [sys.executable, "-m", "quickloris", *args], capture_output=True, text=True, env=env, timeout=600
    )


def train_args(tiny: Path, out: str) -> list[str]:
    return [
        "train",
        "--model",
        str(tiny / "model"),
        "--data",
        str(tiny / "train.jsonl"),
        "--eval-data",
        str(tiny / "held.jsonl"),
        "--output-dir",
        str(tiny / out),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--threads",
        "1",
    ]


def test_train_run_stderr(tiny):
    """A whole `quickloris train` (load, NF4 quantization, eval before/after with decoding, training): with
    --progress its bars and nothing asking for an action; piped without the flag, no bars either."""
    forced = cli(*train_args(tiny, "forced"), "--progress")
    assert forced.returncode == 0, forced.stderr
    assert {"train", "NF4 quantize", "eval"} <= bars(forced.stderr), forced.stderr
    assert "exact match: before" in forced.stdout
    piped = cli(*train_args(tiny, "piped"))
    assert piped.returncode == 0, piped.stderr
    assert bars(piped.stderr) == set(), piped.stderr
    assert [line for line in piped.stderr.splitlines() if line.strip()] == [
        line for line in piped.stderr.splitlines() if line.startswith("step 2/2")
    ]  # the log line is all
    for run in (forced, piped):
        assert not any(n in run.stderr for n in NOISE), run.stderr
    error = cli(*train_args(tiny, "error"), "--model", str(tiny / "missing"))
    assert error.returncode == 2 and "error: " in error.stderr and "missing" in error.stderr


def test_eval_and_export_bars(tiny, capsys):
    """In-process: --progress draws the eval, NF4 and export bars (stderr is pytest's capture, not a terminal);
    without it, or with --no-progress, none."""
    run = tiny / "adapter-run"
    assert main([*train_args(tiny, "adapter-run"), "--no-progress", "--no-eval-before", "--no-eval-after"]) == 0
    capsys.readouterr()
    evaluate = ["eval", "--model", str(tiny / "model"), "--adapter", str(run / "adapter")]
    evaluate += ["--eval-data", str(tiny / "held.jsonl"), "--threads", "1"]
    export = ["export", "gguf", "--model", str(tiny / "model"), "--adapter", str(run / "adapter"), "--quant", "f16"]
    export += ["--tokenizer-pre", "qwen2", "--overwrite", "--out", str(tiny / "out.gguf")]
    for flag, expected in (("--progress", True), ("--no-progress", False), (None, False)):
        extra = [flag] if flag else []
        assert main([*evaluate, *extra]) == 0
        err = capsys.readouterr().err
        # "Loading weights": transformers' bar, which follows the same switch
        assert bars(err) == ({"Loading weights", "NF4 quantize", "eval"} if expected else set()), err
        assert not any(n in err for n in NOISE), err
        assert main([*export, *extra]) == 0
        err += capsys.readouterr().err
        assert bars(err) == ({"Loading weights", "NF4 quantize", "eval", "export f16"} if expected else set()), err
        for desc in bars(err):  # each bar reaches its end: n/n
            assert re.search(re.escape(desc) + r": 100%\|[^\r\n|]*\| (\d+)/\1 ", err), (desc, err)


def test_gguf_eval_bar(tiny, capsys):
    """`quickloris eval --gguf`: llama.cpp's replies, one problem at a time, under their own bar."""
    require("llama_cpp")
    run, out = tiny / "gguf-run", tiny / "gguf.gguf"
    assert main([*train_args(tiny, "gguf-run"), "--no-progress", "--no-eval-before", "--no-eval-after"]) == 0
    export = ["export", "gguf", "--model", str(tiny / "model"), "--adapter", str(run / "adapter"), "--quant", "f16"]
    assert main([*export, "--tokenizer-pre", "qwen2", "--out", str(out), "--no-progress"]) == 0
    evaluate = ["eval", "--model", str(tiny / "model"), "--gguf", str(out), "--eval-data", str(tiny / "held.jsonl")]
    capsys.readouterr()
    for flag, expected in (("--progress", {"eval GGUF"}), ("--no-progress", set())):
        assert main([*evaluate, "--threads", "1", flag]) == 0
        err = capsys.readouterr().err
        assert bars(err) == expected, err
        assert re.search(r"eval GGUF: 100%\|[^\r\n|]*\| 6/6 ", err) if expected else True
