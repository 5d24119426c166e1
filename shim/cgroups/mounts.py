"""Where the cgroup hierarchies are mounted, and which cgroup a process is in.

Version detection follows what matters for reading stats: if any cgroup v1 hierarchy with real
controllers is mounted, the controllers live there (legacy or "hybrid" mode, where the v2 mount at
/sys/fs/cgroup/unified carries no controllers containerd uses), so we read v1. Only when none is
mounted do we read the unified (v2) hierarchy. containerd's cgroups.Mode() decides the same way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(s: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), s)


@dataclass(frozen=True)
class CgroupMount:
    mountpoint: Path
    root: str                      # the cgroup path that is mounted at mountpoint ("/" normally)
    controllers: frozenset[str]    # v1: {"cpu", "cpuacct"}, {"name=systemd"}; v2: empty


@dataclass(frozen=True)
class CgroupMounts:
    v1: dict[str, CgroupMount] = field(default_factory=dict)   # controller -> first mount of it
    unified: Optional[CgroupMount] = None

    @property
    def version(self) -> int:
        real = [c for c in self.v1 if not c.startswith("name=")]
        if real:
            return 1
        if self.unified is not None:
            return 2
        raise FileNotFoundError("no cgroup hierarchy is mounted")

    @classmethod
    def parse(cls, mountinfo_text: str) -> "CgroupMounts":
        v1: dict[str, CgroupMount] = {}
        unified: Optional[CgroupMount] = None
        for line in mountinfo_text.splitlines():
            left, sep, right = line.partition(" - ")
            if not sep:
                continue
            lf, rf = left.split(), right.split()
            if len(lf) < 5 or len(rf) < 3:
                continue
            fstype, super_opts = rf[0], rf[2]
            root, mountpoint = _unescape(lf[3]), Path(_unescape(lf[4]))
            if fstype == "cgroup2":
                if unified is None:
                    unified = CgroupMount(mountpoint, root, frozenset())
            elif fstype == "cgroup":
                ctrls = frozenset(o for o in super_opts.split(",")
                                  if o not in ("rw", "ro") and ("=" not in o or o.startswith("name="))
                                  and o not in _V1_MOUNT_OPTIONS)
                m = CgroupMount(mountpoint, root, ctrls)
                for c in ctrls:
                    v1.setdefault(c, m)
        return cls(v1, unified)

    @classmethod
    def read(cls, mountinfo: Path = Path("/proc/self/mountinfo")) -> "CgroupMounts":
        return cls.parse(mountinfo.read_text())


# Super options of a v1 cgroup mount that are not controller names.
_V1_MOUNT_OPTIONS = frozenset({"noprefix", "clone_children", "xattr", "cpuset_v2_mode",
                               "favordynmods", "nsdelegate", "memory_recursiveprot",
                               "memory_localevents", "memory_hugetlb_accounting"})


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/PID/cgroup`` -> {controller: path}; the v2 line ``0::/path`` is keyed ``""``."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        if ctrls == "":
            out[""] = path
            continue
        for c in ctrls.split(","):
            out[c] = path
    return out


def join_mount(mount: CgroupMount, cgroup_path: str) -> Path:
    """The directory of ``cgroup_path`` under ``mount``, allowing for a mount of a sub-tree."""
    rel = cgroup_path
    root = mount.root.rstrip("/")
    if root and (rel == root or rel.startswith(root + "/")):
        rel = rel[len(root):]
    return mount.mountpoint / rel.lstrip("/")
