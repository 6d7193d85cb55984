"""Run a function on N CPU ranks (gloo) inside a test: spawned processes, a free local port, a hard time limit.

`run_ranks(fn, 2, *args)` calls ``fn(ctx, *args)`` on each rank with ``ctx`` the
`quickloris.parallel.fsdp.DistContext` of that rank; an exception (a failed assert) in any rank fails the test
with that rank's traceback. `fn` must be a module-level function (spawned processes import it by name).
"""

from __future__ import annotations

import faulthandler
import os
import sys
import time

import torch
import torch.multiprocessing as mp


def _entry(rank: int, fn, world_size: int, port: int, device: str, args: tuple) -> None:
    # A rank that dies by a signal prints every thread's Python stack, and torch's C++ stack, to the captured stderr.
    faulthandler.enable(all_threads=True)
    torch._C._set_print_stack_traces_on_fatal_signal(True)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        torch.set_num_threads(1)  # two ranks share the CI machine's two cores
    import torch.distributed as dist

    from quickloris.parallel.fsdp import init_distributed

    ctx = init_distributed(device, timeout_s=120)
    try:
        fn(ctx, *args)
        dist.barrier()  # as `quickloris train` does: no rank tears the group down while another still runs
    finally:
        dist.destroy_process_group()
    # A rank that passed leaves without the interpreter's teardown: the two aborts seen here (SIGABRT, "terminate
    # called without an active exception", no Python frame left: in test_two_ranks_bf16_offload_checkpointing_compile
    # and in CI in test_two_ranks_match_one_process_and_save_adapters) came after the rank's work had passed, from
    # that teardown. Once DTensor collectives have run, the gloo group's worker threads outlive
    # destroy_process_group and a gc (after plain collectives they end), so they meet the finalizing interpreter
    # (pytorch/pytorch#179291 describes that abort). What a test checks is done by now; a rank that raised exits
    # through spawn, which reports its traceback. The real exit path is tested under torchrun (test_fsdp_train_cli).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world_size: int, *args, timeout: float = 150.0, device: str = "cpu") -> None:
    """``fn(ctx, *args)`` on `world_size` ranks (gloo on the CPU, NCCL on GPUs with ``device="cuda"``: rank r on
    cuda:r); raises what a rank raised, or TimeoutError."""
    from quickloris.parallel.fsdp import free_port

    ctx = mp.start_processes(
        _entry, args=(fn, world_size, free_port(), device, args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{world_size} ranks did not finish within {timeout:.0f} s")
