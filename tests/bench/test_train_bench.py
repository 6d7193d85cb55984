"""`quickloris bench train` on CPU with --tiny (the device code path at toy size; nothing here is a measurement):
both stacks share the NF4 bytes and the LoRA init, so their per-step losses agree; compile counts and the
summary table come out; without CUDA (and without --tiny) it says so."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from benchmarks.report.markdown import num  # noqa: E402
from benchmarks.train import bench  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    parser.add_argument("--out")
    return parser.parse_args(list(argv))


def test_tiny_run_of_1b_and_counts_parts(tmp_path, capsys):
    args = _args(
        "--tiny",
        "--parts",
        "1b,counts",
        "--steps",
        "3",
        "--counts-steps",
        "5",
        "--stacks",
        "ql_eager,ql_compiled,hf_eager",
        "--in-graph-1b",
        "linears",
        "--out",
        str(tmp_path),
    )
    assert bench.run(args) == 0
    files = list((tmp_path / "train").glob("train-*.json"))
    assert len(files) == 1
    res = json.loads(files[0].read_text())["results"]
    runs = res["1b"]["2x64"]
    assert set(runs) == {"ql_eager", "ql_compiled", "hf_eager"}
    for name, r in runs.items():
        assert len(r["losses"]) == 3 and r["tokens_per_s"] > 0
        # same NF4 bytes, same LoRA init, fp32 on CPU: the stacks train the same model
        assert r["max_rel_loss_diff_vs_hf_eager"] < 1e-3, name
    assert runs["ql_compiled"]["compile"]["graph_breaks"] == 0
    assert res["compile_mode"] is None
    counts = res["counts"]
    assert res["in_graph_1b"] == counts["checkpoint_in_graph"] == "linears" and res["in_graph_8b"] is None
    assert counts["steps"] == 5 and counts["compile"]["graph_breaks"] == 0 and counts["compile"]["unique_graphs"] <= 8
    assert counts["max_rel_loss_diff_vs_eager"] < 1e-4
    out = capsys.readouterr().out
    assert "=== quickloris bench train: summary ===" in out and "compile counts, 5 steps" in out
    # the month's readable report, next to the results (--out DIR: DIR/reports/), from the same record
    (report,) = (tmp_path / "reports").glob("train_cpu_*.md")
    text = report.read_text()
    assert f"wrote {report}" in out and f"## {files[0].name}" in text and "### Protocol" in text
    assert f"| ql_compiled | {num(runs['ql_compiled']['tokens_per_s'])} |" in text


def test_a_failing_stack_keeps_the_others_numbers_and_fails_the_run(tmp_path, capsys):
    """In the 1b part a stack that raises (here ql_offload: checkpoint offload on a CPU model is a ConfigError) is
    recorded as its error, the other stacks (a baseline too) still run, and the run's exit status is 1."""
    args = _args("--tiny", "--parts", "1b", "--steps", "3", "--stacks", "ql_offload,ql_eager", "--out", str(tmp_path))
    assert bench.run(args) == 1
    (path,) = (tmp_path / "train").glob("train-*.json")
    runs = json.loads(path.read_text())["results"]["1b"]["2x64"]
    assert "CPU" in runs["ql_offload"]["error"]
    assert runs["ql_eager"]["tokens_per_s"] > 0 and len(runs["ql_eager"]["losses"]) == 3
    assert "ql_offload   failed:" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_run_of_8b_and_maxlen_parts(tmp_path):
    args = _args(
        "--tiny",
        "--parts",
        "8b,maxlen",
        "--steps",
        "3",
        "--mlp-chunks",
        "3",
        "--maxlen-steps",
        "2",
        "--out",
        str(tmp_path),
    )
    assert bench.run(args) == 0
    res = json.loads(next((tmp_path / "train").glob("train-*.json")).read_text())["results"]
    assert res["mlp_chunks"] == 3
    assert set(res["8b"]) == {"1x48", "1x96"} and set(res["8b"]["1x96"]) == {"ql_compiled", "hf_eager"}
    assert res["maxlen"]["ql_compiled"]["longest"] >= 32
    trial = res["maxlen"]["ql_compiled"]["trials"][0]
    assert len(trial["steps_s"]) == 2 and trial["step_s"] == trial["steps_s"][-1]
    # every stack is probed; Unsloth (its own process, CUDA only) records why it did not run
    assert set(res["maxlen"]) == {"ql_compiled", "ql_eager", "hf_eager", "hf_compiled", "unsloth"}
    assert "QUICKLORIS_UNSLOTH_SITE" in res["maxlen"]["unsloth"]["error"]


def test_without_cuda_and_bad_options(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert bench.run(_args("--parts", "1b")) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--parts"):
        bench.run(_args("--parts", "2b"))
    with pytest.raises(ValueError, match="--stacks"):
        bench.run(_args("--stacks", "hf_eager,unslot"))
    with pytest.raises(ValueError, match="--stacks"):
        bench.run(_args("--stacks-8b", "ql"))
    with pytest.raises(ValueError, match="--maxlen-steps: 0"):
        bench.run(_args("--maxlen-steps", "0"))


def test_probe_longest_records_every_steps_seconds_and_calls_before():
    """The maxlen probe shared by every stack (Unsloth's child included): each trial runs `steps` steps and
    records their seconds, the last as the trial's step time; `before` sees each length first."""
    from benchmarks.train.maxlen import probe_longest

    calls, seen = [], []

    class FakeModels:
        @staticmethod
        def one_step(model, opt, seq, vocab, *, device, steps):
            calls.append((seq, steps))
            fits = seq <= 100
            return fits, (seq / 1000 if fits else None), "note", [2.0, 1.0][:steps] if fits else []

    res = probe_longest(FakeModels, None, None, "x", 7, "cpu", (32, 256, 16, 2), before=seen.append)
    assert (res["longest"], res["first_oom"], res["steps"]) == (96, 112, 2)
    assert [seq for seq, _ in calls] == seen == [32, 64, 128, 96, 112] and {n for _, n in calls} == {2}
    ok = res["trials"][0]
    assert ok["steps_s"] == [2.0, 1.0] and ok["step_s"] == 1.0 and ok["peak_gib"] == 0.032
    assert res["trials"][2]["step_s"] is None and not res["trials"][2]["fits"]


def test_a_probe_killed_mid_trial_keeps_its_finished_trials(tmp_path):
    """The host's OOM killer ends a process with no exception (Unsloth's child at 1 x 327,680 on an H100 host):
    the probe's progress, written before each trial, still gives the trials that finished and counts the length it
    died at as not fitting; a child that finished, or failed outside a trial, is left as it was."""
    from benchmarks.train import unsloth_stack
    from benchmarks.train.maxlen import probe_longest

    records = []

    class KilledAt128:
        @staticmethod
        def one_step(model, opt, seq, vocab, *, device, steps):
            if seq == 128:
                raise SystemExit  # stands in for the kill: nothing after this runs in the process
            return True, seq / 1000, "note", [1.0]

    f = tmp_path / unsloth_stack.PROGRESS
    write = unsloth_stack.progress_writer(f, {"unsloth": "x"})  # what the child passes to the probe

    def progress(trials, running):
        write(trials, running)
        records.append(json.loads(f.read_text()))

    maxlen = (32, 256, 16, 1)
    with pytest.raises(SystemExit):
        probe_longest(KilledAt128, None, None, "x", 7, "cpu", maxlen, progress=progress)
    assert [r["running"] for r in records] == [32, 64, 128]
    assert [len(r["trials"]) for r in records] == [0, 1, 2]
    error = {"error": "the Unsloth process exited with -9 and wrote no result", "returncode": -9}
    res = unsloth_stack._with_killed_probe(error, f, maxlen)
    rec = res["maxlen"]
    assert res["error"] == error["error"] and res["versions"] == {"unsloth": "x"}
    assert (rec["longest"], rec["first_oom"], rec["capped"], rec["cap"], rec["steps"]) == (64, 128, False, 256, 1)
    assert [(t["seq"], t["fits"]) for t in rec["trials"]] == [(32, True), (64, True), (128, False)]
    assert "killed (exit -9)" in rec["trials"][-1]["note"]

    # a failure the child reported (an exception: out.json written) or a timeout is no verdict on the length
    reported = {"error": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    assert unsloth_stack._with_killed_probe(reported, f, maxlen) == reported
    timeout = {"error": "the Unsloth process ran past 1800 s"}
    assert unsloth_stack._with_killed_probe(timeout, f, maxlen) == timeout
    failed = {"error": "the Unsloth process exited with 1 and wrote no result", "returncode": 1}
    assert unsloth_stack._with_killed_probe(failed, f, maxlen) == failed
    f.write_text('{"trials": [')  # unreadable: the error stays
    assert unsloth_stack._with_killed_probe(error, f, maxlen) == error
    f.write_text(json.dumps(records[-1]))

    # a finished probe says so last (running None): an error after it is not a killed trial
    done = []
    probe_longest(KilledAt128, None, None, "x", 7, "cpu", (32, 64, 16, 1), progress=lambda t, r: done.append(r))
    assert done == [32, 64, None]
    f.write_text(json.dumps({"trials": [], "running": None}))
    assert unsloth_stack._with_killed_probe(error, f, maxlen) == error
    assert unsloth_stack._with_killed_probe({"maxlen": {}}, f, maxlen) == {"maxlen": {}}  # no error: as it was
    assert unsloth_stack._with_killed_probe(error, tmp_path / "none.json", maxlen) == error  # no progress file


def test_longest_fitting_doubles_then_bisects():
    tried = []

    def fits(n):
        tried.append(n)
        return n <= 50000

    assert bench.longest_fitting(fits, 8192, 131072, 4096) == (49152, 53248)
    assert tried == [8192, 16384, 32768, 65536, 49152, 57344, 53248]
    assert bench.longest_fitting(lambda n: True, 8192, 131072, 4096) == (131072, None)
    assert bench.longest_fitting(lambda n: False, 8192, 131072, 4096) == (0, 4096)  # searches below start too


def test_options_from_the_environment(monkeypatch):
    monkeypatch.setenv("QUICKLORIS_BENCH_TRAIN_ARGS", "--parts maxlen --maxlen-cap 65536 --quick")
    args = _args()
    assert args.parts == "maxlen" and args.maxlen_cap == 65536 and args.quick and args.steps == 8
    assert _args("--parts", "1b").parts == "1b"  # the command line still wins
    assert _args("--in-graph-8b", "--skip-last-8b", "2").in_graph_8b == ""  # in-graph, keeping only the inputs
    monkeypatch.setenv("QUICKLORIS_BENCH_TRAIN_ARGS", "--partz 1b")
    with pytest.raises(ValueError, match="unknown options"):
        _args()


def test_host_issue_time_stops_before_waiting_on_the_device(monkeypatch):
    """``host_issue_s`` ends before the step waits on the device: a 50 ms wait in the synchronisation counts in
    ``step_s`` and not in it."""
    import time

    from benchmarks.train import models as tm

    base = tm.build_base(tm.TINY, device="cpu", seed=0)
    model = tm.ql_stack(base, device="cpu", compiled=False)
    monkeypatch.setattr(tm, "_sync", lambda device: time.sleep(0.05))
    run = tm.train_run(model, tm.make_batches(3, 2, 16, tm.TINY["vocab_size"]), device="cpu")
    assert len(run["host_issue_s"]) == 3
    for h, t in zip(run["host_issue_s"], run["step_s"]):
        assert 0 < h and t - h >= 0.05


def test_compile_mode_reaches_the_ql_stacks_regions(seed):
    """``--compile-mode`` is the regions' torch.compile mode (CompileConfig.mode) of the ql stacks it builds."""
    from benchmarks.train import models as tm
    from benchmarks.train.stacks import build_stack
    from quickloris.parallel.compile import compile_config

    base = tm.build_base(tm.TINY, device="cpu", seed=seed)
    env = {"device": "cpu", "backend": "inductor"}
    with pytest.raises(SystemExit):  # argparse: one line naming --compile-mode and its choices
        _args("--compile-mode", "reduce_overhead")
    for mode in (None, "reduce-overhead"):
        args = _args("--tiny", *(["--compile-mode", mode] if mode else []))
        model = build_stack(tm, "ql_compiled", base, env, args, None)
        assert compile_config(model).mode == mode


@pytest.mark.parametrize("mode, resets", [(None, 0), ("max-autotune-no-cudagraphs", 0), ("reduce-overhead", 2)])
def test_cuda_graph_modes_give_each_stack_a_fresh_graph_tree(monkeypatch, mode, resets):
    """With a mode that replays CUDA graphs each ql stack starts from ``torch._dynamo.reset()`` (the last stack's
    graph tree would hold its memory pool, counted in this stack's peak, and re-record under its parameters);
    other modes keep the compiled code between stacks."""
    from benchmarks.train import stacks

    calls = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: calls.append("reset"))
    monkeypatch.setattr(stacks, "build_stack", lambda *a, **k: calls.append(f"build {a[1]}") or torch.nn.Linear(1, 1))

    class Tm:
        lora_init_of = staticmethod(lambda model: {})
        release = staticmethod(lambda device: None)
        make_batches = staticmethod(lambda *a, **k: [])

        @staticmethod
        def train_run(model, batches, **k):
            return {"tokens_per_s": 1.0, "peak_gib": None, "first_step_s": 0.0, "losses": [1.0]}

    model_config = type("C", (), {"_attn_implementation": "sdpa"})
    monkeypatch.setattr(torch.nn.Linear, "config", model_config, raising=False)
    args = _args("--tiny", *(["--compile-mode", mode] if mode else []))
    plan = [("ql_compiled", [8], 1), ("ql_offload", [8], 1)]
    stacks.stack_runs(Tm, None, {"device": "cpu"}, args, plan, vocab=8)
    assert calls.count("reset") == resets
    if resets:
        assert calls == ["reset", "build ql_compiled", "reset", "build ql_offload"]


def test_unsloth_checkpoint_is_the_shared_base(tmp_path, seed):
    """The checkpoint Unsloth's process loads holds the shared base: transformers reads back exactly the
    dequantized NF4 weights and the dense tensors (bf16 both ways: nothing to round)."""
    import transformers

    from benchmarks.train import models as tm
    from benchmarks.train.unsloth_stack import save_checkpoint

    base = tm.build_base(tm.TINY, device="cpu", seed=seed)
    save_checkpoint(base, tmp_path / "ckpt")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    state = model.state_dict()
    for name, w in base.nf4.items():
        assert torch.equal(state[name + ".weight"], w.dequantize(torch.bfloat16)), name
    for name, t in base.dense.items():
        assert torch.equal(state[name], t), name
    assert type(model).__name__ == base.architecture
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ckpt")  # Unsloth's loader needs one
    assert len(tok) == tm.TINY["vocab_size"] and tok.convert_tokens_to_ids("t7") == 7


def test_compare_gives_ratios_against_unsloth_without_an_hf_stack():
    """A run of only quickloris and Unsloth (the usual device run) still records each stack's ratios to Unsloth;
    the loss comparison needs hf_eager and is left out without it."""
    from benchmarks.train.stacks import _compare

    runs = {
        "ql_offload": {"tokens_per_s": 9810.0, "peak_gib": 7.47, "losses": [1.0]},
        "unsloth": {"tokens_per_s": 9372.0, "peak_gib": 8.04, "losses": [1.0]},
        "ql_eager": {"error": "out of memory"},
    }
    _compare(runs)
    assert runs["ql_offload"]["speedup_vs_unsloth"] == 9810.0 / 9372.0
    assert runs["ql_offload"]["memory_vs_unsloth"] == 7.47 / 8.04
    assert "speedup_vs_unsloth" not in runs["unsloth"] and "max_rel_loss_diff_vs_hf_eager" not in runs["ql_offload"]
    assert runs["ql_eager"] == {"error": "out of memory"}


def test_idle_gaps_are_the_union_of_kernel_spans_complement():
    """Overlapping kernels (two streams) leave no gap; uncovered stretches are summed and named by their
    neighbours; a kernel inside a longer one does not end the busy stretch early."""
    from benchmarks.train.probe_speed import idle_gaps

    spans = [
        (0.0, 10.0, "a"),
        (5.0, 8.0, "inner"),  # inside a: the busy stretch still ends at 10
        (40.0, 50.0, "b"),  # 30 us idle after a
        (45.0, 60.0, "c"),  # overlaps b
        (61.0, 70.0, "d"),  # 1 us idle after c
    ]
    res = idle_gaps(list(reversed(spans)))  # any order
    assert res["idle_us"] == 31.0
    assert res["gaps"] == 2 and res["gaps_over_20us"] == 1 and res["idle_in_gaps_over_20us"] == 30.0
    assert res["longest"][0] == {"us": 30.0, "after": "a", "before": "b"}
    assert res["longest"][1] == {"us": 1.0, "after": "c", "before": "d"}
    assert idle_gaps([]) == {
        "idle_us": 0.0,
        "gaps": 0,
        "gaps_over_20us": 0,
        "idle_in_gaps_over_20us": 0.0,
        "longest": [],
    }
