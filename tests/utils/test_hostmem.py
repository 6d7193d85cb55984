"""`quickloris.utils.hostmem`: free host memory from /proc/meminfo and a cgroup v2 limit."""

from __future__ import annotations

from quickloris.utils import hostmem
from quickloris.utils.hostmem import HostMemory, cgroup_memory, parse_meminfo

MEMINFO = """MemTotal:       131891236 kB
MemFree:         1200000 kB
MemAvailable:   96000000 kB
Buffers:          123456 kB
"""


def test_parse_meminfo_reads_available_and_total_in_bytes():
    assert parse_meminfo(MEMINFO) == HostMemory(96000000 * 1024, 131891236 * 1024)
    assert parse_meminfo("MemTotal: 100 kB\n") is None  # an old kernel without MemAvailable: unknown


def test_cgroup_memory_counts_file_cache_as_free_and_ignores_no_limit():
    stat = "anon 5000\nfile 3000\nkernel 10\nfile_mapped 7\n"
    assert cgroup_memory("10000\n", "9000\n", stat) == HostMemory(10000 - 9000 + 3000, 10000)
    assert cgroup_memory("max\n", "9000\n", stat) is None
    assert cgroup_memory("100\n", "500\n", "") == HostMemory(0, 100)  # over its limit: nothing free


def test_host_memory_takes_the_smaller_of_machine_and_cgroup(tmp_path, monkeypatch):
    (tmp_path / "meminfo").write_text(MEMINFO)
    group = tmp_path / "cg"
    group.mkdir()
    (group / "memory.max").write_text(str(64 * 2**30))
    (group / "memory.current").write_text(str(60 * 2**30))
    (group / "memory.stat").write_text(f"anon 1\nfile {2**30}\n")
    monkeypatch.setattr(hostmem, "MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(hostmem, "CGROUP", group)
    assert hostmem.host_memory() == HostMemory(5 * 2**30, 64 * 2**30)
    (group / "memory.max").write_text("max\n")
    assert hostmem.host_memory() == parse_meminfo(MEMINFO)
    monkeypatch.setattr(hostmem, "CGROUP", tmp_path / "absent")
    assert hostmem.host_memory() == parse_meminfo(MEMINFO)
    monkeypatch.setattr(hostmem, "MEMINFO", tmp_path / "absent")
    assert hostmem.host_memory() is None
