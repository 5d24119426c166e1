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

    Checks only what is cheap and certain: existence, non-empty, inventory magic, pstree magic.
    Returns the stats so callers can log the size they are about to restore.
    """
    d = Path(directory)
    if not d.exists():
        raise CriuImageError("missing", str(d), f"checkpoint image dir {d} does not exist")
    if not d.is_dir():
        raise CriuImageError("not-a-directory", str(d), f"checkpoint image path {d} is not a directory")
    if not any(d.iterdir()):
        raise CriuImageError("empty", str(d), f"checkpoint image dir {d} is empty")
    inv = d / INVENTORY
    if not inv.is_file():
        raise CriuImageError("not-criu", str(d), f"{d} is not a CRIU image: no {INVENTORY}")
    head = _read_u32s(inv, 1)
    if not head or head[0] != INVENTORY_MAGIC:
        got = f"0x{head[0]:08x}" if head else "fewer than 4 bytes"
        raise CriuImageError("corrupt", str(d), f"{inv} is corrupt: starts with {got}, "
                             f"not CRIU's inventory magic 0x{INVENTORY_MAGIC:08x}")
    pstree = d / PSTREE
    if not pstree.is_file():
        raise CriuImageError("incomplete", str(d), f"{d} is not a complete CRIU dump: no {PSTREE} "
                             "(a pre-dump, or a dump that failed)")
    head = _read_u32s(pstree, 2)
    if head != [IMG_COMMON_MAGIC, PSTREE_MAGIC]:
        raise CriuImageError("corrupt", str(d), f"{pstree} is corrupt: bad magic "
                             + " ".join(f"0x{x:08x}" for x in head))
    return image_stats(d)


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
        doc = json.loads((Path(directory) / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("version") == MARKER_VERSION else None


def is_complete(directory: str | os.PathLike) -> bool:
    """Marked complete and still carrying an inventory (guards against a dir emptied afterwards)."""
    return read_completion(directory) is not None and (Path(directory) / INVENTORY).is_file()


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
