"""GPU readings: which processes hold VRAM on which GPU, how much is free, and who did GPU work.

`GpuReadings` is the one seam between the broker and the GPU: `read()` returns a `Reading`. Two
implementations:

- `NvmlReadings` (the node): NVML through nvidia-ml-py (``pynvml``). VRAM per process from
  ``nvmlDeviceGetComputeRunningProcesses``, free VRAM from ``nvmlDeviceGetMemoryInfo``, activity from
  ``nvmlDeviceGetProcessUtilization`` (per-process SM and memory utilization samples since the last
  reading: a sample above zero is work). Where a GPU has no per-process samples (some GPUs, MIG, vGPU:
  NVML says NOT_SUPPORTED) the device's own utilization is used instead and every process on a busy
  GPU counts as active: never park on a guess. Pids are the host's: the broker runs in the host's pid
  namespace (hostPID in the DaemonSet).
- `FileReadings` (tests, `kybernate broker serve --gpu-readings FILE`): the same facts from a JSON file
  that a test writes, for CPU containers on a machine without a GPU. It models what the driver shows
  of a container the shim paused: a frozen process holds no VRAM and does no work (the shim's GPU
  layer moved its VRAM to host RAM before the freeze). Everything else in the broker (containerd,
  pause, resume, sockets) stays real.

        {"gpus": [{"uuid": "GPU-fake-0", "total": 8589934592, "used_by_others": 0}],
         "processes": [{"pid": 4242, "gpu": "GPU-fake-0", "used": 2147483648, "active": false}]}
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Protocol

from .core import Gpu

log = logging.getLogger("kybernate.broker")

MAX_READINGS_FILE = 1 << 20


@dataclass(frozen=True)
class ProcessUse:
    pid: int
    gpu: str
    used: int       # bytes of VRAM


@dataclass(frozen=True)
class Reading:
    at: float
    gpus: Mapping[str, Gpu]
    processes: tuple[ProcessUse, ...] = ()
    active_pids: frozenset[int] = frozenset()   # did GPU work since the previous reading
    busy_gpus: frozenset[str] = frozenset()     # did work where per-process samples are not to be had
    problems: tuple[str, ...] = field(default=())


class GpuReadings(Protocol):
    def read(self) -> Reading: ...

    def close(self) -> None: ...


class ReadingsError(Exception):
    pass


# ---- NVML ------------------------------------------------------------------------------------------
class NvmlReadings:
    """NVML through nvidia-ml-py. Blocking calls: the broker calls `read` in a thread."""

    def __init__(self):
        try:
            import pynvml
        except ImportError as exc:   # pragma: no cover - a dependency of the package
            raise ReadingsError(f"nvidia-ml-py is not installed: {exc}") from None
        self.nvml = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise ReadingsError(f"NVML: {exc} (no NVIDIA driver on this node?)") from None
        self.devices: list[tuple[str, object]] = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            self.devices.append((uuid.decode() if isinstance(uuid, bytes) else uuid, handle))
        # NVML's sample clock is in microseconds; start a few seconds back so that work just before
        # the broker started counts.
        self._last_sample_us = {uuid: int((time.time() - 5) * 1e6) for uuid, _ in self.devices}

    def read(self) -> Reading:
        nv = self.nvml
        gpus: dict[str, Gpu] = {}
        processes: list[ProcessUse] = []
        active: set[int] = set()
        busy: set[str] = set()
        problems: list[str] = []
        for uuid, handle in self.devices:
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
            gpus[uuid] = Gpu(uuid, int(mem.total), int(mem.free))
            on_gpu: set[int] = set()
            for p in nv.nvmlDeviceGetComputeRunningProcesses(handle):
                on_gpu.add(int(p.pid))
                processes.append(ProcessUse(int(p.pid), uuid, int(p.usedGpuMemory or 0)))
            try:
                samples = nv.nvmlDeviceGetProcessUtilization(handle, self._last_sample_us[uuid])
            except nv.NVMLError as exc:
                code = getattr(exc, "value", None)
                if code in (nv.NVML_SUCCESS, nv.NVML_ERROR_NOT_FOUND):
                    samples = []        # no sample since the last reading: nothing ran
                else:
                    samples = None
                    problems.append(f"GPU {uuid}: per-process utilization: {exc}")
            if samples is None:
                util = nv.nvmlDeviceGetUtilizationRates(handle)
                if util.gpu > 0 or util.memory > 0:
                    busy.add(uuid)
                    active |= on_gpu
                continue
            for s in samples:
                self._last_sample_us[uuid] = max(self._last_sample_us[uuid], int(s.timeStamp))
                if s.smUtil > 0 or s.memUtil > 0 or s.encUtil > 0 or s.decUtil > 0:
                    active.add(int(s.pid))
        return Reading(time.time(), gpus, tuple(processes), frozenset(active), frozenset(busy), tuple(problems))

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:   # noqa: BLE001 - closing
            pass


# ---- the file stand-in -----------------------------------------------------------------------------
class FileReadings:
    """Readings from a JSON file (see the module docstring), read afresh at every `read`."""

    def __init__(self, path: str, proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")):
        self.path = path
        self.proc = proc
        self.cgroup_root = cgroup_root

    def read(self) -> Reading:
        try:
            with open(self.path, "rb") as f:
                doc = json.loads(f.read(MAX_READINGS_FILE) or b"{}")
        except (OSError, ValueError) as exc:
            raise ReadingsError(f"GPU readings file {self.path}: {exc}") from None
        shown: list[ProcessUse] = []
        active: set[int] = set()
        used_by_gpu: dict[str, int] = {}
        for p in doc.get("processes", []):
            pid = int(p["pid"])
            if not (self.proc / str(pid)).exists() or frozen(pid, self.proc, self.cgroup_root):
                continue            # gone, or paused by the shim: no VRAM, no work
            shown.append(ProcessUse(pid, str(p["gpu"]), int(p["used"])))
            used_by_gpu[str(p["gpu"])] = used_by_gpu.get(str(p["gpu"]), 0) + int(p["used"])
            if p.get("active"):
                active.add(pid)
        gpus = {}
        for g in doc.get("gpus", []):
            uuid, total = str(g["uuid"]), int(g["total"])
            free = total - int(g.get("used_by_others", 0)) - used_by_gpu.get(uuid, 0)
            gpus[uuid] = Gpu(uuid, total, free)
        return Reading(time.time(), gpus, tuple(shown), frozenset(active))

    def close(self) -> None:
        pass


def frozen(pid: int, proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> bool:
    """Whether the cgroup freezer holds ``pid`` (v2: cgroup.events ``frozen 1``; v1: freezer.state)."""
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return False
    unified = (cgroup_root / "cgroup.controllers").exists()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if unified and controllers == "":
            try:
                return "frozen 1" in (cgroup_root / rel / "cgroup.events").read_text().splitlines()
            except OSError:
                return False
        if not unified and "freezer" in controllers.split(","):
            try:
                return (cgroup_root / "freezer" / rel / "freezer.state").read_text().strip() in ("FROZEN", "FREEZING")
            except OSError:
                return False
    return False


def open_readings(readings_file: Optional[str] = None) -> GpuReadings:
    """The node's readings: NVML, or the file stand-in when one is named."""
    if readings_file:
        log.warning("GPU readings from the file %s (a stand-in for NVML, for tests)", readings_file)
        return FileReadings(readings_file)
    return NvmlReadings()


def readings_file_exists(path: str) -> bool:
    return os.path.isfile(path)
