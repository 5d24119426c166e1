"""Replacing a file so that a reader sees the old content or the new one, never half of either, even
after a crash: the project's one atomic writer.

A temporary file in the same directory (a rename across file systems would be a copy), written,
given its mode (and owner), fsync'ed, renamed over the target, then the directory fsync'ed so that the
rename itself is on disk. runc, CRIU and containerd read what we write (config.json, the CRIU config,
the state a later ``delete`` needs, checkpoint records and notes, containerd's config.toml); each of
them must find a whole file or the previous one.

Builtins only (``os``, ``errno``; not even ``typing``): the shim's ``start`` must stay light (no ``tempfile``, which pulls in ``random``
and ``shutil``), and packaging/kybernate_install.py loads this file by path on a node where nothing of
Kybernate is installed yet (Python 3.10 included).
"""
from __future__ import annotations

import errno
import os


def atomic_write(path: str | os.PathLike, data: str | bytes, mode: int = 0o644,
                 owner: tuple[int, int] | None = None, durable: bool = True) -> None:
    """Write `data` (text is UTF-8) to `path` through a temporary file and a rename, both fsync'ed.

    mode: the permission bits the file gets (exactly: the umask does not apply).
    owner: (uid, gid) to give the file, e.g. those of the file it replaces. Only root may give a file
    away; for anyone else a refused chown leaves the file owned by the writer.
    durable=False leaves out the two fsyncs: for files in a task's bundle (containerd's state dir,
    /run: tmpfs on a node, gone at a reboot; containerd writes its own files there without fsync),
    where every reader still sees the old file or the new one, and a power loss takes the directory
    anyway. On a disk-backed /run the fsyncs cost about a millisecond per file on the path of every
    container's start.
    The directory must exist. On any failure the target is untouched and no temporary file is left.
    """
    path = os.fspath(path)
    directory, name = os.path.split(path)
    directory = directory or "."
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            if owner is not None:
                try:
                    os.fchown(fd, *owner)
                except PermissionError:
                    pass
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_directory(directory)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename or a new entry in `directory` durable. File systems that cannot sync a directory
    (EINVAL) have nothing to make durable this way."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)
