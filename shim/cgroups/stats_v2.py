"""cgroup v2 statistics as plain data, read as containerd's cgroups v2 (and v3) manager reads them.

Counters are kept as dicts keyed by the kernel's names, which are also the proto field names of
io.containerd.cgroups.v2.Metrics (cpu.stat, memory.stat, memory.events); the mapping drops keys
the proto lacks. "max" limits are reported as 2**64-1, as containerd does for v2.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .files import MAX, parse_nested_keyed, read_flat_keyed, read_text, read_uint


@dataclass
class PidsStat:
    current: int = 0
    limit: int = 0


@dataclass
class PSIData:
    avg10: float = 0.0
    avg60: float = 0.0
    avg300: float = 0.0
    total: int = 0


@dataclass
class PSIStats:
    some: Optional[PSIData] = None
    full: Optional[PSIData] = None


@dataclass
class IOEntry:
    major: int
    minor: int
    rbytes: int = 0
    wbytes: int = 0
    rios: int = 0
    wios: int = 0


@dataclass
class HugeTlbStat:
    pagesize: str
    current: int = 0
    max: int = 0
    failcnt: int = 0


@dataclass
class V2Stats:
    pids: Optional[PidsStat] = None
    cpu: dict[str, int] = field(default_factory=dict)            # cpu.stat
    cpu_psi: Optional[PSIStats] = None
    memory: dict[str, int] = field(default_factory=dict)         # memory.stat + usage/limit keys
    memory_psi: Optional[PSIStats] = None
    memory_events: Optional[dict[str, int]] = None               # memory.events
    io: list[IOEntry] = field(default_factory=list)
    io_psi: Optional[PSIStats] = None
    hugetlb: list[HugeTlbStat] = field(default_factory=list)


def parse_psi(text: Optional[str]) -> Optional[PSIStats]:
    if not text:
        return None
    out = PSIStats()
    for head, kv in parse_nested_keyed(text):
        if head not in ("some", "full"):
            continue
        try:
            data = PSIData(avg10=float(kv.get("avg10", 0)), avg60=float(kv.get("avg60", 0)),
                           avg300=float(kv.get("avg300", 0)), total=int(kv.get("total", 0)))
        except ValueError:
            continue
        setattr(out, head, data)
    return out


def parse_io_stat(text: str) -> list[IOEntry]:
    """``8:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0`` per device."""
    out = []
    for head, kv in parse_nested_keyed(text):
        maj, sep, mnr = head.partition(":")
        if not sep:
            continue
        try:
            e = IOEntry(major=int(maj), minor=int(mnr))
        except ValueError:
            continue
        for k in ("rbytes", "wbytes", "rios", "wios"):
            try:
                setattr(e, k, int(kv.get(k, 0)))
            except ValueError:
                pass
        out.append(e)
    return out


def read_hugetlb(d: Path) -> list[HugeTlbStat]:
    """hugetlb.<size>.current / .max / .events (its ``max`` count = failcnt, as cgroups v3 reports)."""
    sizes: set[str] = set()
    try:
        for name in os.listdir(d):
            parts = name.split(".")
            if len(parts) == 3 and parts[0] == "hugetlb" and parts[2] in ("current", "max"):
                sizes.add(parts[1])
    except FileNotFoundError:
        return []
    out = []
    for s in sorted(sizes):
        events = read_flat_keyed(d / f"hugetlb.{s}.events") or {}
        out.append(HugeTlbStat(pagesize=s, current=read_uint(d / f"hugetlb.{s}.current"),
                               max=read_uint(d / f"hugetlb.{s}.max"), failcnt=events.get("max", 0)))
    return out


def read_v2(d: Path) -> V2Stats:
    """All v2 stats of the cgroup directory ``d`` (files of disabled controllers are simply absent)."""
    out = V2Stats()
    if (d / "pids.current").exists():
        out.pids = PidsStat(current=read_uint(d / "pids.current"), limit=read_uint(d / "pids.max"))
    out.cpu = read_flat_keyed(d / "cpu.stat") or {}
    out.cpu_psi = parse_psi(read_text(d / "cpu.pressure"))
    mem = read_flat_keyed(d / "memory.stat") or {}
    for key, fname, default in (("usage", "memory.current", 0), ("usage_limit", "memory.max", MAX),
                                ("swap_usage", "memory.swap.current", 0),
                                ("swap_limit", "memory.swap.max", MAX),
                                ("max_usage", "memory.peak", 0),
                                ("swap_max_usage", "memory.swap.peak", 0)):
        if (d / fname).exists():
            mem[key] = read_uint(d / fname, default)
    out.memory = mem
    out.memory_psi = parse_psi(read_text(d / "memory.pressure"))
    out.memory_events = read_flat_keyed(d / "memory.events")
    out.io = parse_io_stat(read_text(d / "io.stat") or "")
    out.io_psi = parse_psi(read_text(d / "io.pressure"))
    out.hugetlb = read_hugetlb(d)
    return out
