"""What /proc says about a process's use of the NVIDIA driver: the cross-check to the driver's answer.

Why both: the driver's cuCheckpointProcessGetState is authoritative but says nothing about a process it
does not know, and /proc is what an operator can read by hand. A running or locked CUDA process maps
libcuda and holds /dev/nvidia* file descriptors; a checkpointed one still maps libcuda but has closed
every /dev/nvidia* descriptor (measured on the H100, docs in shared/notes/gpu-facts.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
NVIDIA_DEVICE_PREFIX = "/dev/nvidia"
LIBCUDA_NAME = "libcuda.so"


@dataclass(frozen=True)
class ProcEvidence:
    """/proc/<pid> facts; `readable` is False where the process vanished or we may not look."""

    pid: int
    readable: bool
    maps_libcuda: bool = False
    nvidia_fds: int = 0

    def to_dict(self) -> dict:
        return {"readable": self.readable, "maps_libcuda": self.maps_libcuda,
                "nvidia_fds": self.nvidia_fds}


def pid_exists(pid: int, proc: Path = PROC) -> bool:
    return pid > 0 and (proc / str(pid)).exists()


def process_name(pid: int, proc: Path = PROC) -> str:
    try:
        return (proc / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def maps_libcuda(pid: int, proc: Path = PROC) -> bool:
    """True where any mapping of the process is a file named libcuda.so*."""
    try:
        with open(proc / str(pid) / "maps", "rb") as maps:
            marker = LIBCUDA_NAME.encode()
            for line in maps:
                path = line.rstrip(b"\n").split(None, 5)[5:]
                if path and marker in os.path.basename(path[0]):
                    return True
    except OSError:
        return False
    return False


def nvidia_fds(pid: int, proc: Path = PROC, prefix: str = NVIDIA_DEVICE_PREFIX) -> int:
    """How many of the process's open descriptors point at /dev/nvidia* device nodes."""
    fd_dir = proc / str(pid) / "fd"
    count = 0
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return 0
    for name in names:
        try:
            if os.readlink(fd_dir / name).startswith(prefix):
                count += 1
        except OSError:
            continue  # closed meanwhile
    return count


def evidence(pid: int, proc: Path = PROC, prefix: str = NVIDIA_DEVICE_PREFIX) -> ProcEvidence:
    if not pid_exists(pid, proc):
        return ProcEvidence(pid, readable=False)
    readable = os.access(proc / str(pid) / "maps", os.R_OK)
    return ProcEvidence(pid, readable=readable, maps_libcuda=maps_libcuda(pid, proc),
                        nvidia_fds=nvidia_fds(pid, proc, prefix))
