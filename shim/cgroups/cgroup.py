"""The container's cgroup, found from its init pid: stats, member pids, freeze state.

The shim asks the kernel rather than runc (``runc ps``/``runc events --stats`` fork a Go binary per
call), and works the same whether the container was created by runc 1.1 or 1.3, with cgroupfs or
the systemd driver: /proc/PID/cgroup is the truth for all of them.
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .files import read_flat_keyed, read_text
from .mounts import CgroupMounts, join_mount, parse_proc_cgroup
from .stats_v1 import V1Stats, read_v1
from .stats_v2 import V2Stats, read_v2

# v1 hierarchy used to list member processes, in order of preference: pids/memory/cpu are set up
# by every runc config; name=systemd is last because it may be shared with the host's session.
_PIDS_PREFERENCE = ("pids", "memory", "cpu", "cpuacct", "freezer", "devices", "blkio", "cpuset")


class CgroupError(Exception):
    """The process has no usable cgroup (gone, or no hierarchy mounted)."""


class FreezeState(enum.Enum):
    THAWED = "THAWED"
    FREEZING = "FREEZING"
    FROZEN = "FROZEN"
    UNKNOWN = "UNKNOWN"   # no freezer for this cgroup (v1 root, or the files are gone)


@dataclass(frozen=True)
class Cgroup:
    """One container cgroup. ``dirs``: v1 controller -> directory; v2: {"": the directory}."""

    version: int
    path: str
    dirs: Mapping[str, Path]

    # construction -------------------------------------------------------------------------------
    @classmethod
    def for_pid(cls, pid: int, *, proc: Path = Path("/proc"),
                mounts: Optional[CgroupMounts] = None) -> "Cgroup":
        """The cgroup of ``pid`` as seen from this process's mount namespace."""
        text = read_text(proc / str(pid) / "cgroup")
        if text is None:
            raise CgroupError(f"process {pid} does not exist")
        if mounts is None:
            mounts = CgroupMounts.read(proc / "self" / "mountinfo")
        return cls.from_proc_cgroup(text, mounts)

    @classmethod
    def from_proc_cgroup(cls, text: str, mounts: CgroupMounts) -> "Cgroup":
        entries = parse_proc_cgroup(text)
        try:
            version = mounts.version
        except FileNotFoundError as e:
            raise CgroupError(str(e)) from None
        if version == 2:
            if "" not in entries or mounts.unified is None:
                raise CgroupError("no cgroup v2 entry in /proc/PID/cgroup")
            return cls.v2(join_mount(mounts.unified, entries[""]), path=entries[""])
        dirs = {c: join_mount(mounts.v1[c], p) for c, p in entries.items() if c and c in mounts.v1}
        if not dirs:
            raise CgroupError("no cgroup v1 controller of the process is mounted")
        path = next((entries[c] for c in _PIDS_PREFERENCE if c in entries), next(iter(entries.values())))
        return cls(1, path, dirs)

    @classmethod
    def v1(cls, dirs: Mapping[str, Union[str, Path]], path: str = "") -> "Cgroup":
        return cls(1, path, {k: Path(v) for k, v in dirs.items()})

    @classmethod
    def v2(cls, directory: Union[str, Path], path: str = "") -> "Cgroup":
        return cls(2, path, {"": Path(directory)})

    # queries ------------------------------------------------------------------------------------
    def dir(self, controller: str = "") -> Optional[Path]:
        """The directory holding ``controller``'s files (v2: the one directory for all)."""
        if self.version == 2:
            return self.dirs[""]
        return self.dirs.get(controller)

    def _pids_dir(self) -> Optional[Path]:
        if self.version == 2:
            return self.dirs[""]
        for c in _PIDS_PREFERENCE:
            if c in self.dirs:
                return self.dirs[c]
        return next(iter(self.dirs.values()), None)

    def exists(self) -> bool:
        d = self._pids_dir()
        return d is not None and d.is_dir()

    def pids(self) -> list[int]:
        """Every process in the cgroup and its descendants (a container may nest cgroups)."""
        top = self._pids_dir()
        found: set[int] = set()
        if top is None:
            return []
        for root, _dirs, _files in os.walk(top):
            text = read_text(Path(root) / "cgroup.procs")
            if text:
                found.update(int(x) for x in text.split() if x.isdigit())
        return sorted(found)

    def stats(self) -> Union[V1Stats, V2Stats]:
        if self.version == 2:
            return read_v2(self.dirs[""])
        return read_v1(self.dirs)

    def metrics(self) -> Any:
        """google.protobuf.Any of io.containerd.cgroups.v{1,2}.Metrics, what Task.Stats returns."""
        from .metrics import metrics_any
        return metrics_any(self.stats())

    def freeze_state(self) -> FreezeState:
        """Truthful PAUSED/PAUSING for State: the kernel's word, not what we last asked for."""
        if self.version == 1:
            d = self.dirs.get("freezer")
            text = read_text(d / "freezer.state") if d is not None else None
            if text is None:
                return FreezeState.UNKNOWN
            try:
                return FreezeState(text.strip())
            except ValueError:
                return FreezeState.UNKNOWN
        d = self.dirs[""]
        want = read_text(d / "cgroup.freeze")
        events = read_flat_keyed(d / "cgroup.events")
        if want is None or events is None:
            return FreezeState.UNKNOWN
        if events.get("frozen") == 1:
            return FreezeState.FROZEN
        return FreezeState.FREEZING if want.strip() == "1" else FreezeState.THAWED

    def memory_dir(self) -> Optional[Path]:
        return self.dir("memory")
