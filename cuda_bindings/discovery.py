"""Which processes of a container hold CUDA state, and in which state: without nvidia-smi.

The answer per pid is the driver's own (cuCheckpointProcessGetState); /proc evidence (a libcuda
mapping, open /dev/nvidia* descriptors) rides along as a cross-check that operators can verify by
hand. The processes come from a cgroup's cgroup.procs (v2, or the memory/pids controller in v1) or a
plain pid list.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from . import procfs
from .driver import CudaDriver, ProcessState
from .errors import CudaBindingsError, NotACudaProcess

CGROUP_ROOT = Path("/sys/fs/cgroup")
# v1 controllers whose hierarchy holds every process of a container, in order of preference.
V1_CONTROLLERS = ("memory", "pids")


@dataclass(frozen=True)
class CudaProcess:
    """One process: the driver's state (None where it holds no CUDA state) and /proc's evidence."""

    pid: int
    name: str
    state: ProcessState | None
    driver_answer: str  # the state's label, or the driver's error (e.g. CUDA_ERROR_NOT_FOUND)
    evidence: procfs.ProcEvidence

    @property
    def holds_cuda(self) -> bool:
        return self.state is not None

    @property
    def evidence_agrees(self) -> bool:
        """Whether /proc tells the same story as the driver.

        Running/locked: libcuda mapped and /dev/nvidia* open. Checkpointed: libcuda mapped, no
        /dev/nvidia* open. No CUDA state: no /dev/nvidia* open. FAILED has no fixed picture.
        """
        ev = self.evidence
        if not ev.readable:
            return False
        if self.state in (ProcessState.RUNNING, ProcessState.LOCKED):
            return ev.maps_libcuda and ev.nvidia_fds > 0
        if self.state is ProcessState.CHECKPOINTED:
            return ev.maps_libcuda and ev.nvidia_fds == 0
        if self.state is None:
            return ev.nvidia_fds == 0
        return True

    def to_dict(self) -> dict:
        return {"pid": self.pid, "name": self.name,
                "state": self.state.label if self.state is not None else None,
                "driver_answer": self.driver_answer, "evidence": self.evidence.to_dict(),
                "evidence_agrees": self.evidence_agrees}


def probe(driver: CudaDriver, pid: int, proc: Path = procfs.PROC,
          device_prefix: str = procfs.NVIDIA_DEVICE_PREFIX) -> CudaProcess:
    """Ask the driver and /proc about one pid. A driver error other than 'not a CUDA process'
    (permission, say) is recorded in driver_answer rather than raised: one odd process must not
    hide the others."""
    state = None
    try:
        state = driver.state(pid)
        answer = state.label
    except NotACudaProcess as exc:
        answer = exc.cuda_error.name if exc.cuda_error else exc.reason
    except CudaBindingsError as exc:
        answer = getattr(exc, "name", None) or str(exc)
    return CudaProcess(pid, procfs.process_name(pid, proc), state, answer,
                       procfs.evidence(pid, proc, device_prefix))


def discover(pids: Iterable[int], driver: CudaDriver | None = None, *, include_all: bool = False,
             proc: Path = procfs.PROC,
             device_prefix: str = procfs.NVIDIA_DEVICE_PREFIX) -> list[CudaProcess]:
    """CudaProcess for each pid that holds CUDA state or maps libcuda (every live pid with
    include_all). Pids that vanished meanwhile are left out."""
    driver = driver or CudaDriver()
    found = []
    for pid in sorted(set(pids)):
        if not procfs.pid_exists(pid, proc):
            continue
        process = probe(driver, pid, proc, device_prefix)
        if include_all or process.holds_cuda or process.evidence.maps_libcuda:
            found.append(process)
    return found


def cgroup_pids(cgroup_dir: str | os.PathLike, recursive: bool = True) -> list[int]:
    """Pids in cgroup.procs of the directory (and of its descendants, with recursive)."""
    root = Path(cgroup_dir)
    if not (root / "cgroup.procs").exists():
        raise FileNotFoundError(f"{root} is not a cgroup directory (no cgroup.procs)")
    dirs = [root]
    if recursive:
        dirs += sorted(p.parent for p in root.rglob("cgroup.procs") if p.parent != root)
    pids: list[int] = []
    for d in dirs:
        try:
            text = (d / "cgroup.procs").read_text()
        except OSError:
            continue  # removed meanwhile
        pids += [int(tok) for tok in text.split()]
    return sorted(set(pids))


def cgroup_dir_of(pid: int, root: Path = CGROUP_ROOT, proc: Path = procfs.PROC) -> Path:
    """The cgroup directory holding `pid`, from /proc/<pid>/cgroup.

    cgroup v2 (root has cgroup.controllers): the unified path. v1 or hybrid: the memory controller's
    directory, else the pids controller's.
    """
    lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    paths = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path.lstrip("/")
    if (root / "cgroup.controllers").exists() and "" in paths:
        return root / paths[""]
    for controller in V1_CONTROLLERS:
        if controller in paths:
            return root / controller / paths[controller]
    raise FileNotFoundError(f"pid {pid}: no cgroup v2 path and no v1 "
                            f"{'/'.join(V1_CONTROLLERS)} controller in {proc}/{pid}/cgroup")


def discover_cgroup(cgroup_dir: str | os.PathLike, driver: CudaDriver | None = None,
                    **kwargs) -> list[CudaProcess]:
    """discover() over every process of a container's cgroup."""
    return discover(cgroup_pids(cgroup_dir), driver, **kwargs)
