"""The checkpoint store: where checkpoint images live, whose they are, and how a name that a pod
gives is found in it without reaching anything else on the host.

Why a store: a restore reads a directory as root and hands it to CRIU, so the directory a pod may
name must be one that only root writes and that holds only its own tenant's checkpoints. The store
(``NodeConfig.checkpoint_store``, default ``/var/lib/kybernate/checkpoints``) is owned by root, mode
0700, and laid out by scope:

    STORE/<containerd namespace>/<Kubernetes namespace>/<pod>/<container>/<checkpoint id>   (CRI)
    STORE/<containerd namespace>/_/<container id>/<checkpoint id>                           (others)

A container's *scope* is ``STORE/<containerd namespace>/<Kubernetes namespace or _>`` ("_" is no
Kubernetes namespace name: those are DNS labels). Every checkpoint inside its scope is the pod's to
restore from (a pod restored under another name in the same namespace finds its predecessor's
checkpoints); nothing outside it is. Both halves of the scope come from containerd: its namespace
from the shim's ``-namespace`` flag, the Kubernetes namespace from the CRI plugin's own spec
annotation ``io.kubernetes.cri.sandbox-namespace`` (the shipped ``pod_annotations`` pass only
``kybernate.io/*`` through, so a pod cannot set it).

`open_beneath` resolves a relative name beneath a root with ``openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`` (Linux 5.6+), or, where the kernel or a seccomp filter
lacks openat2, a walk that opens one component at a time with ``O_NOFOLLOW | O_DIRECTORY``: no
``..``, no symbolic link anywhere below the root, no absolute path. What it returns is an open
directory fd; the restore hands CRIU ``/proc/<shim pid>/fd/<fd>`` so that what CRIU reads is the
directory that was checked, whatever is renamed meanwhile.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import stat
import time
from dataclasses import dataclass
from typing import Mapping, Optional

NO_POD_NAMESPACE = "_"
CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
CRI_SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
CRI_SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
CRI_CONTAINER_NAME = "io.kubernetes.cri.container-name"
MAX_NAME_CHARS = 1024
_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


class StoreError(Exception):
    """A name that does not lead to a directory it may: ``reason`` is for the node's audit log
    only (a pod gets one sentence for every reason, so that it cannot probe the host)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def component(text: str, what: str) -> str:
    """One directory name of the layout: containerd ids, namespaces and Kubernetes names all fit."""
    if not isinstance(text, str) or not _COMPONENT.fullmatch(text) or text in (".", ".."):
        raise ValueError(f"{what} {text!r} cannot name a directory in the checkpoint store")
    return text


@dataclass(frozen=True)
class Scope:
    """Whose checkpoints a container may see: see the module docstring."""

    containerd_namespace: str
    pod_namespace: str          # "" when the container is not a CRI (Kubernetes) container
    name: tuple[str, ...]       # (pod, container) for CRI containers, (container id,) otherwise

    def directory(self, store: str) -> str:
        return os.path.join(store, self.containerd_namespace, self.pod_namespace or NO_POD_NAMESPACE)

    def checkpoint_parent(self, store: str) -> str:
        """Where this container's checkpoints go (one directory per checkpoint id below it)."""
        return os.path.join(self.directory(store), *self.name)

    def relative_name(self, checkpoint_id: str) -> str:
        """What ``kybernate.io/restore-from`` says for one of this container's checkpoints."""
        return "/".join((*self.name, checkpoint_id))

    def __str__(self) -> str:
        return f"{self.containerd_namespace}/{self.pod_namespace or NO_POD_NAMESPACE}"


def scope_of(containerd_namespace: str, container_id: str, annotations: Mapping[str, str]) -> Scope:
    """The scope of a container from what containerd says about it (its namespace, and the CRI
    plugin's annotations for a Kubernetes container). ValueError for names that cannot be directory
    names (containerd's own identifiers always can)."""
    ns = component(containerd_namespace, "containerd namespace")
    pod_ns = annotations.get(CRI_SANDBOX_NAMESPACE) or ""
    pod = annotations.get(CRI_SANDBOX_NAME) or ""
    container = annotations.get(CRI_CONTAINER_NAME) or ""
    if pod_ns and pod and container and annotations.get(CRI_CONTAINER_TYPE, "container") == "container":
        return Scope(ns, component(pod_ns, "Kubernetes namespace"),
                     (component(pod, "pod name"), component(container, "container name")))
    return Scope(ns, "", (component(container_id, "container id"),))


def new_checkpoint_id(parent: str, now: Optional[float] = None) -> str:
    """A UTC timestamp, with .2, .3... for a second checkpoint within the same second."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    name, n = stamp, 1
    while os.path.lexists(os.path.join(parent, name)):
        n += 1
        name = f"{stamp}.{n}"
    return name


def split_name(name: str) -> list[str]:
    """The components of a relative name, or StoreError: no '..', not absolute, no NUL."""
    if not name or len(name) > MAX_NAME_CHARS or "\0" in name:
        raise StoreError("empty, too long, or holds a NUL byte")
    if name.startswith("/"):
        raise StoreError("absolute where a name beneath a root is expected")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise StoreError("holds '..'")
    if not parts:
        raise StoreError("names the root itself")
    return parts


# ---- resolution beneath a root ------------------------------------------------------------------
_SYS_OPENAT2 = 437  # the same number on every Linux architecture (5.6+)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_openat2_missing = False


def _openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
    how = _OpenHow(flags, 0, resolve)
    fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dir_fd), ctypes.c_char_p(os.fsencode(path)),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def _walk(dir_fd: int, parts: list[str], flags: int) -> int:
    """openat2's guarantees by hand: each component opened beneath the last, never through a link."""
    fd = os.dup(dir_fd)
    try:
        for part in parts:
            try:
                nxt = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.ENOTDIR and _is_link(part, fd):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), part) from None
                raise
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def open_beneath(root: str, name: str, *, use_openat2: bool = True) -> int:
    """An O_RDONLY|O_DIRECTORY fd of ``root/name``, found without leaving ``root``: StoreError when
    the name holds '..' or is absolute, when a component is a symbolic link (even one pointing back
    inside), missing, or not a directory. The root itself is trusted (node config or the store) and
    may be reached through links."""
    global _openat2_missing
    parts = split_name(name)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        root_fd = os.open(root, flags)
    except OSError as exc:
        raise StoreError(f"root {root}: {exc.strerror}") from None
    try:
        if use_openat2 and not _openat2_missing:
            try:
                return _openat2(root_fd, "/".join(parts), flags,
                                RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
            except OSError as exc:
                if exc.errno not in (errno.ENOSYS, errno.EPERM):
                    raise StoreError(_why(exc)) from None
                _openat2_missing = True  # an old kernel, or a seccomp filter: the walk from now on
        try:
            return _walk(root_fd, parts, flags)
        except OSError as exc:
            raise StoreError(_why(exc)) from None
    finally:
        os.close(root_fd)


RESOLVE_IN_ROOT = 0x10


def open_in_root(root_fd: int, name: str) -> int:
    """An O_DIRECTORY fd of ``name`` resolved as if ``root_fd`` were ``/`` (a container's rootfs:
    its own symbolic links are followed, but never out of it): openat2(RESOLVE_IN_ROOT), or where
    openat2 is missing a walk that follows no link at all. OSError when it is not there."""
    global _openat2_missing
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts:
        return os.dup(root_fd)
    if ".." in parts:
        raise OSError(errno.EXDEV, "holds '..'", name)
    if not _openat2_missing:
        try:
            return _openat2(root_fd, "/".join(parts), flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EPERM):
                raise
            _openat2_missing = True
    return _walk(root_fd, parts, flags)


def _why(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "a component is a symbolic link"
    if exc.errno == errno.EXDEV:
        return "it leads out of its root"
    if exc.errno == errno.ENOTDIR:
        return "a component is not a directory"
    if exc.errno == errno.ENOENT:
        return "it does not exist"
    return exc.strerror or str(exc)


def fd_path(fd: int) -> str:
    """The path through which any process of this host (runc, CRIU) reaches the fd's directory
    while the shim holds it open."""
    return f"/proc/{os.getpid()}/fd/{fd}"


def real_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def within(path: str, root: str) -> bool:
    """Lexically: ``path`` is ``root`` or below it (both absolute, normalized here)."""
    path, root = os.path.normpath(path), os.path.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_store_root(store: str) -> None:
    """The store must be root's alone: StoreError when others own it or may write to it (then a
    pod's neighbour could plant an image in it)."""
    try:
        st = os.stat(store)
    except OSError as exc:
        raise StoreError(f"checkpoint store {store}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"checkpoint store {store} is not a directory")
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise StoreError(f"checkpoint store {store} must be owned by root and not writable by group or others "
                         f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})")


def make_dirs(store: str, parts: list[str]) -> str:
    """Create ``store`` (0700) and ``parts`` beneath it (0700 each, never through a link); returns
    the real path of the last one. For `kybernate checkpoint` and for images the shim writes into
    the store."""
    if not os.path.isdir(store):
        os.makedirs(store, mode=0o700, exist_ok=True)
        os.chmod(store, 0o700)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            if part != NO_POD_NAMESPACE:
                component(part, "checkpoint store directory")
            try:
                os.mkdir(part, 0o700, dir_fd=fd)
            except FileExistsError:
                pass
            nxt = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return real_path(fd)
    finally:
        os.close(fd)


# ---- where a trusted caller asks the shim to write ---------------------------------------------
def target_dir(value: str, forbidden: list[str]) -> tuple[str, bool]:
    """A checkpoint's image or work dir that a containerd client named (CheckpointOptions): trusted,
    but bound by sanity. Returns (real path, whether it existed); ValueError (why) when it is not
    absolute, lies inside one of ``forbidden`` (the bundle, the rootfs: the container writes there,
    and CRIU's files would land in it), exists as something other than a directory, or is a
    directory that already holds something (the shim writes only into a new or empty one: /etc is
    not a checkpoint dir, and a failed checkpoint removes only what the shim made)."""
    if not value or not os.path.isabs(value):
        raise ValueError("is not an absolute path")
    path = os.path.realpath(value)
    for place in forbidden:
        if place and within(path, os.path.realpath(place)):
            raise ValueError(f"lies inside {place} (the container's bundle or root filesystem)")
    if not os.path.lexists(path):
        return path, False
    if not os.path.isdir(path):
        raise ValueError("exists and is not a directory")
    try:
        entries = os.listdir(path)
    except OSError as exc:
        raise ValueError(f"cannot be read: {exc.strerror}") from None
    if entries:
        raise ValueError("is a directory that already holds files: the shim writes only into a new or empty one")
    return path, True
