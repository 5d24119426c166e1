"""Seal witnesses: this node's note that an image's files are, inode for inode, the ones it sealed or
verified in full, so that the next restore of the same image on this node need not read every byte
again (for an 8 GiB GPU image, 0.7-0.8 s of a 3 s restore on the H200).

Why it is safe (docs/security.md, "Sealed images"): a witness is written by the shim (root) into a
root-only directory on /run (tmpfs: gone with a reboot) right after it hashed every file of the image,
and names, per file, the device, inode, size and ctime in nanoseconds it saw before and after the
hashing. The kernel sets ctime on every change of a file's content or metadata (write, truncate,
fallocate, chmod, utimes: nobody can set it back), a file swapped in is another inode, and an added or
missing file fails the listing check that runs before this one. So a file whose (dev, inode, size,
ctime) is unchanged holds the bytes that were hashed. The seal's MAC and scope are checked on every
restore as before; the witness only replaces the content hashing, and only:

- for the manifest whose MAC it names (a re-sealed image needs a new witness),
- for the same image directory (device and inode),
- on local filesystems (tmpfs, ext4, xfs, btrfs): a network filesystem's server could change a file
  without the client's ctime moving;
- when the witness directory is root's and nobody else may write it.

What it does not cover: a root process on the node that writes into an image through a shared
writable mapping it opened before the seal (tmpfs does not move ctime for those); root is trusted.
An operator who wants every restore to hash every byte sets ``checkpoint.seal_witness_dir = ""``.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass
from typing import Mapping, Optional

from fsutil.atomic import atomic_write

log = logging.getLogger("kybernate.shim")

MAX_WITNESS_BYTES = 8 << 20
#: statfs f_type of the filesystems whose ctime this node itself maintains
LOCAL_FS = {0x01021994: "tmpfs", 0xEF53: "ext4", 0x58465342: "xfs", 0x9123683E: "btrfs"}


_FSTATFS: list = []  # libc's fstatfs, looked up once (a shim's warm template does it before it forks)


def _fstatfs():
    if not _FSTATFS:
        _FSTATFS.append(ctypes.CDLL(None, use_errno=True).fstatfs)
    return _FSTATFS[0]


def fs_type(fd: int) -> Optional[int]:
    """statfs(2) f_type of an open fd (the first field of struct statfs on Linux), or None."""
    try:
        buf = ctypes.create_string_buffer(256)
        if _fstatfs()(fd, buf) != 0:
            return None
        return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF
    except (OSError, AttributeError):
        return None


def identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns]


@dataclass(frozen=True)
class WitnessDir:
    """The root-only directory that holds this node's witnesses (node config
    checkpoint.seal_witness_dir)."""

    path: str

    def _usable(self, create: bool) -> bool:
        if not self.path:
            return False
        try:
            if create:
                os.makedirs(self.path, mode=0o700, exist_ok=True)
            st = os.lstat(self.path)
        except OSError:
            return False
        ok = stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022
        if not ok:
            log.warning("seal witnesses: %s is not a directory of root's that only root may write: not used",
                        self.path)
        return ok

    def _file(self, mac: str) -> str:
        return os.path.join(self.path, hashlib.sha256(mac.encode("utf-8", "surrogatepass")).hexdigest() + ".json")

    def record(self, mac: str, dir_fd: int, files: Mapping[str, os.stat_result]) -> bool:
        """After every file of the image was hashed and matched: note what was hashed. `files` is
        the listing taken before the hashing; each file is looked at again now, and nothing is
        noted when one changed meanwhile (its digest may be of the old or the new bytes)."""
        if fs_type(dir_fd) not in LOCAL_FS or not self._usable(create=True):
            return False
        try:
            now = {name: os.stat(name, dir_fd=dir_fd, follow_symlinks=False) for name in files}
        except OSError:
            return False
        if any(identity(now[n]) != identity(files[n]) for n in files):
            return False
        doc = {"mac": mac, "dir": identity(os.fstat(dir_fd))[:2],
               "files": {n: identity(st) for n, st in sorted(files.items())}}
        try:
            atomic_write(self._file(mac), json.dumps(doc, sort_keys=True).encode(), mode=0o600)
        except OSError as exc:
            log.warning("seal witnesses: cannot write into %s: %s", self.path, exc)
            return False
        return True

    def vouches(self, mac: str, dir_fd: int, files: Mapping[str, os.stat_result]) -> bool:
        """Whether a witness of this manifest (by its MAC) names exactly these files of this dir, each
        with the same device, inode, size and ctime. Any doubt is a no (the caller hashes)."""
        if fs_type(dir_fd) not in LOCAL_FS or not self._usable(create=False):
            return False
        try:
            fd = os.open(self._file(mac), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_size > MAX_WITNESS_BYTES:
                return False
            doc = json.loads(os.read(fd, MAX_WITNESS_BYTES + 1))
        except (OSError, ValueError):
            return False
        finally:
            os.close(fd)
        if not isinstance(doc, dict) or doc.get("mac") != mac:
            return False
        if doc.get("dir") != identity(os.fstat(dir_fd))[:2]:
            return False
        sealed = doc.get("files")
        if not isinstance(sealed, dict) or set(sealed) != set(files):
            return False
        return all(sealed[n] == identity(st) for n, st in files.items())
