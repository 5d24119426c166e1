"""cgroup v1 statistics as plain data, read the way containerd's cgroups v1 package reads them.

Field names are those of io.containerd.cgroups.v1.Metrics, so the proto mapping is mechanical and
so a reader of either recognises the other. Each controller is optional: a part whose directory is
unknown or gone is None (containerd likewise skips controllers it cannot find).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from .files import MAX, hugepage_sizes, read_flat_keyed, read_text, read_uint

# memory.stat key -> MemoryStat field, where they differ.
_MEMORY_RENAMES = {
    "pgpgin": "pg_pg_in", "pgpgout": "pg_pg_out", "pgfault": "pg_fault", "pgmajfault": "pg_maj_fault",
    "hierarchical_memsw_limit": "hierarchical_swap_limit",
    "total_pgpgin": "total_pg_pg_in", "total_pgpgout": "total_pg_pg_out",
    "total_pgfault": "total_pg_fault", "total_pgmajfault": "total_pg_maj_fault",
}
MEMORY_STAT_FIELDS = (
    "cache", "rss", "rss_huge", "mapped_file", "dirty", "writeback", "pg_pg_in", "pg_pg_out",
    "pg_fault", "pg_maj_fault", "inactive_anon", "active_anon", "inactive_file", "active_file",
    "unevictable", "hierarchical_memory_limit", "hierarchical_swap_limit", "total_cache", "total_rss",
    "total_rss_huge", "total_mapped_file", "total_dirty", "total_writeback", "total_pg_pg_in",
    "total_pg_pg_out", "total_pg_fault", "total_pg_maj_fault", "total_inactive_anon",
    "total_active_anon", "total_inactive_file", "total_active_file", "total_unevictable",
)


@dataclass
class PidsStat:
    current: int = 0
    limit: int = 0          # v1: 0 means "max", as containerd reports it


@dataclass
class CPUUsage:
    total: int = 0          # ns
    kernel: int = 0         # ns (cpuacct.stat is in USER_HZ ticks)
    user: int = 0           # ns
    per_cpu: list[int] = field(default_factory=list)


@dataclass
class Throttle:
    periods: int = 0
    throttled_periods: int = 0
    throttled_time: int = 0


@dataclass
class CPUStat:
    usage: CPUUsage = field(default_factory=CPUUsage)
    throttling: Throttle = field(default_factory=Throttle)


@dataclass
class MemoryEntry:
    limit: int = 0
    usage: int = 0
    max: int = 0
    failcnt: int = 0


@dataclass
class MemoryStat:
    counters: dict[str, int] = field(default_factory=dict)   # MEMORY_STAT_FIELDS present in memory.stat
    usage: MemoryEntry = field(default_factory=MemoryEntry)
    swap: Optional[MemoryEntry] = None        # memory.memsw.* (absent without swap accounting)
    kernel: Optional[MemoryEntry] = None      # memory.kmem.*
    kernel_tcp: Optional[MemoryEntry] = None  # memory.kmem.tcp.*


@dataclass
class MemoryOomControl:
    oom_kill_disable: int = 0
    under_oom: int = 0
    oom_kill: int = 0


@dataclass
class BlkIOEntry:
    op: str
    device: str
    major: int
    minor: int
    value: int


@dataclass
class BlkIOStat:
    io_service_bytes_recursive: list[BlkIOEntry] = field(default_factory=list)
    io_serviced_recursive: list[BlkIOEntry] = field(default_factory=list)
    io_queued_recursive: list[BlkIOEntry] = field(default_factory=list)
    io_service_time_recursive: list[BlkIOEntry] = field(default_factory=list)
    io_wait_time_recursive: list[BlkIOEntry] = field(default_factory=list)
    io_merged_recursive: list[BlkIOEntry] = field(default_factory=list)
    io_time_recursive: list[BlkIOEntry] = field(default_factory=list)
    sectors_recursive: list[BlkIOEntry] = field(default_factory=list)


@dataclass
class HugetlbStat:
    pagesize: str
    usage: int = 0
    max: int = 0
    failcnt: int = 0


@dataclass
class V1Stats:
    pids: Optional[PidsStat] = None
    cpu: Optional[CPUStat] = None
    memory: Optional[MemoryStat] = None
    memory_oom_control: Optional[MemoryOomControl] = None
    blkio: Optional[BlkIOStat] = None
    hugetlb: list[HugetlbStat] = field(default_factory=list)


def _exists(d: Optional[Path]) -> bool:
    return d is not None and d.is_dir()


def read_pids(d: Path) -> PidsStat:
    max_text = (read_text(d / "pids.max") or "").strip()
    limit = 0 if max_text in ("", "max") else read_uint(d / "pids.max")
    return PidsStat(current=read_uint(d / "pids.current"), limit=limit)


def read_cpu(cpuacct: Optional[Path], cpu: Optional[Path], clock_ticks: int) -> CPUStat:
    out = CPUStat()
    if _exists(cpuacct):
        out.usage.total = read_uint(cpuacct / "cpuacct.usage")
        st = read_flat_keyed(cpuacct / "cpuacct.stat") or {}
        ns_per_tick = 1_000_000_000 // clock_ticks
        out.usage.user = st.get("user", 0) * ns_per_tick
        out.usage.kernel = st.get("system", 0) * ns_per_tick
        per_cpu = (read_text(cpuacct / "cpuacct.usage_percpu") or "").split()
        out.usage.per_cpu = [int(x) for x in per_cpu if x.isdigit()]
    if _exists(cpu):
        st = read_flat_keyed(cpu / "cpu.stat") or {}
        out.throttling = Throttle(periods=st.get("nr_periods", 0),
                                  throttled_periods=st.get("nr_throttled", 0),
                                  throttled_time=st.get("throttled_time", 0))
    return out


def _memory_entry(d: Path, module: str) -> Optional[MemoryEntry]:
    prefix = "memory." + (module + "." if module else "")
    if module and not (d / f"{prefix}usage_in_bytes").exists():
        return None
    return MemoryEntry(limit=read_uint(d / f"{prefix}limit_in_bytes"),
                       usage=read_uint(d / f"{prefix}usage_in_bytes"),
                       max=read_uint(d / f"{prefix}max_usage_in_bytes"),
                       failcnt=read_uint(d / f"{prefix}failcnt"))


def read_memory(d: Path) -> MemoryStat:
    raw = read_flat_keyed(d / "memory.stat") or {}
    counters = {}
    for key, value in raw.items():
        name = _MEMORY_RENAMES.get(key, key)
        if name in MEMORY_STAT_FIELDS:
            counters[name] = value
    return MemoryStat(counters=counters, usage=_memory_entry(d, "") or MemoryEntry(),
                      swap=_memory_entry(d, "memsw"), kernel=_memory_entry(d, "kmem"),
                      kernel_tcp=_memory_entry(d, "kmem.tcp"))


def read_oom_control(d: Path) -> MemoryOomControl:
    st = read_flat_keyed(d / "memory.oom_control") or {}
    return MemoryOomControl(oom_kill_disable=st.get("oom_kill_disable", 0),
                            under_oom=st.get("under_oom", 0), oom_kill=st.get("oom_kill", 0))


def block_devices(partitions_text: Optional[str]) -> dict[tuple[int, int], str]:
    """major:minor -> /dev/name from /proc/partitions, as containerd names BlkIOEntry.device."""
    out = {}
    for line in (partitions_text or "").splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0].isdigit() and parts[1].isdigit():
            out[(int(parts[0]), int(parts[1]))] = "/dev/" + parts[3]
    return out


def parse_blkio(text: str, devices: Mapping[tuple[int, int], str]) -> list[BlkIOEntry]:
    """``8:0 Read 4096`` / ``8:0 4096`` lines; the trailing ``Total N`` line is skipped."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2 or parts[0] == "Total" or ":" not in parts[0]:
            continue
        maj, _, mnr = parts[0].partition(":")
        try:
            major, minor = int(maj), int(mnr)
            op, value = (parts[1], int(parts[2])) if len(parts) >= 3 else ("", int(parts[1]))
        except ValueError:
            continue
        out.append(BlkIOEntry(op=op, device=devices.get((major, minor), ""), major=major,
                              minor=minor, value=value))
    return out


_CFQ_FILES = {
    "sectors_recursive": "sectors_recursive", "io_service_bytes_recursive": "io_service_bytes_recursive",
    "io_serviced_recursive": "io_serviced_recursive", "io_queued_recursive": "io_queued_recursive",
    "io_service_time_recursive": "io_service_time_recursive",
    "io_wait_time_recursive": "io_wait_time_recursive", "io_merged_recursive": "io_merged_recursive",
    "time_recursive": "io_time_recursive",
}


def read_blkio(d: Path, devices: Mapping[tuple[int, int], str]) -> BlkIOStat:
    """CFQ's recursive files when they have data, else the throttle files (every kernel has those).

    containerd falls back to ``throttle.io_service{d,_bytes}``; we prefer their ``_recursive``
    variants when present, since a container cgroup may have children.
    """
    out = BlkIOStat()
    size = 0
    if (d / "blkio.io_serviced_recursive").exists():
        for fname, attr in _CFQ_FILES.items():
            entries = parse_blkio(read_text(d / f"blkio.{fname}") or "", devices)
            setattr(out, attr, entries)
            size += len(entries)
    if size:
        return out
    for base, attr in (("io_serviced", "io_serviced_recursive"),
                       ("io_service_bytes", "io_service_bytes_recursive")):
        text = read_text(d / f"blkio.throttle.{base}_recursive")
        if text is None:
            text = read_text(d / f"blkio.throttle.{base}") or ""
        setattr(out, attr, parse_blkio(text, devices))
    return out


def read_hugetlb(d: Path, sizes: list[str]) -> list[HugetlbStat]:
    return [HugetlbStat(pagesize=s, usage=read_uint(d / f"hugetlb.{s}.usage_in_bytes"),
                        max=read_uint(d / f"hugetlb.{s}.max_usage_in_bytes"),
                        failcnt=read_uint(d / f"hugetlb.{s}.failcnt")) for s in sizes]


def read_v1(dirs: Mapping[str, Path], *, proc: Path = Path("/proc"),
            hugepages: Path = Path("/sys/kernel/mm/hugepages"),
            clock_ticks: Optional[int] = None) -> V1Stats:
    """All v1 stats of one container given its per-controller directories."""
    out = V1Stats()
    if _exists(dirs.get("pids")):
        out.pids = read_pids(dirs["pids"])
    cpuacct, cpu = dirs.get("cpuacct"), dirs.get("cpu")
    if _exists(cpuacct) or _exists(cpu):
        out.cpu = read_cpu(cpuacct, cpu, clock_ticks or os.sysconf("SC_CLK_TCK"))
    if _exists(dirs.get("memory")):
        out.memory = read_memory(dirs["memory"])
        out.memory_oom_control = read_oom_control(dirs["memory"])
    if _exists(dirs.get("blkio")):
        out.blkio = read_blkio(dirs["blkio"], block_devices(read_text(proc / "partitions")))
    if _exists(dirs.get("hugetlb")):
        out.hugetlb = read_hugetlb(dirs["hugetlb"], hugepage_sizes(hugepages))
    return out


__all__ = ["V1Stats", "PidsStat", "CPUStat", "CPUUsage", "Throttle", "MemoryStat", "MemoryEntry",
           "MemoryOomControl", "BlkIOStat", "BlkIOEntry", "HugetlbStat", "read_v1", "MAX"]
