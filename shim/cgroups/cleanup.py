"""Removing a container's own cgroup after its runtime died half-way (a restore killed at its deadline).

runc deletes a container's cgroups with ``runc delete --force``, but only for a container whose state
it can load; runc killed in the middle of a restore leaves cgroups behind and no state. The shim then
removes exactly the spec's ``linux.cgroupsPath`` in every hierarchy: its processes killed, then its
directories removed bottom-up. Nothing above that path is ever touched, and a systemd-style path
(slice:prefix:name) is left to systemd.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from .mounts import CgroupMounts, join_mount


def container_cgroup_dirs(cgroups_path: str, mounts: CgroupMounts) -> list[Path]:
    """The directories of the container's cgroup in every mounted hierarchy (existing or not)."""
    if not cgroups_path.startswith("/") or ":" in cgroups_path or os.path.normpath(cgroups_path) == "/":
        return []
    if ".." in cgroups_path.split("/"):
        return []
    seen, out = set(), []
    for mount in list(mounts.v1.values()) + ([mounts.unified] if mounts.unified else []):
        if mount.mountpoint in seen:
            continue
        seen.add(mount.mountpoint)
        out.append(join_mount(mount, cgroups_path))
    return out


def _pids(directory: Path) -> list[int]:
    pids = []
    for root, _dirs, _files in os.walk(directory):
        try:
            with open(os.path.join(root, "cgroup.procs")) as f:
                pids += [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            continue
    return pids


def remove_container_cgroup(cgroups_path: str, mounts: CgroupMounts | None = None, timeout: float = 5.0) -> list[str]:
    """Kill what is left in the container's cgroup and remove it; returns what could not be removed."""
    mounts = mounts or CgroupMounts.read()
    left = []
    for directory in container_cgroup_dirs(cgroups_path, mounts):
        if not directory.is_dir():
            continue
        deadline = time.monotonic() + timeout
        while True:
            pids = _pids(directory)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for root, dirs, _files in os.walk(directory, topdown=False):
            for d in dirs:
                try:
                    os.rmdir(os.path.join(root, d))
                except OSError:
                    pass
        try:
            os.rmdir(directory)
        except OSError as exc:
            left.append(f"{directory}: {exc.strerror}")
    return left
