"""What a container wrote to its own filesystem, travelling with its memory image.

A process restored on another node (or into a fresh container on this one) finds the image's root
filesystem, not the one it left: a file it had open in ``/tmp`` is not there, and CRIU fails
("Can't open file tmp/count"). So, as CRI checkpoint archives carry ``rootfs-diff.tar``, a checkpoint
on a node with tiers carries the container's writable layer:

- `capture` (after the dump, before the completion marker and the seal, so the seal covers it):
  the overlay's upper directory of the task's rootfs, found in this process's mountinfo, as a tar
  in the OCI layer convention: deleted files (overlay's 0:0 character devices) become ``.wh.NAME``,
  opaque directories (``trusted.overlay.opaque``) a ``.wh..wh..opq`` entry; regular files,
  directories and symbolic links with their owners, modes and times; sockets, fifos and devices
  are left out (a container cannot make devices; the others are recreated by their owners). A
  rootfs that is no overlay (the native snapshotter) has no diff: nothing is captured, said in the log.
- `apply` (at Start, before ``runc restore``, into the new container's mounted rootfs): the archive
  is in a sealed image (verified at Create) and is still read as untrusted: every name is resolved
  beneath the rootfs with openat2(RESOLVE_IN_ROOT) (the rootfs's own links are followed as the
  container would, never out of it), no ``..``, no absolute name, nothing but files, directories,
  links and whiteouts is created, and nothing is ever opened through a link.
"""
from __future__ import annotations

import logging
import os
import shutil
import stat
import tarfile
from typing import Optional

from shim.policy.store import open_in_root

log = logging.getLogger("kybernate.shim")

ARCHIVE_NAME = "rootfs-diff.tar"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_MEMBERS = 1_000_000


def _unescape(text: str) -> str:
    return text.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def upper_dir(rootfs: str, mountinfo: str = "/proc/self/mountinfo") -> Optional[str]:
    """The overlay upper dir mounted at ``rootfs`` (the last such mount), or None."""
    target = os.path.realpath(rootfs)
    found = None
    try:
        with open(mountinfo) as f:
            for line in f:
                head, _, tail = line.partition(" - ")
                fields, rest = head.split(), tail.split()
                if len(fields) < 5 or len(rest) < 3 or _unescape(fields[4]) != target or rest[0] != "overlay":
                    continue
                for opt in rest[2].split(","):
                    if opt.startswith("upperdir="):
                        found = _unescape(opt[len("upperdir="):])
    except OSError:
        return None
    return found


def capture(rootfs: str, image_dir: str, container_id: str = "") -> Optional[int]:
    """Write ``image_dir/rootfs-diff.tar`` from the rootfs's upper dir; returns its entry count, or
    None when the rootfs is no overlay."""
    upper = upper_dir(rootfs) if rootfs else None
    if not upper or not os.path.isdir(upper):
        log.info("container %s: rootfs %s is no overlay mount: no rootfs diff in the checkpoint", container_id, rootfs)
        return None
    count = 0
    path = os.path.join(image_dir, ARCHIVE_NAME)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for top, dirs, files in os.walk(upper, followlinks=False):
            dirs.sort()
            rel_top = os.path.relpath(top, upper)
            for name in sorted(dirs) + sorted(files):
                full = os.path.join(top, name)
                rel = name if rel_top == "." else f"{rel_top}/{name}"
                try:
                    st = os.lstat(full)
                except FileNotFoundError:
                    continue
                info = tarfile.TarInfo(rel)
                info.uid, info.gid, info.mode, info.mtime = st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_mtime
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    info.name = (f"{rel_top}/" if rel_top != "." else "") + WHITEOUT + name
                    info.type, info.size = tarfile.REGTYPE, 0
                    tar.addfile(info)
                elif stat.S_ISDIR(st.st_mode):
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                    if _is_opaque(full):
                        tar.addfile(tarfile.TarInfo(f"{rel}/{OPAQUE}"))
                elif stat.S_ISREG(st.st_mode):
                    info.size = st.st_size
                    with open(full, "rb") as src:
                        tar.addfile(info, src)
                elif stat.S_ISLNK(st.st_mode):
                    info.type, info.linkname = tarfile.SYMTYPE, os.readlink(full)
                    tar.addfile(info)
                else:
                    continue
                count += 1
    os.chmod(path, 0o600)
    return count


def _is_opaque(path: str) -> bool:
    for attr in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            if os.getxattr(path, attr, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return False


class RootfsDiffError(Exception):
    """The archive holds something that cannot be applied safely: names the entry."""


def _clean(name: str) -> list[str]:
    if name.startswith("/") or "\0" in name:
        raise RootfsDiffError(f"{name!r} is absolute")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts or not parts:
        raise RootfsDiffError(f"{name!r} leads out of the root filesystem")
    return parts


def _remove(parent_fd: int, name: str) -> None:
    try:
        st = os.lstat(name, dir_fd=parent_fd)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=parent_fd)
    else:
        os.unlink(name, dir_fd=parent_fd)


MAX_LINK_HOPS = 40


def _in_root(parts: list[str]) -> list[str]:
    """Components with '.' dropped and '..' taken back, never above the root (as in a chroot)."""
    out: list[str] = []
    for p in parts:
        if p in ("", "."):
            continue
        if p == "..":
            if out:
                out.pop()
        else:
            out.append(p)
    return out


def _parent(root_fd: int, parts: list[str]) -> int:
    """The entry's parent directory beneath the root, made (0755) where missing. A missing piece
    behind a dangling link of the rootfs is made where the link points, inside the rootfs."""
    want = parts[:-1]
    for _hop in range(MAX_LINK_HOPS):
        try:
            return open_in_root(root_fd, "/".join(want))
        except FileNotFoundError:
            pass
        missing = len(want)
        for i in range(1, len(want) + 1):
            try:
                os.close(open_in_root(root_fd, "/".join(want[:i])))
            except FileNotFoundError:
                missing = i
                break
        pfd = open_in_root(root_fd, "/".join(want[:missing - 1]))
        try:
            name = want[missing - 1]
            try:
                os.mkdir(name, 0o755, dir_fd=pfd)
            except FileExistsError:
                target = os.readlink(name, dir_fd=pfd)   # a dangling link (anything else opened above)
                base = [] if target.startswith("/") else want[:missing - 1]
                want = _in_root(base + target.split("/")) + want[missing:]
        finally:
            os.close(pfd)
    raise RootfsDiffError(f"{'/'.join(parts)!r}: more than {MAX_LINK_HOPS} links on the way")


def apply(image_dir: str, rootfs: str, container_id: str = "") -> int:
    """Apply ``image_dir/rootfs-diff.tar`` (if there) to the mounted ``rootfs``; returns the number
    of entries applied. RootfsDiffError/OSError/tarfile.TarError on anything unsafe or broken."""
    path = os.path.join(image_dir, ARCHIVE_NAME)
    if not os.path.lexists(path) or not rootfs:
        return 0
    root_fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    count = 0
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                count += 1
                if count > MAX_MEMBERS:
                    raise RootfsDiffError(f"more than {MAX_MEMBERS} entries")
                parts = _clean(member.name)
                base = parts[-1]
                pfd = _parent(root_fd, parts)
                try:
                    if base == OPAQUE:
                        for entry in os.listdir(pfd):
                            _remove(pfd, entry)
                    elif base.startswith(WHITEOUT):
                        _remove(pfd, base[len(WHITEOUT):])
                    elif member.isdir():
                        try:
                            st = os.lstat(base, dir_fd=pfd)
                            if not stat.S_ISDIR(st.st_mode):
                                _remove(pfd, base)
                                raise FileNotFoundError
                        except FileNotFoundError:
                            os.mkdir(base, 0o700, dir_fd=pfd)
                        dfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
                        try:
                            os.fchown(dfd, member.uid, member.gid)
                            os.fchmod(dfd, member.mode & 0o7777)
                        finally:
                            os.close(dfd)
                    elif member.isreg():
                        try:
                            if not stat.S_ISREG(os.lstat(base, dir_fd=pfd).st_mode):
                                _remove(pfd, base)
                        except FileNotFoundError:
                            pass
                        ffd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                                      0o600, dir_fd=pfd)
                        try:
                            src = tar.extractfile(member)
                            while src is not None:
                                data = src.read(1 << 20)
                                if not data:
                                    break
                                os.write(ffd, data)
                            os.fchown(ffd, member.uid, member.gid)
                            os.fchmod(ffd, member.mode & 0o7777)
                            os.utime(ffd, (member.mtime, member.mtime))
                        finally:
                            os.close(ffd)
                    elif member.issym():
                        _remove(pfd, base)
                        os.symlink(member.linkname, base, dir_fd=pfd)
                        os.chown(base, member.uid, member.gid, dir_fd=pfd, follow_symlinks=False)
                    else:
                        log.warning("container %s: rootfs diff entry %s (type %r) left out", container_id,
                                    member.name, member.type)
                finally:
                    os.close(pfd)
    finally:
        os.close(root_fd)
    return count
