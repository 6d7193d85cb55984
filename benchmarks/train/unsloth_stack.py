"""The ``unsloth`` stack of `quickloris bench train`: Unsloth itself, in a process of its own, on the same base.

Unsloth patches transformers (and more) when imported, so it never shares a process with the other stacks: the
parent writes the shared base as a checkpoint (the NF4 weights dequantized to bf16 - re-quantizing them gives the
same 4-bit codes; only the block scales may differ in their last bf16 bit), then runs this module as a script
under ``PYTHONPATH=$QUICKLORIS_UNSLOTH_SITE`` (the folder `scripts/device/run.sh` installs Unsloth's wheels
into: it pins versions of trl and datasets the other stacks must not see). The child loads the checkpoint with
``FastLanguageModel.from_pretrained(load_in_4bit=True)`` (NF4, double quant, as the other stacks), adds LoRA
r=16 alpha=32 on the same seven projections with ``use_gradient_checkpointing="unsloth"`` (its offloaded
checkpointing) and runs the same timed loop (`benchmarks.train.models.train_run` on `make_batches` with the same
seed) or the same longest-context probe (`one_step`), then writes JSON. Unsloth's LoRA init is its own (PEFT's:
B = 0), so its losses start where the others' do but are not the same trajectory.

While the child runs, the parent's base waits on the CPU: its weights would otherwise sit in the GPU memory the
child measures its longest context against.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SITE_ENV = "QUICKLORIS_UNSLOTH_SITE"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROOT = Path(__file__).resolve().parents[2]


def save_checkpoint(base, directory: Path) -> Path:
    """`base` (a `benchmarks.train.models.SharedBase`) as a transformers checkpoint in `directory`: config.json and
    one bf16 safetensors file, written tensor by tensor from the device (an 8B base is 16 GB in bf16)."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = base.config
    config.architectures = [base.architecture]
    config.torch_dtype = "bfloat16"
    config.save_pretrained(directory)
    tensors: dict[str, torch.Tensor] = {}
    for name, w in base.nf4.items():
        tensors[name + ".weight"] = w.dequantize(torch.bfloat16).cpu()
    for name, t in base.dense.items():
        tensors[name] = t.to(torch.bfloat16).cpu()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    _save_tokenizer(config.vocab_size, directory)
    return directory


def _save_tokenizer(vocab_size: int, directory: Path) -> None:
    """A word-level fast tokenizer over the model's vocabulary (token i is "t<i>"): Unsloth's loader insists on
    loading a tokenizer from the checkpoint; the benchmark feeds token ids and never uses it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", eos_token="t1", bos_token="t2")
    fast.save_pretrained(directory)


def _move_base(base, device: str) -> None:
    base.nf4 = {k: v.to(device) for k, v in base.nf4.items()}
    base.dense = {k: v.to(device) for k, v in base.dense.items()}


def unsloth_missing() -> str | None:
    """Why Unsloth cannot run here, or None."""
    site = os.environ.get(SITE_ENV)
    if not site or not Path(site).is_dir():
        return f"Unsloth is not installed: set {SITE_ENV} to the folder its wheels went into (run.sh does)"
    return None


def run_child(module: str, job: dict[str, Any], tmp: Path, *, timeout: float) -> dict[str, Any]:
    """Run `module` as ``python -m module job.json out.json`` in `tmp` with Unsloth's site first on its path (and
    the repository's src/ and root after it); its JSON result, or ``{"error": ...}``. The vision bench's Unsloth
    stack (`benchmarks.vision.unsloth_stack`) runs through this too."""
    if missing := unsloth_missing():
        return {"error": missing}
    site = os.environ[SITE_ENV]
    (tmp / "job.json").write_text(json.dumps(job))
    child_env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([site, str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        HF_HUB_OFFLINE="1",
        UNSLOTH_DISABLE_STATISTICS="1",
        UNSLOTH_COMPILE_LOCATION=str(tmp / "unsloth_compiled"),
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-m", module, str(tmp / "job.json"), str(tmp / "out.json")],
            env=child_env,
            cwd=tmp,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        return {"error": f"the Unsloth process ran past {e.timeout} s"}
    out_file = tmp / "out.json"
    if out_file.exists():
        return json.loads(out_file.read_text())
    return {
        "error": f"the Unsloth process exited with {proc.returncode} and wrote no result",
        "returncode": proc.returncode,
    }


def run_unsloth(base, env: dict[str, Any], args, *, plan: list[tuple[list[int], int]] | None = None, maxlen=None):
    """Parent side. `plan`: [(lengths, batch)] timed runs -> {"BxS": run}; `maxlen`: (start, cap, resolution, steps) ->
    the probe's record. A missing Unsloth site or a failing child gives ``{"error": ...}`` (the other stacks'
    numbers stay)."""
    if missing := unsloth_missing():
        return {"error": missing}
    from benchmarks.train import models as tm

    with tempfile.TemporaryDirectory(prefix="ql-unsloth-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        save_checkpoint(base, tmp / "ckpt")
        _move_base(base, "cpu")
        tm.release(env["device"])
        job = {
            "checkpoint": str(tmp / "ckpt"),
            "plan": plan,
            "maxlen": maxlen,
            "steps": args.steps,
            "seed": args.seed,
            "lr": args.lr,
            "vocab": base.config.vocab_size,
            "gpu_gib": getattr(args, "maxlen_gpu_gib", None) if maxlen else None,
            "save_s": round(time.perf_counter() - t0, 1),
            "progress": str(tmp / PROGRESS),
        }
        try:
            out = run_child("benchmarks.train.unsloth_stack", job, tmp, timeout=getattr(args, "unsloth_timeout", 1800))
            return _with_killed_probe(out, tmp / PROGRESS, maxlen)
        finally:
            _move_base(base, env["device"])


PROGRESS = "maxlen-progress.json"  # the child's probe, rewritten before each trial (`maxlen.probe_longest`)


def progress_writer(path: Path, versions: dict[str, str]):
    """The child's `probe_longest` progress callback: the trials so far and the length now running, written
    atomically to `path` (the parent reads it if the child is killed)."""
    from quickloris.utils.atomic import atomic_write_json

    def progress(trials: list[dict[str, Any]], running: int | None) -> None:
        atomic_write_json(path, {"trials": trials, "running": running, "versions": versions})

    return progress


def _with_killed_probe(out: dict[str, Any], progress_file: Path, maxlen) -> dict[str, Any]:
    """A child killed by a signal (the host's OOM killer: exit -9) inside a maxlen trial wrote no result, but its
    progress file names the trials it finished and the length it died at: `out` gains that probe record
    (`maxlen.killed_record`), its error kept. Any other failure (an exception the child reported, a timeout) is
    no verdict on the length and stays as it was."""
    code = out.get("returncode")
    if "error" not in out or not maxlen or not isinstance(code, int) or code >= 0:
        return out
    from benchmarks.train.maxlen import killed_record

    try:
        progress = json.loads(progress_file.read_text())
    except (OSError, ValueError):
        return out
    if progress.get("running") is None:
        return out
    return out | {"maxlen": killed_record(progress, maxlen, code), "versions": progress.get("versions")}


def _child(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    import unsloth  # noqa: F401 - first, so that its patches apply to what follows (as its users do)
    from unsloth import FastLanguageModel

    from benchmarks.train import models as tm

    t0 = time.perf_counter()
    longest = max([s for seqs, _ in job["plan"] or [] for s in seqs] + [(job["maxlen"] or [0, 0])[1]])
    model, _tok = FastLanguageModel.from_pretrained(
        job["checkpoint"], load_in_4bit=True, dtype=torch.bfloat16, max_seq_length=longest
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=32,
        lora_dropout=0,
        bias="none",
        target_modules=TARGETS,
        use_gradient_checkpointing="unsloth",
        random_state=job["seed"],
    )
    model.train()
    build_s = time.perf_counter() - t0
    versions = {"unsloth": unsloth.__version__}
    try:
        import unsloth_zoo

        versions["unsloth_zoo"] = unsloth_zoo.__version__
    except Exception:  # noqa: BLE001 - a version is informative only
        pass
    out: dict[str, Any] = {"versions": versions, "build_s": build_s, "save_s": job["save_s"]}
    for seqs, batch in job["plan"] or []:
        for seq in seqs:
            key = f"{batch}x{seq}"
            try:
                batches = tm.make_batches(job["steps"], batch, seq, job["vocab"], seed=job["seed"] + 1)
                run = tm.train_run(model, batches, device="cuda", lr=job["lr"])
                run.update(build_s=build_s, compile=None, attention=getattr(model.config, "_attn_implementation", None))
                out[key] = run
                print(
                    f"  unsloth      {key}: {run['tokens_per_s']:,.0f} tok/s, peak {run['peak_gib']:.2f} GiB, "
                    f"first step {run['first_step_s']:.1f} s",
                    flush=True,
                )
            except Exception as e:  # noqa: BLE001 - recorded; the next length still runs
                out[key] = {"error": f"{type(e).__name__}: {e}"}
            tm.release("cuda")
    if job["maxlen"]:
        from benchmarks.train.maxlen import probe_longest

        tm.cap_gpu_memory(job.get("gpu_gib"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=job["lr"])

        def before(seq: int) -> None:
            model.max_seq_length = seq  # Unsloth truncates longer inputs otherwise

        progress = progress_writer(Path(job["progress"]), versions) if job.get("progress") else None
        out["maxlen"] = probe_longest(tm, model, opt, "unsloth", job["vocab"], "cuda", job["maxlen"], before, progress)
    return out


def child_main(child, argv: list[str] | None = None) -> int:
    """A child process's entry (``python -m MODULE job.json out.json``): `child`(job) written as JSON, or its error."""
    parser = argparse.ArgumentParser(description="an Unsloth stack's process (benchmarks.train.unsloth_stack)")
    parser.add_argument("job", type=Path)
    parser.add_argument("out", type=Path)
    ns = parser.parse_args(argv)
    try:
        result = child(json.loads(ns.job.read_text()))
    except Exception as e:  # noqa: BLE001 - the parent records the error, the bench goes on
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    ns.out.write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(child_main(_child))
