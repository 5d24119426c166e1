"""Reading CRIU's logs into one error message for containerd.

CRIU log lines look like ``(00.012345) Error (criu/cr-dump.c:2093): Dumping FAILED.``; messages
from the parasite or restorer carry a ``pie: <pid>: `` prefix, early failures have no timestamp.
The *first* error is usually the cause; later ones are consequences ("Dumping FAILED"), so we
quote the first with a little context.

runc runs CRIU with the work path (``--work-path``, default the image path) as CRIU's work dir and
``dump.log`` / ``restore.log`` as log file, unless a CRIU config file sets ``log-file``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Optional

ERROR_MARK = "Error ("
#: Errors CRIU logs with pr_err but then carries on from (seen on a successful CRIU 4.1.1 dump
#: here: raising its own RLIMIT_NOFILE is best effort). Quoting them would hide the real cause.
BENIGN_ERRORS: tuple[str, ...] = (
    "rlimit: Can't setup RLIMIT_NOFILE for self",
)
_STAMP_RE = re.compile(r"^\(\s*\d+\.\d+\)\s?")

LOG_NAMES = {"dump": "dump.log", "checkpoint": "dump.log", "pre-dump": "dump.log",
             "restore": "restore.log"}


def strip_stamp(line: str) -> str:
    """Drop CRIU's ``(SS.uuuuuu)`` prefix: noise in a message shown to a person."""
    return _STAMP_RE.sub("", line.rstrip("\r\n"))


def _is_error(line: str, ignore: Iterable[str]) -> bool:
    return ERROR_MARK in line and not any(b in line for b in ignore)


def first_error_in_lines(lines: Iterable[str], context: int = 2,
                         ignore: Iterable[str] = BENIGN_ERRORS) -> Optional[str]:
    """The first ``Error (`` line (not one of ``ignore``) plus up to ``context`` following lines."""
    ignore = tuple(ignore)
    found: list[str] = []
    for line in lines:
        if found:
            text = strip_stamp(line)
            if text.strip():
                found.append(text)
            if len(found) > context:
                break
        elif _is_error(line, ignore):
            found.append(strip_stamp(line))
            if context == 0:
                break
    return "\n".join(found) if found else None


def first_error(log_path: str | os.PathLike, context: int = 2,
                ignore: Iterable[str] = BENIGN_ERRORS) -> Optional[str]:
    """First error of a CRIU log file; None when the file has none or does not exist.

    Streams the file (restore logs of large containers reach hundreds of MiB; a spinning restorer
    writes gigabytes) up to its first MAX_SCAN_BYTES, and tolerates bytes that are not UTF-8 (paths
    and comm names are written raw).
    """
    try:
        with open(log_path, "r", encoding="utf-8", errors="replace") as f:
            budget = [MAX_SCAN_BYTES]

            def lines():
                for line in f:
                    budget[0] -= len(line)
                    if budget[0] < 0:
                        return
                    yield line

            return first_error_in_lines(lines(), context, ignore)
    except FileNotFoundError:
        return None


MAX_SCAN_BYTES = 64 << 20


def log_candidates(action: str, work_path: Optional[str | os.PathLike] = None,
                   image_path: Optional[str | os.PathLike] = None,
                   configured: Optional[str | os.PathLike] = None) -> list[Path]:
    """Where the log may be, most specific first: a config ``log-file``, the work path, the image path.

    runc writes into the image path when no work path was given.
    """
    name = LOG_NAMES.get(action)
    if name is None:
        raise ValueError(f"unknown CRIU action {action!r}")
    out: list[Path] = []
    if configured:
        out.append(Path(configured))
    for d in (work_path, image_path):
        if d:
            p = Path(d) / name
            if p not in out:
                out.append(p)
    return out


def locate_log(action: str, work_path: Optional[str | os.PathLike] = None,
               image_path: Optional[str | os.PathLike] = None,
               configured: Optional[str | os.PathLike] = None) -> Optional[Path]:
    """The log runc/CRIU left for ``action`` (dump/checkpoint/restore), or None if there is none."""
    for p in log_candidates(action, work_path, image_path, configured):
        if p.is_file():
            return p
    return None


def describe_failure(action: str, work_path: Optional[str | os.PathLike] = None,
                     image_path: Optional[str | os.PathLike] = None,
                     configured: Optional[str | os.PathLike] = None) -> str:
    """One message for a failed checkpoint/restore: CRIU's first error and where the log is."""
    log = locate_log(action, work_path, image_path, configured)
    if log is None:
        tried = ", ".join(str(p) for p in log_candidates(action, work_path, image_path, configured))
        return f"CRIU {action} failed; no CRIU log found (looked at {tried or 'nothing'})"
    err = first_error(log)
    if err is None:
        return f"CRIU {action} failed; {log} has no Error line"
    return f"CRIU {action} failed: {err} (log: {log})"
