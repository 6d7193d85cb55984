"""How much host memory this process can still take, before the kernel's out-of-memory killer ends it.

Pinned (page-locked) memory cannot be swapped or reclaimed, so a process that pins more than is free is killed
with no message (SIGKILL). Code that pins large buffers (`quickloris.parallel.offload`) asks here first.

* ``/proc/meminfo``: ``MemAvailable`` (free memory plus what the kernel can reclaim without swapping) and
  ``MemTotal``.
* A cgroup v2 limit (``/sys/fs/cgroup/memory.max``, as in a container) caps both: available = limit - usage +
  the group's file cache (``file`` in ``memory.stat``, reclaimable).

Linux only; elsewhere `host_memory` returns None and callers skip their check.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")


class HostMemory(NamedTuple):
    available: int  # bytes this process can still take
    total: int  # bytes it could ever have


def parse_meminfo(text: str) -> HostMemory | None:
    """(MemAvailable, MemTotal) in bytes from /proc/meminfo's text (its values are in kB)."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if key in ("MemAvailable", "MemTotal") and fields and fields[0].isdigit():
            values[key] = int(fields[0]) * 1024
    if len(values) < 2:
        return None
    return HostMemory(values["MemAvailable"], values["MemTotal"])


def cgroup_memory(max_text: str, current_text: str, stat_text: str) -> HostMemory | None:
    """(limit - usage + file cache, limit) of a cgroup v2 group from its memory.max / .current / .stat; None when
    the group has no limit (``max``)."""
    limit = max_text.strip()
    if not limit.isdigit():
        return None
    usage = int(current_text.strip())
    cache = next((int(v) for k, _, v in (ln.partition(" ") for ln in stat_text.splitlines()) if k == "file"), 0)
    return HostMemory(max(0, int(limit) - usage + cache), int(limit))


def host_memory() -> HostMemory | None:
    """What this process can take now (the smaller of the machine's and its cgroup's view); None if unknown."""
    try:
        machine = parse_meminfo(MEMINFO.read_text())
    except OSError:
        return None
    if machine is None:
        return None
    try:
        group = cgroup_memory(*((CGROUP / f).read_text() for f in ("memory.max", "memory.current", "memory.stat")))
    except (OSError, ValueError):
        group = None
    if group is None:
        return machine
    return HostMemory(min(machine.available, group.available), min(machine.total, group.total))
