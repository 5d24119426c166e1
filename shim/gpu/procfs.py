"""What /proc says about a container's CUDA processes, without loading the driver.

Reading /proc/PID/maps is the whole cost of the GPU layer for a process that never touched CUDA: no
driver, no cffi. Every reader returns an empty answer for a process that is gone or unreadable.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from shim.gpu.placement import NVIDIA_GPUS, read_proc_gpus
from shim.runtime.gpu_request import NVIDIA_CONTROL_MINORS, NVIDIA_MAJOR

PROC = Path("/proc")
LIBCUDA_NAME = b"libcuda.so"


def mapped_libcuda(pid: int, proc: Path = PROC) -> Optional[str]:
    """The path of the libcuda.so* the process maps, or None (also when it is gone or unreadable).

    This is the whole cost of a CPU-only container: no driver, no cffi."""
    try:
        with open(proc / str(pid) / "maps", "rb") as maps:
            for line in maps:
                fields = line.rstrip(b"\n").split(None, 5)
                if len(fields) == 6 and LIBCUDA_NAME in os.path.basename(fields[5]):
                    return fields[5].decode(errors="replace")
    except OSError:
        return None
    return None


def process_name(pid: int, proc: Path = PROC) -> str:
    try:
        return (proc / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def gpu_minors(pid: int, proc: Path = PROC) -> set[int]:
    """Minor numbers of the /dev/nvidia<N> GPU devices the process holds open (by the device number,
    so a renamed node inside the container counts too). Empty for a checkpointed process."""
    fd_dir = proc / str(pid) / "fd"
    found: set[int] = set()
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return found
    for name in names:
        try:
            st = os.stat(fd_dir / name)
        except OSError:
            continue
        if (st.st_mode & 0o170000) == 0o020000 and os.major(st.st_rdev) == NVIDIA_MAJOR \
                and os.minor(st.st_rdev) not in NVIDIA_CONTROL_MINORS:
            found.add(os.minor(st.st_rdev))
    return found


def gpu_uuids_by_minor(gpus_dir: Path = NVIDIA_GPUS) -> dict[int, str]:
    """Device minor -> UUID, from the driver's /proc/driver/nvidia/gpus/*/information."""
    return {gpu["minor"]: gpu["uuid"] for gpu in read_proc_gpus(gpus_dir) if gpu["minor"] is not None}


