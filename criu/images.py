"""Checkpoint image directories: size, sanity, and our "this dump finished" marker.

CRIU leaves a half-written directory when a dump fails, and runc does not clean it up. Restoring
from such a directory fails late and obscurely, so the shim marks a directory complete only after
the checkpoint succeeded and refuses (or cleans) unmarked ones.

Image format facts (CRIU ``criu/include/magic.h`` and ``criu/image.c``): every image file starts
with a little-endian u32 head magic, IMG_COMMON_MAGIC (or IMG_SERVICE_MAGIC for service files such
as stats-dump), followed by the image type's magic; ``inventory.img`` is the exception and starts
directly with INVENTORY_MAGIC; ``pages-*.img`` are raw page contents without any magic.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from fsutil.atomic import atomic_write

from .errors import CriuImageError

IMG_COMMON_MAGIC = 0x54564319
IMG_SERVICE_MAGIC = 0x55105940
INVENTORY_MAGIC = 0x58313116
PSTREE_MAGIC = 0x50273030

INVENTORY = "inventory.img"
PSTREE = "pstree.img"
COMPLETE_MARKER = "kybernate-complete.json"
MARKER_VERSION = 1


@dataclass(frozen=True)
class ImageStats:
    """Sizes of an image dir; page_bytes is what dominates dump/restore time and disk use."""

    total_bytes: int
    page_bytes: int
    files: int
    pages_files: int


def _is_pages(name: str) -> bool:
    return name.startswith("pages-") and name.endswith(".img")


def image_stats(directory: str | os.PathLike) -> ImageStats:
    """Walk the directory without following symlinks: a pre-dump's ``parent`` link points at another
    image dir whose pages must not be counted twice."""
    total = pages = files = pages_files = 0
    for root, dirs, names in os.walk(directory, followlinks=False):
        for name in names:
            p = os.path.join(root, name)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            files += 1
            total += st.st_size
            if _is_pages(name):
                pages_files += 1
                pages += st.st_size
    return ImageStats(total_bytes=total, page_bytes=pages, files=files, pages_files=pages_files)


def _read_u32s(path: Path, n: int) -> list[int]:
    with open(path, "rb") as f:
        head = f.read(4 * n)
    count = len(head) // 4
    return list(struct.unpack(f"<{count}I", head[: 4 * count]))


def validate_image_dir(directory: str | os.PathLike) -> ImageStats:
    """Raise CriuImageError (with .reason) unless ``directory`` looks like a whole CRIU dump.

    Checks only what is cheap and certain: existence, non-empty, inventory magic, pstree magic, and
    every page image's size against its pagemaps (`check_page_images`).
    Returns the stats so callers can log the size they are about to restore.

    Plain ``os`` calls rather than pathlib, and the directory walked once for the stats: it runs in
    every restore's Create, in a shim daemon just forked, where each distinct function run costs
    its pages' copy-on-write faults.
    """
    d = str(Path(directory))
    if not os.path.exists(d):
        raise CriuImageError("missing", d, f"checkpoint image dir {d} does not exist")
    if not os.path.isdir(d):
        raise CriuImageError("not-a-directory", d, f"checkpoint image path {d} is not a directory")
    with os.scandir(d) as entries:
        if next(entries, None) is None:
            raise CriuImageError("empty", d, f"checkpoint image dir {d} is empty")
    inv = os.path.join(d, INVENTORY)
    if not os.path.isfile(inv):
        raise CriuImageError("not-criu", d, f"{d} is not a CRIU image: no {INVENTORY}")
    head = _read_u32s(inv, 1)
    if not head or head[0] != INVENTORY_MAGIC:
        got = f"0x{head[0]:08x}" if head else "fewer than 4 bytes"
        raise CriuImageError("corrupt", d, f"{inv} is corrupt: starts with {got}, "
                             f"not CRIU's inventory magic 0x{INVENTORY_MAGIC:08x}")
    pstree = os.path.join(d, PSTREE)
    if not os.path.isfile(pstree):
        raise CriuImageError("incomplete", d, f"{d} is not a complete CRIU dump: no {PSTREE} "
                             "(a pre-dump, or a dump that failed)")
    head = _read_u32s(pstree, 2)
    if head != [IMG_COMMON_MAGIC, PSTREE_MAGIC]:
        raise CriuImageError("corrupt", d, f"{pstree} is corrupt: bad magic "
                             + " ".join(f"0x{x:08x}" for x in head))
    return _check_page_images(d) or image_stats(d)


PAGE_SIZE = 4096
PE_PARENT = 1 << 0   # pagemap flags (CRIU images/pagemap.proto): the page is in the parent image
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2
MAX_PAGEMAP_BYTES = 64 << 20


def _entries(path: str) -> list[bytes]:
    """The protobuf entries of a CRIU image file: two magics, then (u32 length, message) pairs."""
    d = os.path.dirname(path)
    size = os.stat(path).st_size
    if size > MAX_PAGEMAP_BYTES:
        raise CriuImageError("corrupt", d, f"{path} is {size} bytes: too big for a pagemap")
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or struct.unpack_from("<I", data, 0)[0] != IMG_COMMON_MAGIC:
        raise CriuImageError("corrupt", d, f"{path} is corrupt: bad magic")
    out, pos = [], 8
    while pos < len(data):
        if len(data) - pos < 4:
            raise CriuImageError("corrupt", d, f"{path} is truncated at byte {pos}")
        (length,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if length > len(data) - pos:
            raise CriuImageError("corrupt", d, f"{path} is truncated: an entry of {length} bytes "
                                               f"at byte {pos} runs past its end")
        out.append(data[pos:pos + length])
        pos += length
    return out


def expected_page_bytes(directory: str | os.PathLike) -> dict[str, int]:
    """pages-N.img name -> the bytes its pagemaps say it holds: for every pagemap*.img, the head's
    pages_id and the sum of nr_pages over the entries whose pages are in this image (present, not in
    the parent). A page image shorter than this makes CRIU 4.1.1's restorer spin on a read that
    returns 0 (a hang, not an error): the shim checks before CRIU starts."""
    from ttrpc.protocol_errors import ProtocolError
    from ttrpc.wire import iter_fields

    d = str(Path(directory))
    expected: dict[str, int] = {}
    for name in sorted(n for n in os.listdir(d) if n.startswith("pagemap") and n.endswith(".img")):
        pm = os.path.join(d, name)
        entries = _entries(pm)
        if not entries:
            raise CriuImageError("corrupt", d, f"{pm} has no pagemap head")
        try:
            head = {n: v for n, _, v in iter_fields(entries[0])}
            if not isinstance(head.get(1), int):
                raise CriuImageError("corrupt", d, f"{pm}: the pagemap head names no pages image")
            pages = 0
            for raw in entries[1:]:
                entry = {n: v for n, _, v in iter_fields(raw)}
                nr, flags = entry.get(2, 0), entry.get(4)
                in_parent = bool(entry.get(3, 0))
                if not isinstance(nr, int) or not isinstance(flags, (int, type(None))):
                    raise CriuImageError("corrupt", d, f"{pm}: a malformed pagemap entry")
                if flags is None:  # images before the flags field: present unless in the parent
                    flags = 0 if in_parent else PE_PRESENT
                if in_parent or flags & PE_PARENT or not flags & PE_PRESENT:
                    continue
                pages += nr
        except ProtocolError as exc:
            raise CriuImageError("corrupt", d, f"{pm} is corrupt: {exc}") from exc
        pages_name = f"pages-{head[1]}.img"
        expected[pages_name] = expected.get(pages_name, 0) + pages * PAGE_SIZE
    return expected


def check_page_images(directory: str | os.PathLike) -> None:
    """Raise CriuImageError('truncated') unless every page image has the size its pagemaps (and, where
    the checkpoint was ours, the completion marker) recorded. Cheap: pagemaps are small, page images
    are only stat'ed."""
    _check_page_images(str(Path(directory)))


def _check_page_images(d: str) -> Optional[ImageStats]:
    """`check_page_images`; the image's stats when it had to walk the directory for them."""
    for name, want in expected_page_bytes(d).items():
        path = os.path.join(d, name)
        try:
            have = os.lstat(path).st_size
        except FileNotFoundError:
            have = -1
        if have != want and not (have == -1 and want == 0):
            what = "is missing" if have < 0 else f"holds {have} bytes"
            raise CriuImageError("truncated", d, f"{path} {what} but the image's pagemaps record "
                                                 f"{want} bytes of pages: refusing to restore a truncated "
                                                 f"or padded image")
    recorded = ((read_completion(d) or {}).get("stats") or {}).get("page_bytes")
    if not isinstance(recorded, int):
        return None
    stats = image_stats(d)
    if stats.page_bytes != recorded:
        raise CriuImageError("truncated", d, f"{d} holds {stats.page_bytes} bytes of page images but its "
                                             f"checkpoint recorded {recorded} ({COMPLETE_MARKER})")
    return stats


def mark_complete(directory: str | os.PathLike, meta: Optional[Mapping[str, Any]] = None) -> Path:
    """Write the marker after a successful checkpoint; atomic so a crash never leaves half a marker.

    The marker records our stats and the caller's metadata (container id, CRIU version, CUDA pids).
    """
    d = Path(directory)
    stats = image_stats(d)
    doc = {"version": MARKER_VERSION, "completed_at": time.time(), "stats": asdict(stats),
           "meta": dict(meta or {})}
    target = d / COMPLETE_MARKER
    atomic_write(target, json.dumps(doc, sort_keys=True))
    return target


def read_completion(directory: str | os.PathLike) -> Optional[dict]:
    """The marker's content, or None when absent or unreadable (treated as not complete)."""
    try:
        with open(os.path.join(directory, COMPLETE_MARKER), "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("version") == MARKER_VERSION else None


def is_complete(directory: str | os.PathLike) -> bool:
    """Marked complete and still carrying an inventory (guards against a dir emptied afterwards)."""
    return read_completion(directory) is not None and (Path(directory) / INVENTORY).is_file()


IN_PROGRESS_MARKER = "kybernate-in-progress.json"


def mark_in_progress(directory: str | os.PathLike, meta: Optional[Mapping[str, Any]] = None) -> Path:
    """At the start of a dump into a directory the shim made: who is writing it (the shim's pid), so
    that a directory left by a shim killed mid-checkpoint is told apart from one still being written."""
    target = Path(directory) / IN_PROGRESS_MARKER
    doc = {"pid": os.getpid(), "pid_start": _start_ticks(os.getpid()), "started_at": time.time(),
           "meta": dict(meta or {})}
    atomic_write(target, json.dumps(doc, sort_keys=True))
    return target


def _start_ticks(pid: int) -> Optional[int]:
    """The process's start time (clock ticks after boot, /proc/PID/stat field 22); None when it is gone
    or a zombie. Told with the pid, it names one process: a pid reused later does not match."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            rest = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if not rest or rest[0] == b"Z":
        return None
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def clear_in_progress(directory: str | os.PathLike) -> None:
    try:
        (Path(directory) / IN_PROGRESS_MARKER).unlink()
    except FileNotFoundError:
        pass


def checkpoint_status(directory: str | os.PathLike) -> tuple[str, str]:
    """(status, why) of a checkpoint directory: "complete"; "in-progress" (its writer, a shim, still
    lives); "abandoned" (its writer is gone: a shim killed mid-checkpoint, a half image); "incomplete"
    (no marker of ours: a failed dump, or not a kybernate checkpoint)."""
    d = Path(directory)
    if is_complete(d):
        return "complete", ""
    try:
        raw = (d / IN_PROGRESS_MARKER).read_bytes()[:65536]
        doc = json.loads(raw)
        pid = int(doc.get("pid", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        what = "no inventory.img" if not (d / INVENTORY).exists() else "not marked complete"
        return "incomplete", what
    started = doc.get("started_at")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, (int, float)) else "?"
    now = _start_ticks(pid) if pid > 0 else None
    alive = now is not None and (doc.get("pid_start") is None or now == doc.get("pid_start"))
    if alive:
        return "in-progress", f"being written by pid {pid} since {when}"
    return "abandoned", f"its writer (pid {pid}, started {when}) is gone: a half image"


def clear_complete(directory: str | os.PathLike) -> None:
    """Unmark before reusing a directory for a new dump, so a failure cannot leave the old mark."""
    try:
        (Path(directory) / COMPLETE_MARKER).unlink()
    except FileNotFoundError:
        pass


def remove_incomplete(directory: str | os.PathLike) -> bool:
    """Delete an unmarked image dir left by a failed checkpoint; True if something was removed.

    Marked (complete) dirs are never touched, so this is safe to call on any failure path.
    """
    d = Path(directory)
    if not d.exists() or is_complete(d):
        return False
    if d.is_dir() and not d.is_symlink():
        shutil.rmtree(d)
    else:
        d.unlink()
    return True
