"""``runc checkpoint`` / ``runc restore`` argument lists from containerd's checkpoint options.

Pure data -> argv, so the mapping is testable without runc. The argv starts at the subcommand; the
runc wrapper prepends the binary and its global flags (``--root``, ``--log``...).

Flags are those of runc 1.1.5 (``runc checkpoint --help`` / ``runc restore --help``), which
runc 1.3 still accepts. Semantics follow containerd's runc shim (pkg/process ``Init.checkpoint`` and
``createCheckpointedState``): ``exit`` false means ``--leave-running``; a restore is detached, with
``--no-subreaper`` because the shim itself is the subreaper.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

#: runc 1.1 accepts soft/full/strict; 1.2+ adds ignore. Empty = runc's default (soft).
CGROUPS_MODES = frozenset({"", "soft", "full", "strict", "ignore"})


def _check_common(container_id: str, image_path: str, cgroups_mode: str,
                  empty_namespaces: tuple[str, ...]) -> None:
    if not container_id or container_id.startswith("-"):
        raise ValueError(f"bad container id {container_id!r}")
    if not image_path:
        raise ValueError("image_path is required: runc would default to ./checkpoint in its cwd")
    if cgroups_mode not in CGROUPS_MODES:
        raise ValueError(f"unknown cgroups mode {cgroups_mode!r}; expected one of "
                         + ", ".join(sorted(m for m in CGROUPS_MODES if m)))
    for ns in empty_namespaces:
        if not ns or ns.startswith("-"):
            raise ValueError(f"bad namespace name {ns!r} for --empty-ns")


def _criu_flags(tcp: bool, ext_unix: bool, shell_job: bool, file_locks: bool,
                cgroups_mode: str, empty_namespaces: tuple[str, ...]) -> list[str]:
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
    for ns in empty_namespaces:
        out += ["--empty-ns", ns]
    return out


@dataclass(frozen=True)
class CheckpointPlan:
    """containerd.runc.v1.CheckpointOptions (+ the request path) for one container.

    ``leave_running`` None means "not exit", as containerd does; asking for both exit and
    leave_running is a contradiction and refused.
    """

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
    leave_running: Optional[bool] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "empty_namespaces", tuple(self.empty_namespaces))
        _check_common(self.container_id, self.image_path, self.cgroups_mode, self.empty_namespaces)
        if self.exit and self.leave_running:
            raise ValueError("exit and leave_running contradict each other")

    @property
    def keeps_running(self) -> bool:
        return (not self.exit) if self.leave_running is None else self.leave_running

    @classmethod
    def from_options(cls, container_id: str, options: Any = None, *, path: str = "",
                     work_path: Optional[str] = None) -> "CheckpointPlan":
        """From a CheckpointOptions message (or anything with its field names; None = defaults).

        ``path`` is CheckpointTaskRequest.path; the options' image_path wins when set, as
        containerd's client uses it to bypass the content store. ``work_path`` is the fallback when
        the options carry none (runtime option criu_work_path, or a scratch dir of the shim).
        """
        get = (lambda name, default: getattr(options, name, default) if options is not None else default)
        return cls(
            container_id=container_id,
            image_path=get("image_path", "") or path,
            work_path=get("work_path", "") or work_path,
            exit=bool(get("exit", False)),
            open_tcp=bool(get("open_tcp", False)),
            external_unix_sockets=bool(get("external_unix_sockets", False)),
            terminal=bool(get("terminal", False)),
            file_locks=bool(get("file_locks", False)),
            empty_namespaces=tuple(get("empty_namespaces", ()) or ()),
            cgroups_mode=get("cgroups_mode", "") or "",
        )

    def args(self) -> list[str]:
        out = ["checkpoint", "--image-path", self.image_path]
        if self.work_path:
            out += ["--work-path", self.work_path]
        if self.keeps_running:
            out.append("--leave-running")
        out += _criu_flags(self.open_tcp, self.external_unix_sockets, self.terminal, self.file_locks,
                           self.cgroups_mode, self.empty_namespaces)
        out.append(self.container_id)
        return out

    def restore_plan(self, *, bundle: str, pid_file: str, console_socket: Optional[str] = None,
                     work_path: Optional[str] = None) -> "RestorePlan":
        """The matching restore: CRIU needs the same tcp/unix/shell-job/lock options on both sides."""
        return RestorePlan(container_id=self.container_id, bundle=bundle, image_path=self.image_path,
                           work_path=work_path if work_path is not None else self.work_path,
                           pid_file=pid_file, open_tcp=self.open_tcp,
                           external_unix_sockets=self.external_unix_sockets, terminal=self.terminal,
                           file_locks=self.file_locks, cgroups_mode=self.cgroups_mode,
                           empty_namespaces=self.empty_namespaces, console_socket=console_socket)


@dataclass(frozen=True)
class RestorePlan:
    """``runc restore`` for Create with a checkpoint; detached, pid written to ``pid_file``."""

    container_id: str
    bundle: str
    image_path: str
    pid_file: str
    work_path: Optional[str] = None
    open_tcp: bool = False
    external_unix_sockets: bool = False
    terminal: bool = False
    file_locks: bool = False
    empty_namespaces: tuple[str, ...] = ()
    cgroups_mode: str = ""
    console_socket: Optional[str] = None
    no_subreaper: bool = True
    no_pivot: bool = False
    detach: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "empty_namespaces", tuple(self.empty_namespaces))
        _check_common(self.container_id, self.image_path, self.cgroups_mode, self.empty_namespaces)
        if not self.bundle:
            raise ValueError("bundle is required")
        if not self.pid_file:
            raise ValueError("pid_file is required: the shim learns the restored pid from it")

    def args(self) -> list[str]:
        out = ["restore"]
        if self.detach:
            out.append("--detach")
        out += ["--bundle", self.bundle, "--image-path", self.image_path]
        if self.work_path:
            out += ["--work-path", self.work_path]
        out += ["--pid-file", self.pid_file]
        if self.no_subreaper:
            out.append("--no-subreaper")
        if self.no_pivot:
            out.append("--no-pivot")
        out += _criu_flags(self.open_tcp, self.external_unix_sockets, self.terminal, self.file_locks,
                           self.cgroups_mode, self.empty_namespaces)
        if self.console_socket:
            out += ["--console-socket", self.console_socket]
        out.append(self.container_id)
        return out
