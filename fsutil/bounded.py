"""Reading a small file that someone else may have put there: a regular file only, never through a
symlink, never more than a limit. One implementation for the node config, the GPU record and the
records read from checkpoint images (all read by root; the latter two come from untrusted storage).
"""
import os
import stat


class UnsafeFile(ValueError):
    """The path is there but is no small regular file (a link, a fifo, a directory, too big)."""


def read_regular(path, limit):
    """(data, stat) of `path`; None when it does not exist. Raises UnsafeFile for a link, anything but a
    regular file, or more than `limit` bytes; OSError for other failures. Opened with O_NOFOLLOW and
    O_NONBLOCK (a fifo put in its place cannot hang the reader), checked on the open descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError:
        if os.path.islink(path):
            raise UnsafeFile(f"{path} is a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(f"{path} is not a regular file")
        if st.st_size > limit:
            raise UnsafeFile(f"{path} holds {st.st_size} bytes, more than {limit}")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise UnsafeFile(f"{path} grew past {limit} bytes while being read")
        return b"".join(chunks), st
    finally:
        os.close(fd)
