"""The ``families`` part of `quickloris bench train` on CPU with --tiny (the device code path on toy configs of the
Gemma-3-1B and Phi-3-mini shapes, with their features: Gemma-3's sliding / full layer types, zero-centred (1 + w)
norms and scaled embeddings; Phi-3's fused qkv_proj / gate_up_proj as LoRA targets), a stack or a shape that fails,
bad options, and the real shapes' parameter counts (meta device: no memory).

First-step loss tolerance. Step 1 runs the base model: LoRA B = 0, so every adapter adds exactly 0 in both stacks.
Both stacks read the same NF4 bytes, and bitsandbytes' CPU dequantization gives the fp32 values quickloris' does,
bit for bit (checked here: the premise of the bound); --tiny computes in fp32. What remains is the order of the
floating-point sums (matmul blocking, SDPA's math kernel vs flex's dense path, chunked vs full-logits cross-entropy):
`reorder_tolerance` of the longest sum (the vocabulary) through the sums one logit passes (6 per layer, the head, the
log-sum-exp), relative to the logits' scale Z. A token's loss lse(z) - z_t moves by at most 2 max|dz|, and
Z <= sqrt(hidden) * max_i |e_i| (Cauchy-Schwarz: the final norm's output has L2 norm <= sqrt(hidden), its weight being
the identity, 1 or Gemma's 1 + 0; e_i the head's rows), so |dL| <= 2 * tol * Z. Later steps are not compared this
tightly: Adam divides each gradient entry by its own RMS, so a rounding-size difference of a near-zero entry becomes
an lr-size difference of the update.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

from benchmarks.report.markdown import num  # noqa: E402
from benchmarks.train import bench  # noqa: E402
from benchmarks.train import models as tm  # noqa: E402
from benchmarks.train.families import FAMILY_SHAPES, TINY_BATCH, TINY_SEQ, TINY_STD  # noqa: E402
from quickloris.cli.main import main  # noqa: E402
from tests.helpers import reorder_tolerance, within  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = {
    "gemma3-1b": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3-mini": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    parser.add_argument("--out")
    return parser.parse_args(list(argv))


def _meta_params(architecture: str, config: dict) -> int:
    """Parameters of a ``*ForCausalLM`` of `config`, built on the meta device (a tied head counted once)."""
    import transformers

    cls = getattr(transformers, architecture)
    with torch.device("meta"):
        model = cls(cls.config_class(**config))
    return sum(p.numel() for p in model.parameters())


def _first_step_bound(name: str, seed: int) -> float:
    """2 * reorder tolerance * Z for the tiny base of `name` drawn with `seed` (module docstring); also checks the
    bound's premise: bitsandbytes dequantizes each NF4 weight to quickloris' fp32 values, bit for bit."""
    shape = FAMILY_SHAPES[name]
    base = tm.build_base(
        shape.tiny, device="cpu", architecture=shape.architecture, dtype=torch.float32, seed=seed, std=TINY_STD
    )
    for path, nf4 in base.nf4.items():
        p = nf4.to_bnb()
        theirs = bnb.functional.dequantize_4bit(p.data, p.quant_state)
        assert torch.equal(theirs.view(torch.int32), nf4.dequantize().view(torch.int32)), path
    cfg = base.config
    head = base.dense.get("lm_head.weight", base.dense["model.embed_tokens.weight"])
    z = math.sqrt(cfg.hidden_size) * float(head.norm(dim=1).max())
    longest = max(cfg.vocab_size, cfg.intermediate_size, cfg.hidden_size, TINY_SEQ)
    return 2 * reorder_tolerance(torch.float32, longest, 6 * cfg.num_hidden_layers + 2) * z


def _check_shape_record(name: str, rec: dict, stacks: set[str], steps: int, seed: int) -> None:
    shape = FAMILY_SHAPES[name]
    assert rec["architecture"] == shape.architecture and rec["source"] == shape.source
    assert rec["config"] == shape.tiny and rec["dtype"] == "float32" and rec["seed"] == seed
    assert (rec["batch"], rec["seq"], rec["steps"]) == (TINY_BATCH, TINY_SEQ, steps)
    assert (rec["ql_attention"], rec["hf_attention"]) == ("flex", "sdpa")
    assert rec["lora_targets"] == TARGETS[name]
    assert rec["params"] == _meta_params(shape.architecture, shape.tiny)  # tied head counted once
    runs = rec["runs"]
    assert set(runs) == stacks
    for stack, r in runs.items():
        assert len(r["losses"]) == len(r["step_s"]) == steps and all(math.isfinite(x) for x in r["losses"]), stack
        assert r["tokens_per_step"] == TINY_BATCH * TINY_SEQ and r["tokens_per_s"] > 0 and r["peak_gib"] is None
        # what ran: transformers' SDPA for the HF stacks, quickloris' flex for the ql stacks (each its own config)
        assert r["attention"] == ("sdpa" if stack.startswith("hf") else "quickloris_flex"), stack
        rel = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], runs["hf_eager"]["losses"]))
        assert r["max_rel_loss_diff_vs_hf_eager"] == pytest.approx(rel, rel=1e-12, abs=0), stack
    bound = _first_step_bound(name, seed)
    for stack, r in runs.items():
        within(abs(r["losses"][0] - runs["hf_eager"]["losses"][0]), bound, f"{name} {stack} first-step loss")


def test_tiny_families_part_eager_stacks(tmp_path, capsys, seed):
    args = _args(
        "--tiny",
        "--parts",
        "families",
        "--family-stacks",
        "ql_eager,hf_eager",
        "--family-steps",
        "3",
        "--seed",
        str(seed),
        "--out",
        str(tmp_path),
    )
    assert bench.run(args) == 0
    (path,) = (tmp_path / "train").glob("train-*.json")
    results = json.loads(path.read_text())["results"]
    assert results["parts"] == ["families"] and results["seed"] == seed
    fam = results["families"]
    assert list(fam) == ["gemma3-1b", "phi3-mini"]
    for name, rec in fam.items():
        _check_shape_record(name, rec, {"ql_eager", "hf_eager"}, 3, seed)
    out = capsys.readouterr().out
    assert "gemma3-1b (Gemma3ForCausalLM), 2x64, 3 steps" in out and "=== quickloris bench train: summary ===" in out
    assert out.count("  2x64         ql_eager") == 2  # one summary row per shape
    (report,) = (tmp_path / "reports").glob("train_cpu_*.md")
    text = report.read_text()
    assert "families gemma3-1b 2x64, phi3-mini 2x64" in text and "the four stacks on one shared NF4 base" in text
    for name, rec in fam.items():
        assert (
            f"{name} shape ({rec['architecture']}, config of {rec['source']}, {num(rec['params'])} parameters)" in text
        )
    assert text.count(f"| ql_eager | {num(fam['phi3-mini']['runs']['ql_eager']['tokens_per_s'])} |") == 1


def test_a_failing_stack_or_shape_is_recorded_and_the_rest_run(tmp_path, monkeypatch, capsys, seed):
    real_hf, real_base = tm.hf_stack, tm.build_base

    def hf_stack(base, **kw):
        if kw["compiled"]:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_hf(base, **kw)

    def build_base(shape, **kw):
        if kw["architecture"] == "Gemma3ForCausalLM":
            raise RuntimeError("no Gemma today (simulated)")
        return real_base(shape, **kw)

    monkeypatch.setattr(tm, "hf_stack", hf_stack)
    monkeypatch.setattr(tm, "build_base", build_base)
    args = _args(
        "--tiny",
        "--parts",
        "families",
        "--family-stacks",
        "ql_eager,hf_compiled,hf_eager",
        "--family-steps",
        "3",
        "--seed",
        str(seed),
        "--out",
        str(tmp_path),
    )
    assert bench.run(args) == 1  # something failed: the exit status says so
    fam = json.loads(next((tmp_path / "train").glob("train-*.json")).read_text())["results"]["families"]
    assert fam["gemma3-1b"]["error"] == "RuntimeError: no Gemma today (simulated)" and "runs" not in fam["gemma3-1b"]
    runs = fam["phi3-mini"]["runs"]
    assert runs["hf_compiled"] == {"error": "OutOfMemoryError: CUDA out of memory (simulated)"}
    for stack in ("ql_eager", "hf_eager"):  # the others ran, compared with each other only
        assert len(runs[stack]["losses"]) == 3 and "speedup_vs_hf_compiled" not in runs[stack]
    assert "speedup_vs_hf_eager" in runs["ql_eager"]
    out = capsys.readouterr().out
    assert "gemma3-1b: RuntimeError: no Gemma today (simulated)" in out
    assert "hf_compiled  failed: OutOfMemoryError: CUDA out of memory (simulated)" in out
    text = next((tmp_path / "reports").glob("train_cpu_*.md")).read_text()
    assert "| hf_compiled | failed: OutOfMemoryError: CUDA out of memory (simulated) |" in text
    assert "failed: `RuntimeError: no Gemma today (simulated)`" in text


@pytest.mark.parametrize(
    "argv, says",
    [
        (
            ["--family-shapes", "gemma3-2b"],
            "--family-shapes: unknown shape 'gemma3-2b'; choose from gemma3-1b,phi3-mini",
        ),
        (["--family-shapes", "phi3-mini:2by2048"], "--family-shapes: 'phi3-mini:2by2048': write batch x sequence as "),
        (["--family-shapes", ","], "--family-shapes: name at least one of gemma3-1b,phi3-mini"),
        (["--family-stacks", "ql_eager,unsloth"], "--family-stacks: unknown ['unsloth']"),
        (["--family-steps", "2"], "--family-steps: 2; at least 3"),
    ],
)
def test_bad_family_options_get_one_line(argv, says, capsys):
    # checked before anything is built or CUDA is looked for: the same line on any machine
    assert main(["bench", "train", "--parts", "families", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("quickloris bench: error: ") and says in err, err


def _published_params(name: str) -> int:
    """The released checkpoint's parameter count, from its published config.json (layer by layer, by hand)."""
    if name == "gemma3-1b":  # vocab 262144, hidden 1152, 26 layers, 4 q / 1 kv heads of 256, intermediate 6912, tied
        V, H, L, q, kv, d, inner = 262144, 1152, 26, 4, 1, 256, 6912
        layer = H * q * d + 2 * H * kv * d + q * d * H + 3 * H * inner + 4 * H + 2 * d  # 4 norms, q / k norms
        return V * H + L * layer + H
    if name == "phi3-mini":  # vocab 32064, hidden 3072, 32 layers, 32 / 32 heads, intermediate 8192, untied
        V, H, L, inner = 32064, 3072, 32, 8192
        layer = H * 3 * H + H * H + H * 2 * inner + inner * H + 2 * H  # qkv, o, gate_up, down, 2 norms
        return 2 * V * H + L * layer + H
    raise KeyError(name)


@pytest.mark.parametrize("name", list(FAMILY_SHAPES))
def test_each_shape_has_its_checkpoints_parameter_count(name):
    shape = FAMILY_SHAPES[name]
    assert shape.params == _published_params(name) == _meta_params(shape.architecture, shape.config)


@pytest.mark.slow
def test_tiny_families_part_all_stacks(tmp_path, seed):
    """The compiled stacks too (aot_eager on CPU): quickloris' regional compile without a graph break, and every
    stack's first-step loss within the reorder bound of hf_eager's."""
    args = _args("--tiny", "--parts", "families", "--family-steps", "3", "--seed", str(seed), "--out", str(tmp_path))
    assert bench.run(args) == 0
    fam = json.loads(next((tmp_path / "train").glob("train-*.json")).read_text())["results"]["families"]
    for name, rec in fam.items():
        _check_shape_record(name, rec, {"ql_eager", "ql_compiled", "hf_eager", "hf_compiled"}, 3, seed)
        runs = rec["runs"]
        assert runs["ql_compiled"]["compile"]["graph_breaks"] == 0, name
        assert runs["hf_compiled"]["compile"]["unique_graphs"] >= 1 and runs["ql_eager"]["compile"] is None
