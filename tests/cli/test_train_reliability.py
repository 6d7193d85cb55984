"""`quickloris train` never loses data and fails cleanly (issue 12): what --output-dir may be, what --overwrite does,
a diverging loss, Ctrl-C, and resuming from checkpoints that changed, broke or were left half-written.
Tiny random Llama on CPU, a second or two per run."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from quickloris.cli.main import main  # noqa: E402
from quickloris.train.rundir import MARKER  # noqa: E402
from tests.train.tiny import save_tiny_llama, task_rows, write_jsonl  # noqa: E402

ERROR = "quickloris train: error: "


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("reliability")
    return {"model": save_tiny_llama(d / "model"), "data": write_jsonl(d / "data.jsonl", task_rows("reverse", 24))}


def _train(files, out, *extra, data=None):
    return main(
        [
            "train",
            "--model",
            str(files["model"]),
            "--data",
            str(data or files["data"]),
            "--output-dir",
            str(out),
            "--threads",
            "1",
            "--no-progress",
            "--batch-size",
            "4",
            "--max-steps",
            "6",
            "--save-every",
            "2",
            "--log-every",
            "1",
            *map(str, extra),
        ]
    )


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith(ERROR), lines
    assert not any("Traceback" in line for line in lines)
    return lines[-1][len(ERROR) :]


def _metrics(out):
    return json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"invalid JSON: {c}"))


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- --output-dir


@pytest.mark.parametrize("overwrite", [False, True])
def test_the_model_and_adapter_folders_are_never_written(files, tmp_path, capsys, overwrite):
    flag = ["--overwrite"] if overwrite else []
    model_before = _tree(files["model"])
    assert _train(files, files["model"], *flag) == 2
    assert re.fullmatch(
        r"--output-dir '.*model' overlaps the model folder '.*model': a run never writes there; "
        r"choose another --output-dir",
        _error(capsys),
    )
    assert _train(files, files["model"] / "runs" / "a", *flag) == 2  # inside it
    assert "overlaps the model folder" in _error(capsys)
    assert _tree(files["model"]) == model_before
    # a run's adapter, given as --adapter while its run folder is the output (an --overwrite would delete it)
    assert _train(files, tmp_path / "first") == 0
    adapter_before = _tree(tmp_path / "first" / "adapter")
    assert _train(files, tmp_path / "first", "--adapter", tmp_path / "first" / "adapter", *flag) == 2
    assert "overlaps the adapter folder" in _error(capsys)
    assert _tree(tmp_path / "first" / "adapter") == adapter_before


def test_a_folder_that_is_not_a_run_is_refused_unless_overwrite(files, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _train(files, out) == 2
    assert re.fullmatch(
        r"--output-dir '.*mine' exists and is not a quickloris run; choose a new or empty folder, "
        r"or pass --overwrite to write the run into it",
        _error(capsys),
    )
    assert sorted(os.listdir(out)) == ["notes.txt"]  # nothing written
    assert _train(files, out, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / MARKER).is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # a file with a name a run writes is never replaced, not even with --overwrite
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "llama"}')
    assert _train(files, other, "--overwrite") == 2
    assert re.fullmatch(
        r"--output-dir '.*other' holds config\.json, which quickloris did not write and "
        r"--overwrite never replaces; choose another --output-dir",
        _error(capsys),
    )
    assert sorted(os.listdir(other)) == ["config.json"]


def test_new_and_empty_folders_need_nothing_and_the_marker_comes_first(files, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    assert _train(files, tmp_path / "empty") == 0
    import quickloris.train.run as run

    seen = []
    write_config = run._write_config

    def spy(out, *args):
        seen.append(sorted(os.listdir(out)))
        return write_config(out, *args)

    monkeypatch.setattr(run, "_write_config", spy)
    assert _train(files, tmp_path / "new" / "run") == 0
    assert seen == [[MARKER]]  # the marker is the first file of a run
    marker = json.loads((tmp_path / "new" / "run" / MARKER).read_text())
    assert marker["written_by"].startswith("quickloris") and "checkpoints" in marker["files"]
    assert oct((tmp_path / "new" / "run" / "config.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_overwrite_starts_a_run_over_and_deletes_only_its_files(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(files, out) == 0
    (out / "notes.txt").write_text("mine")
    (out / "adapter" / "README.md").write_text("model card")
    (out / "checkpoints" / "step-000004" / "extra.bin").write_bytes(b"x")
    assert _train(files, out) == 2
    assert re.fullmatch(
        r"--output-dir '.*run' holds a run \(checkpoint step-000006\): continue it with --resume, "
        r"start over with --overwrite, or choose another --output-dir",
        _error(capsys),
    )
    assert _train(files, out, "--overwrite", "--max-steps", 3, "--save-every", 0) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "adapter" / "README.md").is_file()
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000003", "step-000004"]
    assert os.listdir(out / "checkpoints" / "step-000004") == ["extra.bin"]  # the run's own files went
    assert len(_metrics(out)["steps"]) == 3


def test_a_run_from_before_markers_is_still_a_run(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(files, out) == 0
    (out / MARKER).unlink()
    assert _train(files, out) == 2
    assert "holds a run (checkpoint step-000006)" in _error(capsys)


def test_a_folder_that_cannot_be_written_is_refused_first(files, capsys):
    """/sys refuses new entries even to root (os.access would say yes to root: the check tries it)."""
    probe = "/sys/quickloris-probe"
    try:
        os.mkdir(probe)
    except OSError:
        pass
    else:  # pragma: no cover - not Linux, or a writable /sys
        os.rmdir(probe)
        pytest.skip("/sys is writable here")
    assert _train(files, "/sys/quickloris-run") == 2
    assert re.fullmatch(r"--output-dir '/sys/quickloris-run' cannot be written \(.*in '/sys'\)", _error(capsys))


# ------------------------------------------------------------------------------------------- divergence


def test_a_diverging_run_stops_at_the_step_and_keeps_its_reports(files, tmp_path, capsys):
    """--lr 1e30: the step-1 update is ~1e30 per LoRA entry (finite), step 2's forward overflows. The run stops at
    the first non-finite loss or gradient norm with one line and exit status 1; metrics.json (strict JSON) and
    loss.png cover the steps up to it; every checkpoint holds finite weights; no adapter is written."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert _train(files, out, "--lr", "1e30", "--save-every", 1, "--warmup-steps", 0) == 1
    line = _error(capsys)
    m = re.fullmatch(
        r"training diverged at step (\d+): the (loss|gradient norm) is (nan|inf); last good checkpoint "
        r"(step-\d+); try a lower --lr \(or --max-grad-norm\) in a new run",
        line,
    )
    assert m, line
    step = int(m.group(1))
    metrics = _metrics(out)
    assert [r["step"] for r in metrics["steps"]] == list(range(1, step + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in metrics["steps"][:-1])
    assert metrics["steps"][-1]["loss" if m.group(2) == "loss" else "grad_norm"] is None  # JSON null
    assert metrics["diverged"] == {"step": step, "what": f"the {m.group(2)}", "value": m.group(3)}
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert ckpts and ckpts[-1] == m.group(4) and int(ckpts[-1][5:]) == step - 1
    for c in ckpts:
        for name, t in load_file(out / "checkpoints" / c / "adapter_model.safetensors").items():
            assert torch.isfinite(t).all(), (c, name)
    assert not (out / "adapter").exists()


# ------------------------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_says_where_to_continue(files, tmp_path, capsys, monkeypatch):
    import quickloris.train.loop as loop

    lr_at = loop.lr_at

    def interrupted_at_5(step, **kw):
        if step == 5:
            raise KeyboardInterrupt
        return lr_at(step, **kw)

    out = tmp_path / "run"
    monkeypatch.setattr(loop, "lr_at", interrupted_at_5)
    assert _train(files, out, "--max-steps", 9) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "quickloris train: interrupted at step 5; last checkpoint step-000004; continue with --resume"
    assert not any("Traceback" in line for line in err)
    assert len(_metrics(out)["steps"]) == 5  # the reports cover the steps done
    monkeypatch.setattr(loop, "lr_at", lr_at)
    assert _train(files, out, "--max-steps", 9, "--resume") == 0
    assert [r["step"] for r in _metrics(out)["steps"]] == list(range(1, 10))


def test_sigint_to_the_process(files, tmp_path):
    """A real SIGINT to `python -m quickloris train`: exit status 130, the one line, no traceback, no half-written
    checkpoint folder."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-X",
        "faulthandler",  # a fatal signal prints every thread's Python stack: what a hang was waiting on
        "-m",
        "quickloris",
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
        "100000",
        "--save-every",
        "3",
        "--log-every",
        "1",
        "--warmup-steps",
        "0",
    ]
    # The child must start with SIGINT's default action: a shell runs background jobs (`make test &`, nohup) with
    # SIGINT ignored, the child inherits that, and Python then installs no KeyboardInterrupt handler (seen: the run
    # went on to step 729 after the signal).
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        for line in proc.stderr:
            if line.startswith("step 4/"):
                break
        proc.send_signal(signal.SIGINT)
        try:
            _, rest = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            _, rest = proc.communicate(timeout=60)
            pytest.fail(f"still running 120 s after SIGINT; its stacks at SIGABRT:\n{rest[-6000:]}")
    finally:
        proc.kill()
    assert proc.returncode == 130, rest
    assert "Traceback" not in rest
    assert re.search(
        r"^quickloris train: interrupted at step (\d+); last checkpoint step-\d+; continue with --resume$", rest, re.M
    ), rest
    assert all(not p.startswith(".") for p in os.listdir(out / "checkpoints"))


# ------------------------------------------------------------------------------------------- resume


def test_resume_refuses_changed_data_and_lists_what_changed(files, tmp_path, capsys):
    rows = task_rows("reverse", 24)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "run"
    assert _train(files, out, data=data) == 0
    rows[3]["messages"][-1]["content"] += "1"  # one answer changed, same path
    write_jsonl(data, rows)
    assert _train(files, out, "--resume", "--max-steps", 8, data=data) == 2
    line = _error(capsys)
    assert line.startswith("cannot resume from ") and "data.file_sha256: '" in line and "data.tokens_sha256" in line
    assert "data.examples" not in line
    write_jsonl(data, rows[:-1])
    assert _train(files, out, "--resume", "--max-steps", 8, data=data) == 2
    assert "data.examples: 24 -> 23" in _error(capsys)


def _flip_a_bit(path):
    data = bytearray(path.read_bytes())
    i = len(data) - 1 - int(torch.randint(0, 256, ()).item())
    data[i] ^= 1 << int(torch.randint(0, 8, ()).item())
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(files, tmp_path, capsys, seed, damage):
    """Stopped after step 5 (checkpoints 2 and 4), the newest one damaged: --resume says so in one line, continues
    from step 2, and ends with the losses and adapter of a run that never stopped."""
    assert _train(files, tmp_path / "full") == 0

    import quickloris.train.loop as loop

    lr_at = loop.lr_at

    def stop(step, **kw):
        if step == 5:
            raise KeyboardInterrupt
        return lr_at(step, **kw)

    out = tmp_path / "cut"
    loop.lr_at = stop
    try:
        assert _train(files, out) == 130
    finally:
        loop.lr_at = lr_at
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000002", "step-000004"]
    if damage == "flip":
        _flip_a_bit(out / "checkpoints" / "step-000004" / "adapter_model.safetensors")
        why = "adapter_model.safetensors does not match its checksum"
    else:
        state = out / "checkpoints" / "step-000004" / "trainer_state.pt"
        state.write_bytes(state.read_bytes()[:100])
        why = "trainer_state.pt has 100 bytes, the manifest says"
    capsys.readouterr()
    assert _train(files, out, "--resume") == 0
    printed = capsys.readouterr().out
    assert f"checkpoint step-000004 is damaged ({why}" in printed and "resuming from step-000002" in printed
    full, cut = _metrics(tmp_path / "full"), _metrics(out)
    assert [r["loss"] for r in cut["steps"]] == [r["loss"] for r in full["steps"]]
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "full" / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    # every checkpoint damaged: refused in one line
    for c in ("step-000004", "step-000006"):
        _flip_a_bit(out / "checkpoints" / c / "adapter_model.safetensors")
    assert _train(files, out, "--resume", "--max-steps", 8) == 2
    assert re.fullmatch(
        r"no intact checkpoint in .*checkpoints: step-000006: adapter_model\.safetensors does not "
        r"match .*; step-000004: .*",
        _error(capsys),
    )


def test_a_killed_checkpoint_write_is_cleaned_up_at_the_next_start(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(files, out, "--max-steps", 4) == 0
    dead = out / "checkpoints" / ".step-000006.tmp-99999999"  # no such process (beyond any pid_max)
    dead.mkdir()
    (dead / "adapter_model.safetensors").write_bytes(b"half")
    (out / ".metrics.json.abc123.tmp").write_text("{")
    assert _train(files, out, "--resume", "--max-steps", 6) == 0
    printed = capsys.readouterr().out
    assert f"removed {dead} (left by an interrupted write)" in printed
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000004", "step-000006"]
    assert not list(out.glob(".*.tmp"))


def test_resume_with_a_larger_max_steps_extends_the_run(files, tmp_path, capsys):
    """A finished 6-step run extended to 9: steps 1-6 stay as they were, steps 7-9 follow the 9-step schedule (the
    learning rate of step s is lr_at(s, total=9)); a smaller --max-steps than the steps done is refused."""
    from quickloris.train.loop import lr_at

    out = tmp_path / "run"
    assert _train(files, out, "--warmup-steps", 2) == 0
    six = _metrics(out)["steps"]
    capsys.readouterr()
    assert _train(files, out, "--warmup-steps", 2, "--resume", "--max-steps", 9) == 0
    assert (
        "the run now has 9 steps instead of 6: steps 7-9 follow the learning-rate schedule of 9 steps (steps 1-6 "
        "followed the 6-step one)"
    ) in capsys.readouterr().out
    nine = _metrics(out)
    assert nine["total_steps"] == 9 and nine["steps"][:6] == six
    assert [r["lr"] for r in nine["steps"][6:]] == [
        lr_at(s, lr=2e-3, schedule="cosine", warmup=2, total=9) for s in (6, 7, 8)
    ]
    assert _train(files, out, "--warmup-steps", 2, "--resume", "--max-steps", 5) == 2
    assert _error(capsys) == "--max-steps gives 5 steps, fewer than the 9 the resumed run has done already"


@pytest.mark.slow
def test_fsdp_ranks_stop_together_on_divergence(files, tmp_path):
    """`torchrun --nproc-per-node 2 ... --fsdp` on CPU ranks (gloo) with --lr 1e30: both ranks see the same
    all-reduced loss and gradient norm, so both stop at the same step (no rank waits in a collective for one
    that left); rank 0 writes metrics.json up to that step before any rank exits, and prints the one line.
    (~35 s on 2 busy cores: slow)"""
    out = tmp_path / "run"
    # Rank 0's reports take 3 s more here: a rank that exited at once would make torchrun stop rank 0 mid-write.
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(
        "import time\nimport quickloris.train.report as r\n_plot = r.plot_loss\n"
        "def slow(*a, **k):\n    time.sleep(3)\n    return _plot(*a, **k)\nr.plot_loss = slow\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "quickloris",
        "train",
        "--fsdp",
        "--no-mixed-precision",
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
        "6",
        "--lr",
        "1e30",
        "--warmup-steps",
        "0",
        "--log-every",
        "1",
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(
            os.environ,
            OMP_NUM_THREADS="1",
            TRITON_INTERPRET="1",
            PYTHONPATH=os.pathsep.join([str(tmp_path / "hook"), *sys.path]),
        ),
    )
    lines = re.findall(r"quickloris train: error: training diverged at step (\d+): .*", proc.stderr)
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-4000:]
    assert not re.search(r'File ".*quickloris/', proc.stderr)  # no traceback of ours (torchrun prints its own)
    metrics = _metrics(out)
    assert len(metrics["steps"]) == int(lines[0]) and metrics["diverged"]["step"] == int(lines[0])
    assert not (out / "adapter").exists()
