"""Parsing cgroup interface files (v1 and v2 share their few formats).

Missing files are normal (a controller not enabled, an older kernel), so readers take a default
instead of raising; containerd's readers behave the same way. Values are unsigned 64-bit: "max"
is returned as ``MAX`` where containerd does so (v2) and callers map it to 0 where containerd does
(v1 pids).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

MAX = (1 << 64) - 1


def read_text(path: Path) -> Optional[str]:
    try:
        with open(path, "r") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError, ProcessLookupError):
        return None
    except OSError as e:  # ENODEV/EINVAL on some files of a cgroup being removed
        if e.errno in (19, 22):
            return None
        raise


def parse_uint(text: str) -> int:
    """One unsigned value; "max" -> MAX; negative (v1 ``-1`` limits) -> MAX as well."""
    s = text.strip()
    if s == "max":
        return MAX
    v = int(s)
    return MAX if v < 0 else v


def read_uint(path: Path, default: int = 0) -> int:
    text = read_text(path)
    if text is None or not text.strip():
        return default
    try:
        return parse_uint(text.split()[0])
    except ValueError:
        return default


def parse_flat_keyed(text: str) -> dict[str, int]:
    """``key value`` per line (memory.stat, cpu.stat, memory.events, memory.oom_control)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        try:
            out[parts[0]] = parse_uint(parts[1])
        except ValueError:
            continue
    return out


def read_flat_keyed(path: Path) -> Optional[dict[str, int]]:
    text = read_text(path)
    return None if text is None else parse_flat_keyed(text)


def parse_nested_keyed(text: str) -> list[tuple[str, dict[str, str]]]:
    """``head k=v k=v`` per line (io.stat, *.pressure, rdma.current)."""
    out: list[tuple[str, dict[str, str]]] = []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        kv = {}
        for p in parts[1:]:
            k, sep, v = p.partition("=")
            if sep:
                kv[k] = v
        out.append((parts[0], kv))
    return out


def hugepage_sizes(sysfs: Path = Path("/sys/kernel/mm/hugepages")) -> list[str]:
    """Page size names as the cgroup files spell them: hugepages-2048kB -> 2MB, -1048576kB -> 1GB."""
    try:
        names = sorted(os.listdir(sysfs))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if not (n.startswith("hugepages-") and n.endswith("kB")):
            continue
        kb = int(n[len("hugepages-"):-2])
        out.append(size_name(kb * 1024))
    return out


def size_name(size: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}B"
