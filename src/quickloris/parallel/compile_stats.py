"""What compiling cost: dynamo's process-wide counters (graphs, graph breaks, trace restarts) and its timers, summed
by phase (`compile_seconds`: where a first, compiling step's time goes). Re-exported by
`quickloris.parallel.compile`."""

from __future__ import annotations


def compile_stats() -> dict[str, int]:
    """Dynamo's process-wide counters: graphs compiled, graph breaks, frames captured, and trace restarts (a frame
    whose analysis dynamo threw away and began again: each costs a whole second trace)."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    return {
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "calls_captured": int(counters["stats"]["calls_captured"]),
        "trace_restarts": sum(len(v) for k, v in compilation_time_metrics.items() if _is_retry(k)),
    }


def _is_retry(metric: str) -> bool:
    """dynamo times each trace attempt as ``compile_attempt_<n>``; n >= 1 is a restart."""
    head, _, n = metric.rpartition("_")
    return head == "compile_attempt" and n.isdigit() and int(n) >= 1


# Where a first (compiling) step's time goes: dynamo's own timers (torch._dynamo.utils.compilation_time_metrics,
# seconds per call of each timed function), summed. The phases nest: `total` holds the others.
_PHASES = {
    "total": ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler"),  # forward frames + lazy backwards
    "dynamo_trace": ("bytecode_tracing",),
    "forward_backend": ("OutputGraph.call_user_compiler",),  # AOTAutograd + inductor, forward graphs
    "backward_backend": ("compile_fx.<locals>.bw_compiler",),  # compiled at the first backward
    "inductor_codegen": ("GraphLowering.codegen",),
    "kernel_compile_wait": ("async_compile.wait",),  # waiting on the Triton / C++ compile workers
}


def compile_seconds() -> dict[str, float]:
    """Seconds spent compiling since `reset_compile_stats`, by phase (`_PHASES`; names of torch's internal timers,
    0 where a torch version has no such timer)."""
    from torch._dynamo.utils import compilation_time_metrics

    return {
        phase: round(sum(sum(compilation_time_metrics.get(k, ())) for k in keys), 3) for phase, keys in _PHASES.items()
    }


def reset_compile_stats() -> None:
    from torch._dynamo.utils import compilation_time_metrics, counters

    counters.clear()
    compilation_time_metrics.clear()
