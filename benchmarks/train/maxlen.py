"""The ``maxlen`` part of `quickloris bench train`: the longest 1 x S that trains one optimizer step, per stack."""

from __future__ import annotations

from typing import Any

from benchmarks.train.stacks import build_stack
from benchmarks.train.unsloth_stack import run_unsloth


def longest_fitting(fits, start: int, cap: int, resolution: int) -> tuple[int, int | None]:
    """(longest length that fits, first length that did not or None): doubling from `start` up to `cap`,
    then bisecting the gap down to `resolution` (multiples of it)."""
    good, bad, seq = 0, None, start
    while seq <= cap:
        if not fits(seq):
            bad = seq
            break
        good, seq = seq, seq * 2
    while bad is not None and bad - good > resolution:
        mid = (good + bad) // 2 // resolution * resolution
        if mid <= good:
            break
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good, bad


def probe_longest(
    tm, model, opt, label: str, vocab: int, device: str, maxlen, before=None, progress=None
) -> dict[str, Any]:
    """`longest_fitting` over `tm.one_step` trials of `model` (one per length, `maxlen` = (start, cap, resolution,
    steps)); `before(seq)` runs ahead of each trial (Unsloth's sequence-length setting). Each trial records the
    seconds of every step: with steps >= 2 the last is a step at that length without compiling or pool growth.
    `progress(trials, running)` is called before each trial (`running` = its length) and after the last (None):
    a process the host kills mid-trial (its OOM killer: no exception to catch) has then left its finished trials
    and the length that killed it (`killed_record`)."""
    start, cap, resolution, steps = maxlen
    trials: list[dict[str, Any]] = []

    def fits(seq: int) -> bool:
        if before is not None:
            before(seq)
        if progress is not None:
            progress(trials, seq)
        ok, peak, note, times = tm.one_step(model, opt, seq, vocab, device=device, steps=steps)
        step_s = times[-1] if times else None
        trials.append({"seq": seq, "fits": ok, "peak_gib": peak, "step_s": step_s, "steps_s": times, "note": note})
        print(f"  {label:12s} 1x{seq}: {'ok' if ok else 'OOM'} {note}" + (f", peak {peak:.1f} GiB" if peak else ""))
        return ok

    good, bad = longest_fitting(fits, start, cap, resolution)
    if progress is not None:
        progress(trials, None)
    return {"longest": good, "first_oom": bad, "capped": bad is None, "cap": cap, "steps": steps, "trials": trials}


def killed_record(progress: dict[str, Any], maxlen, returncode: int) -> dict[str, Any]:
    """The probe's record from its last `progress` (``{"trials": [...], "running": seq}``) when its process died in
    the trial of length ``running``: that length counts as not fitting, the probe stopped there (a bisection may
    have been left unfinished)."""
    trials = list(progress["trials"])
    seq = progress["running"]
    note = f"process killed (exit {returncode}) during this trial: the host's OOM killer, most likely"
    trials.append({"seq": seq, "fits": False, "peak_gib": None, "step_s": None, "steps_s": [], "note": note})
    good = max((t["seq"] for t in trials if t["fits"]), default=0)
    return {"longest": good, "first_oom": seq, "capped": False, "cap": maxlen[1], "steps": maxlen[3], "trials": trials}


def part_maxlen(tm, base, env, args, vocab: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if env["device"].startswith("cuda"):
        tm.cap_gpu_memory(args.maxlen_gpu_gib)
    for stack in args.maxlen_stacks:
        if stack == "unsloth":
            res = run_unsloth(base, env, args, maxlen=env["maxlen"])
            out[stack] = res.get("maxlen", res) | {"cap": env["maxlen"][1], "versions": res.get("versions")}
        else:
            import torch

            model = build_stack(tm, stack, base, env, args, None)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
            out[stack] = probe_longest(tm, model, opt, stack, vocab, env["device"], env["maxlen"])
            del model
        out[stack]["gpu_gib_cap"] = args.maxlen_gpu_gib
        tm.release(env["device"])
    return out
