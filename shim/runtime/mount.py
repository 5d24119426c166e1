"""Mounting a task's rootfs (Create's ``rootfs`` mounts) and unmounting it on Delete.

containerd hands the shim the snapshot as a list of mounts (``overlay`` with lowerdir/upperdir, or a
``bind`` for the native snapshotter). Options are the ones mount(8) knows: flags become MS_* bits,
propagation options a second mount(2) call, everything else the filesystem's data string.
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat
import time
from dataclasses import dataclass, field

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

# option -> (clear?, flag)
_FLAGS = {
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "defaults": (False, 0),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
}
_PROPAGATION = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE,
    "runbindable": MS_UNBINDABLE | MS_REC,
}

_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        _libc.unshare.argtypes = [ctypes.c_int]
    return _libc


def _sys_mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    rc = _lib().mount(
        source.encode() if source else None,
        target.encode(),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source or fstype!r} on {target} ({fstype}): {os.strerror(err)}")


def _sys_umount(target: str, flags: int = 0) -> None:
    if _lib().umount2(target.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unmount {target}: {os.strerror(err)}")


@dataclass
class Mount:
    type: str
    source: str
    options: list[str] = field(default_factory=list)
    target: str = ""  # relative to the rootfs (containerd 2.x)

    @classmethod
    def from_proto(cls, m) -> "Mount":
        return cls(type=m.type, source=m.source, options=list(m.options), target=getattr(m, "target", ""))


def parse_options(options: list[str]) -> tuple[int, int, str]:
    """(flags, propagation flags, data) for mount(2) from mount(8)-style options."""
    flags = 0
    propagation = 0
    data: list[str] = []
    for opt in options:
        if opt in _FLAGS:
            clear, bit = _FLAGS[opt]
            flags = flags & ~bit if clear else flags | bit
        elif opt in _PROPAGATION:
            propagation |= _PROPAGATION[opt]
        elif opt.startswith("X-containerd.") or opt == "loop":
            continue  # containerd-internal hints; nothing the kernel knows
        else:
            data.append(opt)
    return flags, propagation, ",".join(data)


def _compact_lowerdir(data: str) -> tuple[str, str | None]:
    """Overlay data too long for one page: relative lowerdirs from their common parent (chdir)."""
    parts = data.split(",")
    lower = [p for p in parts if p.startswith("lowerdir=")]
    if not lower:
        return data, None
    dirs = lower[0][len("lowerdir="):].split(":")
    common = os.path.commonpath(dirs) if len(dirs) > 1 else os.path.dirname(dirs[0])
    if not common or common == "/":
        return data, None
    rel = ":".join(os.path.relpath(d, common) for d in dirs)
    out = [f"lowerdir={rel}" if p.startswith("lowerdir=") else p for p in parts]
    return ",".join(out), common


CLONE_FS = 0x00000200


def _mount_from(directory: str, source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2) with `directory` as the working directory (overlay resolves relative lowerdirs from
    it), without touching the shim's own cwd: a short-lived thread unshares its fs struct
    (CLONE_FS) and changes only its own cwd, so the event loop and the driver-loading threads never
    see another directory. The target is made absolute first."""
    import threading

    target = os.path.abspath(target)
    outcome: list[BaseException] = []

    def work() -> None:
        try:
            if _lib().unshare(CLONE_FS) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(CLONE_FS) for an overlay mount: {os.strerror(err)}")
            os.chdir(directory)
            _sys_mount(source, target, fstype, flags, data)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome.append(exc)

    worker = threading.Thread(target=work, name="overlay-mount", daemon=True)
    worker.start()
    worker.join()
    if outcome:
        raise outcome[0]


def mount_one(m: Mount, rootfs: str) -> str:
    target = os.path.join(rootfs, m.target.lstrip("/")) if m.target else rootfs
    flags, propagation, data = parse_options(m.options)
    chdir_to = None
    if m.type == "overlay" and len(data) > os.sysconf("SC_PAGESIZE") - 512:
        data, chdir_to = _compact_lowerdir(data)
    if chdir_to:
        _mount_from(chdir_to, m.source, target, m.type, flags, data)
    else:
        _sys_mount(m.source, target, m.type, flags, data)
    if flags & MS_BIND and flags & MS_RDONLY:
        # a bind mount ignores MS_RDONLY on the first call; remount to make it read-only
        _sys_mount("", target, "", flags | MS_REMOUNT, "")
    if propagation:
        _sys_mount("", target, "", propagation, "")
    return target


def mount_all(mounts: list[Mount], rootfs: str) -> list[str]:
    """Mount each in order onto the rootfs; on failure unmount what was mounted and re-raise."""
    done: list[str] = []
    try:
        for m in mounts:
            done.append(mount_one(m, rootfs))
    except BaseException:
        for target in reversed(done):
            try:
                unmount(target)
            except OSError:
                pass
        raise
    return done


def _unescape(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    if "\\" not in path:
        return path
    out = []
    i = 0
    while i < len(path):
        if path[i] == "\\" and path[i + 1:i + 4].isdigit() and len(path[i + 1:i + 4]) == 3:
            out.append(chr(int(path[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def mount_points_under(target: str) -> list[str]:
    """Mount points at or below `target`, deepest (last mounted) first."""
    target = os.path.normpath(target)
    found: list[str] = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split(" ", 5)
                if len(parts) < 5:
                    continue
                mp = _unescape(parts[4])
                if mp == target or mp.startswith(target.rstrip("/") + "/"):
                    found.append(mp)
    except OSError:
        return []
    # later lines are mounted later (on top); unmount those first, deeper paths before parents
    found.reverse()
    found.sort(key=lambda p: p.count("/"), reverse=True)
    return found


def unmount(target: str, retries: int = 50) -> None:
    for _ in range(retries):
        try:
            _sys_umount(target)
            return
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                return  # not mounted (any more)
            if exc.errno != errno.EBUSY:
                raise
        time.sleep(0.05)
    _sys_umount(target, MNT_DETACH)


def unmount_recursive(target: str) -> None:
    """Unmount everything mounted at or below `target` (nothing to do is fine)."""
    for mp in mount_points_under(target):
        unmount(mp)


def is_mounted(target: str) -> bool:
    return os.path.normpath(target) in mount_points_under(target)


def remove_tree(path: str) -> list[str]:
    """Remove a directory tree the shim made (CRIU's work dir) without ever walking into a mount.

    CRIU killed mid-restore leaves its cgroup yard mounted under its work dir: the host's whole cgroup
    hierarchies. A plain recursive delete walks into them and removes the host's empty cgroups. So:
    everything mounted at or below `path` is unmounted first (deepest first; detached if busy), then
    the tree is removed without descending into any directory on another device. Blocking (unmount
    retries sleep): call it in a thread. Returns what was left (still mounted), [] when all is gone."""
    try:
        unmount_recursive(path)
    except OSError:
        pass
    try:
        root = os.lstat(path)
    except FileNotFoundError:
        return []
    left: list[str] = []
    still_mounted = set(mount_points_under(path))  # what would not go: never walked into
    if path in still_mounted or os.path.normpath(path) in still_mounted:
        return [path]
    if not stat.S_ISDIR(root.st_mode):
        os.unlink(path)
        return left

    def remove(directory: str) -> bool:
        clean = True
        with os.scandir(directory) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    if st.st_dev != root.st_dev or os.path.normpath(entry.path) in still_mounted:
                        left.append(entry.path)
                        clean = False
                    elif not remove(entry.path):
                        clean = False
                else:
                    try:
                        os.unlink(entry.path)
                    except FileNotFoundError:
                        pass
        if clean:
            os.rmdir(directory)
        return clean

    remove(path)
    return left
