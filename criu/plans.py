"""``runc checkpoint`` / ``runc restore`` argument lists, as the checkpoint seam builds them.

Pure data -> argv, so the mapping is testable without runc. The argv starts at the subcommand; the
runc wrapper prepends the binary and its global flags (``--root``, ``--log``...). The seam
(`shim.checkpoint.seam`) fills a CheckpointPlan from containerd's CheckpointOptions OR-ed with the
container's annotations, and a RestorePlan from what the checkpoint recorded.

Flags are those of runc 1.1.5 (``runc checkpoint --help`` / ``runc restore --help``), which
runc 1.3 still accepts. Semantics follow containerd's runc shim (pkg/process ``Init.checkpoint`` and
``createCheckpointedState``): ``exit`` false means ``--leave-running``; a restore is detached, with
``--no-subreaper`` because the shim itself is the subreaper, and without ``--empty-ns`` (containerd
does not pass it on restore either).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

#: runc 1.1 accepts soft/full/strict; 1.2+ adds ignore. Empty = runc's default (soft).
CGROUPS_MODES = frozenset({"", "soft", "full", "strict", "ignore"})


def _check_common(container_id: str, image_path: str, cgroups_mode: str) -> None:
    if not container_id or container_id.startswith("-"):
        raise ValueError(f"bad container id {container_id!r}")
    if not image_path:
        raise ValueError("image_path is required: runc would default to ./checkpoint in its cwd")
    if cgroups_mode not in CGROUPS_MODES:
        raise ValueError(f"unknown cgroups mode {cgroups_mode!r}; expected one of "
                         + ", ".join(sorted(m for m in CGROUPS_MODES if m)))


def _criu_flags(tcp: bool, ext_unix: bool, shell_job: bool, file_locks: bool, cgroups_mode: str) -> list[str]:
    """The CRIU options a restore needs exactly as the checkpoint had them."""
    out: list[str] = []
    if tcp:
        out.append("--tcp-established")
    if ext_unix:
        out.append("--ext-unix-sk")
    if shell_job:
        out.append("--shell-job")
    if file_locks:
        out.append("--file-locks")
    if cgroups_mode:
        out += ["--manage-cgroups-mode", cgroups_mode]
    return out


@dataclass(frozen=True)
class CheckpointPlan:
    """containerd.runc.v1.CheckpointOptions (+ the image and work dirs) for one container."""

    container_id: str
    image_path: str
    work_path: Optional[str] = None
    exit: bool = False
    open_tcp: bool = False
    external_unix_sockets: bool = False
    terminal: bool = False
    file_locks: bool = False
    empty_namespaces: tuple[str, ...] = ()
    cgroups_mode: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "empty_namespaces", tuple(self.empty_namespaces))
        _check_common(self.container_id, self.image_path, self.cgroups_mode)
        for ns in self.empty_namespaces:
            if not ns or ns.startswith("-"):
                raise ValueError(f"bad namespace name {ns!r} for --empty-ns")

    @property
    def keeps_running(self) -> bool:
        return not self.exit

    def args(self) -> list[str]:
        out = ["checkpoint", "--image-path", self.image_path]
        if self.work_path:
            out += ["--work-path", self.work_path]
        if self.keeps_running:
            out.append("--leave-running")
        out += _criu_flags(self.open_tcp, self.external_unix_sockets, self.terminal, self.file_locks,
                           self.cgroups_mode)
        for ns in self.empty_namespaces:
            out += ["--empty-ns", ns]
        out.append(self.container_id)
        return out


@dataclass(frozen=True)
class RestorePlan:
    """``runc restore --detach --no-subreaper`` for Start of a container created from a checkpoint; the
    restored init's pid is written to ``pid_file``."""

    container_id: str
    bundle: str
    image_path: str
    pid_file: str
    work_path: Optional[str] = None
    open_tcp: bool = False
    external_unix_sockets: bool = False
    terminal: bool = False
    file_locks: bool = False
    cgroups_mode: str = ""
    console_socket: Optional[str] = None
    no_pivot: bool = False

    def __post_init__(self) -> None:
        _check_common(self.container_id, self.image_path, self.cgroups_mode)
        if not self.bundle:
            raise ValueError("bundle is required")
        if not self.pid_file:
            raise ValueError("pid_file is required: the shim learns the restored pid from it")

    def args(self) -> list[str]:
        out = ["restore", "--detach", "--bundle", self.bundle, "--image-path", self.image_path]
        if self.work_path:
            out += ["--work-path", self.work_path]
        out += ["--pid-file", self.pid_file, "--no-subreaper"]
        if self.no_pivot:
            out.append("--no-pivot")
        out += _criu_flags(self.open_tcp, self.external_unix_sockets, self.terminal, self.file_locks,
                           self.cgroups_mode)
        if self.console_socket:
            out += ["--console-socket", self.console_socket]
        out.append(self.container_id)
        return out
