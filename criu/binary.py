"""Finding the CRIU binary and checking that it is usable.

Kybernate needs CRIU 4 (the CUDA plugin and the ``libdir`` plugin loading it relies on); Debian
bookworm ships 3.17, which also fails ``criu check`` on recent kernels. So the shim looks for CRIU in
a fixed order and refuses, with a message saying what to do, when the one it finds is older.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .errors import CriuError

#: Directories searched after $PATH: containerd often starts shims with a PATH lacking the sbin
#: directories, where both the Debian package (/usr/sbin) and our own build (/usr/local/sbin) live.
FALLBACK_DIRS: tuple[str, ...] = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin")

BUILD_HINT = ("build and install CRIU 4 with scripts/build-criu.sh (it installs /usr/local/sbin/criu), "
              "or point the runtime option CriuPath at a CRIU 4 binary")

_VERSION_RE = re.compile(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?")


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def search_dirs(path_env: Optional[str] = None, extra: Sequence[str] = FALLBACK_DIRS) -> list[str]:
    """$PATH entries first (the operator's choice wins), then the fallbacks not already listed."""
    if path_env is None:
        path_env = os.environ.get("PATH", "")
    dirs: list[str] = []
    for d in [*path_env.split(os.pathsep), *extra]:
        if d and d not in dirs:
            dirs.append(d)
    return dirs


def find_criu(explicit: Optional[str | os.PathLike] = None, *, path_env: Optional[str] = None,
              extra_dirs: Sequence[str] = FALLBACK_DIRS) -> Path:
    """Return the CRIU binary to use.

    ``explicit`` is the runtime option CriuPath. When it is set but unusable we raise instead of
    falling back: silently using another CRIU would hide a configuration mistake.
    """
    if explicit:
        p = Path(explicit)
        if not _executable(p):
            raise CriuError(f"CRIU binary {p} (runtime option CriuPath) does not exist or is not executable")
        return p
    for d in search_dirs(path_env, extra_dirs):
        p = Path(d) / "criu"
        if _executable(p):
            return p
    raise CriuError("CRIU not found in PATH nor in " + ", ".join(extra_dirs) + "; " + BUILD_HINT)


def parse_version(text: str) -> tuple[int, int, int]:
    """Parse ``criu --version`` output (``Version: 4.1.1`` or ``Version: 4.1``, GitID line optional)."""
    m = _VERSION_RE.search(text)
    if not m:
        raise CriuError(f"cannot parse CRIU version from {text.strip()!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def _run(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace", timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CriuError(f"running {' '.join(argv)} failed: {e}") from e


def criu_version(path: str | os.PathLike, timeout: float = 10.0) -> tuple[int, int, int]:
    """Ask the binary itself: the package version may not match what is installed at ``path``."""
    proc = _run([str(path), "--version"], timeout)
    if proc.returncode != 0:
        raise CriuError(f"{path} --version exited {proc.returncode}: {proc.stdout.strip()}")
    return parse_version(proc.stdout)


def format_version(v: Iterable[int]) -> str:
    return ".".join(str(x) for x in v)


def require_criu4(path: str | os.PathLike) -> tuple[int, int, int]:
    """Return the version of ``path`` or raise CriuError naming it, the path and how to get CRIU 4."""
    v = criu_version(path)
    if v[0] < 4:
        raise CriuError(f"CRIU {format_version(v)} at {path} is too old: Kybernate requires CRIU 4.x; "
                        + BUILD_HINT)
    return v


def criu_check(path: str | os.PathLike, timeout: float = 60.0) -> tuple[bool, str]:
    """Run ``criu check``; (True, text) when the kernel and binary can checkpoint at all.

    Never raises for a failing check: callers report the text (CRIU's own ``Error (...)`` lines).
    """
    try:
        proc = _run([str(path), "check"], timeout)
    except CriuError as e:
        return False, str(e)
    return proc.returncode == 0, proc.stdout.strip()
