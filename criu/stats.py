"""What CRIU says about its own time: the ``stats-dump`` / ``stats-restore`` files and the log's clock.

Why: a checkpoint or restore of a big GPU container spends its time in stages that belong to
different owners (the CUDA driver, runc, CRIU's freezing, page dumping and page writing, CRIU's
forking and page reading). The shim's stage profile (`shim.checkpoint.profile`) splits runc's wall
time into these with what CRIU writes anyway:

- ``stats-dump`` / ``stats-restore`` in CRIU's work dir (runc's ``--work-path``): a service image,
  two magics (IMG_SERVICE_MAGIC, STATS_MAGIC), a u32 length and a ``stats_entry`` protobuf. Times
  are microseconds (dump: freezing, frozen, memdump, memwrite; restore: forking, restore), plus page
  counts.
- the log (runc runs CRIU at log level 4): every line starts ``(SS.uuuuuu)``, seconds since CRIU
  started; the span of the ``pie: N: Preadv`` lines is the restorer reading page contents.

The protobuf is read with ttrpc's wire reader (as `criu.images` reads its images), with a size cap
(a stats file is under 100 bytes).
"""
from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Optional

IMG_SERVICE_MAGIC = 0x55105940
STATS_MAGIC = 0x57093306
PAGE_SIZE = 4096
MAX_STATS_BYTES = 4096

# stats.proto: field number -> name (times in us, counts in pages)
DUMP_FIELDS = {1: "freezing_us", 2: "frozen_us", 3: "memdump_us", 4: "memwrite_us", 5: "pages_scanned",
               6: "pages_skipped_parent", 7: "pages_written", 8: "irmap_resolve_us", 9: "pages_lazy",
               10: "page_pipes", 11: "page_pipe_bufs", 12: "shpages_scanned", 13: "shpages_skipped_parent",
               14: "shpages_written"}
RESTORE_FIELDS = {1: "pages_compared", 2: "pages_skipped_cow", 3: "forking_us", 4: "restore_us",
                  5: "pages_restored"}


def _fields(buf: bytes) -> dict[int, object]:
    """Top-level fields of a protobuf message (ttrpc's one wire reader, as criu.images uses it)."""
    from ttrpc.wire import iter_fields

    return {number: value for number, _wire, value in iter_fields(buf)}


def parse_stats(data: bytes) -> dict[str, int]:
    """The counters of a stats file's bytes ({} for a file that is not one)."""
    if len(data) < 12:
        return {}
    magic, kind, size = struct.unpack_from("<III", data, 0)
    if magic != IMG_SERVICE_MAGIC or kind != STATS_MAGIC or 12 + size > len(data):
        return {}
    from ttrpc.protocol_errors import ProtocolError

    try:
        top = _fields(data[12:12 + size])
        for number, names in ((1, DUMP_FIELDS), (2, RESTORE_FIELDS)):
            inner = top.get(number)
            if isinstance(inner, bytes):
                return {names[n]: v for n, v in _fields(inner).items() if n in names and isinstance(v, int)}
    except ProtocolError:
        return {}
    return {}


def read_stats(work_dir: str | os.PathLike, action: str) -> dict[str, int]:
    """``stats-dump`` (action "dump") or ``stats-restore`` of CRIU's work dir; {} when absent."""
    path = Path(work_dir) / f"stats-{action}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        return parse_stats(os.read(fd, MAX_STATS_BYTES))
    finally:
        os.close(fd)


_STAMP = re.compile(rb"^\(\s*(\d+)\.(\d+)\)")
_PREADV = re.compile(rb"pie: \d+: Preadv ")
_READ_DONE = re.compile(rb"pie: \d+: `- returned ")


def log_clock(log_path: str | os.PathLike, max_bytes: int = 256 << 20) -> dict[str, float]:
    """From a CRIU log: ``span_s`` (first to last time stamp: CRIU's own run time) and, for a restore,
    ``page_read_s`` (first ``Preadv`` to the last ``returned``: the restorers reading page contents,
    all processes together). {} when there is no log. Reads at most ``max_bytes``."""
    first = last = None
    read_first = read_last = None
    try:
        with open(log_path, "rb") as f:
            budget = max_bytes
            for line in f:
                budget -= len(line)
                if budget < 0:
                    break
                m = _STAMP.match(line)
                if not m:
                    continue
                t = int(m[1]) + int(m[2]) / 10 ** len(m[2])
                if first is None:
                    first = t
                last = t
                rest = line[m.end():]
                if read_first is None and _PREADV.search(rest):
                    read_first = t
                elif _READ_DONE.search(rest):
                    read_last = t
    except OSError:
        return {}
    out: dict[str, float] = {}
    if first is not None:
        out["span_s"] = round(last - first, 6)
        out["end_s"] = round(last, 6)
    if read_first is not None and read_last is not None and read_last >= read_first:
        out["page_read_s"] = round(read_last - read_first, 6)
    return out


def summary(action: str, work_dir: str | os.PathLike, log_path: Optional[str | os.PathLike]) -> dict[str, float]:
    """CRIU's side of one dump or restore, in seconds and bytes, for the stage profile."""
    stats = read_stats(work_dir, action)
    out: dict[str, float] = {}
    for key, value in stats.items():
        if key.endswith("_us"):
            out[key[:-3] + "_s"] = round(value / 1e6, 6)
    written = stats.get("pages_written") if action == "dump" else stats.get("pages_restored")
    if written is not None:
        out["page_bytes"] = written * PAGE_SIZE
    if log_path is not None:
        clock = log_clock(log_path)
        if "end_s" in clock:
            out["criu_s"] = clock["end_s"]
        if "page_read_s" in clock:
            out["page_read_s"] = clock["page_read_s"]
    return out
