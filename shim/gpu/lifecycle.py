"""The GPU side of a container's lifecycle: its CUDA processes around checkpoint, restore and pause.

Why it exists: CRIU cannot dump a process that holds GPU memory ("Can't handle non-regular mapping"
on the device VMA), and a frozen cgroup keeps its VRAM. The driver's checkpoint API moves a process's
device memory into its host memory and closes its device files (lock + checkpoint, "suspend"), and
brings it back (restore + unlock, "resume"). So:

- checkpoint: suspend every CUDA process of the task in parallel, ``runc checkpoint``, then, when the
  task keeps running, put each process back as it was found. If anything fails after the first lock,
  every process is put back and the task thawed before the error is returned.
- restore: after ``runc restore``, resume the CUDA processes the driver reports as locked or
  checkpointed (CRIU's CUDA plugin, where installed, may already have resumed some: never assume).
  A failure kills the restored task and names the process and the CUDA error.
- pause: suspend, then freeze (the VRAM is released); resume: thaw, then resume. The annotation
  ``kybernate.io/gpu-pause: keep`` turns that off per container.

What it costs a CPU-only task: one read of each of its processes' /proc/PID/maps. The driver (and
cffi, and cuda_bindings) is loaded only once some process of the container maps libcuda. Every driver
call blocks (a 2 GiB checkpoint takes a second or more), so each runs in a thread and the shim keeps
serving State, Pids and other containers meanwhile.

The checkpoint image gets a small ``kybernate-gpu.json`` next to CRIU's files: which GPUs (UUIDs)
the checkpointed processes used, the container's GPUs in its spec's order, their models and the
driver's versions. Before ``runc restore`` (`before_restore`), shim.gpu.placement compares that with
the GPUs the new container's spec gives it: identity, remap (gpu_map to the driver's restore), or a
FailedPrecondition before anything is created.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Callable, Iterable, Mapping, Optional

from fsutil.atomic import atomic_write
from ttrpc.codes import Code
from ttrpc.errors import TTRPCError

from shim.gpu.placement import NVIDIA_GPUS, NVIDIA_VERSION, read_proc_gpus
from shim.task.process import State
from shim.runtime.runc import RuntimeCommandError

if TYPE_CHECKING:  # pragma: no cover
    from cuda_bindings import CudaDriver
    from shim.task.container import Container
    from shim.gpu.placement import Placement

log = logging.getLogger("kybernate.shim")

LOCK_TIMEOUT_ANNOTATION = "kybernate.io/cuda-lock-timeout-ms"
PAUSE_ANNOTATION = "kybernate.io/gpu-pause"  # "release" (default) or "keep"
GPU_MAP_ANNOTATION = "kybernate.io/gpu-map"  # OLD_UUID=NEW_UUID,... for a restore onto other GPUs
DEFAULT_LOCK_TIMEOUT_MS = 10_000  # cuda_bindings' default; 0 would wait forever inside a long kernel
RECORD_NAME = "kybernate-gpu.json"
RECORD_FORMAT = 1

PROC = Path("/proc")
NVIDIA_MAJOR = 195  # /dev/nvidia<minor> (GPUs), nvidiactl (255), nvidia-modeset (254)
NVIDIA_CONTROL_MINORS = frozenset({254, 255})
LIBCUDA_NAME = b"libcuda.so"


# ---- /proc, without the driver -------------------------------------------------------------------
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


# ---- settings from the bundle's annotations -------------------------------------------------------
def parse_gpu_map(text: str) -> dict[str, str]:
    """'OLD=NEW,OLD2=NEW2' (UUIDs as nvidia-smi prints them) -> {OLD: NEW}."""
    pairs: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        old, sep, new = item.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise ValueError(f"expected OLD_UUID=NEW_UUID[,...], got {item!r}")
        pairs[old.strip()] = new.strip()
    return pairs


@dataclass(frozen=True)
class GpuSettings:
    lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS
    release_on_pause: bool = True
    gpu_map: Optional[dict] = None

    @classmethod
    def from_spec(cls, spec: Mapping, container_id: str) -> "GpuSettings":
        """From config.json's annotations; a malformed one is refused with its name and value."""
        annotations = spec.get("annotations") if isinstance(spec, Mapping) else None
        annotations = annotations if isinstance(annotations, Mapping) else {}

        def refuse(key: str, why: str) -> TTRPCError:
            return TTRPCError(Code.FAILED_PRECONDITION,
                              f"container {container_id}: annotation {key}={annotations.get(key)!r}: {why}")

        timeout = DEFAULT_LOCK_TIMEOUT_MS
        raw = annotations.get(LOCK_TIMEOUT_ANNOTATION)
        if raw not in (None, ""):
            try:
                timeout = int(str(raw).strip())
            except ValueError:
                raise refuse(LOCK_TIMEOUT_ANNOTATION, "not an integer number of milliseconds") from None
            if not 0 < timeout <= 0xFFFFFFFF:
                raise refuse(LOCK_TIMEOUT_ANNOTATION, "must be between 1 and 4294967295 ms "
                                                      "(0, wait forever, is not allowed)")
        mode = str(annotations.get(PAUSE_ANNOTATION) or "release").strip().lower()
        if mode not in ("release", "keep"):
            raise refuse(PAUSE_ANNOTATION, "expected 'keep' or 'release'")
        gpu_map = None
        raw = annotations.get(GPU_MAP_ANNOTATION)
        if raw:
            try:
                gpu_map = parse_gpu_map(str(raw))
            except ValueError as exc:
                raise refuse(GPU_MAP_ANNOTATION, str(exc)) from None
        return cls(timeout, mode == "release", gpu_map or None)


# ---- the driver, loaded once per shim, only when needed -------------------------------------------
_driver: Optional["CudaDriver"] = None
_driver_lock = threading.Lock()


def load_driver(hint_pids: Iterable[int] = (), proc: Path = PROC, paths: Iterable[str] = ()) -> "CudaDriver":
    """The shim's CudaDriver ($KYBERNATE_LIBCUDA, else libcuda.so.1); blocking: call in a thread.

    Where the loader cannot find libcuda.so.1 (a node whose driver lives outside the loader's path,
    as /usr/local/nvidia/lib64 does), the library a CUDA process of the container maps is tried: at
    its path on the host (nvidia-container-runtime mounts it at the same path), then through the
    process's root; then `paths` (before a restore: the one kybernate-gpu.json names). Only a success
    is cached."""
    global _driver
    with _driver_lock:
        if _driver is not None:
            return _driver
        from cuda_bindings import CudaDriver, DriverMissing

        try:
            _driver = CudaDriver()
            return _driver
        except DriverMissing as exc:
            first = exc
        for pid in hint_pids:
            path = mapped_libcuda(pid, proc)
            if not path:
                continue
            for candidate in (path, f"{proc}/{pid}/root{path}"):
                if os.path.exists(candidate):
                    try:
                        _driver = CudaDriver(candidate)
                        log.info("CUDA driver loaded from %s (mapped by pid %d)", candidate, pid)
                        return _driver
                    except DriverMissing:
                        continue
        for candidate in paths:
            if candidate and os.path.isabs(candidate) and os.path.exists(candidate):
                try:
                    _driver = CudaDriver(candidate)
                    log.info("CUDA driver loaded from %s (named by %s)", candidate, RECORD_NAME)
                    return _driver
                except DriverMissing:
                    continue
        raise first


def prepare(container: "Container") -> None:
    """For a bundle that asks for GPUs: load the driver in a background thread now, so that the first
    checkpoint or pause does not pay for dlopen + cuInit. A failure is left for that first use to report
    (with the libcuda a CUDA process maps as a further candidate). CPU bundles: nothing."""
    choice = getattr(container, "choice", None)
    if not getattr(choice, "gpu", False) or _driver is not None:
        return

    def load() -> None:
        try:
            load_driver()
        except Exception as exc:  # noqa: BLE001 - only a head start; the real use reports
            log.debug("container %s: CUDA driver not loaded ahead: %s", container.id, exc)

    threading.Thread(target=load, name="cuda-driver-load", daemon=True).start()


def describe(error: BaseException) -> str:
    """A CUDA failure in words that name the driver's error (CUDA_ERROR_TIMEOUT from ...)."""
    from cuda_bindings import CudaError, NotACudaProcess, ProcessFailed

    if isinstance(error, CudaError):
        where = f" from {error.call}" if error.call else ""
        return f"{error.name}{where} ({error.text})"
    if isinstance(error, NotACudaProcess):
        inner = f" ({error.cuda_error.name})" if error.cuda_error else ""
        return f"not a CUDA process: {error.reason}{inner}"
    if isinstance(error, ProcessFailed):
        return "CU_PROCESS_STATE_FAILED (the driver reports the process failed in an earlier checkpoint or restore)"
    return f"{type(error).__name__}: {error}"


# ---- what one suspend did --------------------------------------------------------------------------
@dataclass
class SuspendedProcess:
    pid: int
    name: str
    before: str  # the driver's state when we found it: running, locked, checkpointed
    steps: tuple[str, ...]
    gpus: list[str]
    gpus_source: str  # "device-files": the /dev/nvidiaN it held open; "all-visible": could not tell

    def to_dict(self) -> dict:
        return {"pid": self.pid, "name": self.name, "state_before": self.before, "steps": list(self.steps),
                "gpus": self.gpus, "gpus_source": self.gpus_source}


@dataclass
class Suspension:
    """The CUDA processes one suspend moved to CHECKPOINTED, and the state each is to go back to."""

    reason: str  # "checkpoint" or "pause"
    processes: list[SuspendedProcess]
    seconds: float
    lock_timeout_ms: int
    driver_version: int
    visible_gpus: list[str]
    timings: dict = field(default_factory=dict)
    placement: dict = field(default_factory=dict)  # container GPUs, models, driver release (gpu_placement)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    @property
    def gpus(self) -> list[str]:
        return sorted({g for p in self.processes for g in p.gpus})

    def record(self, container_id: str, extra: Optional[dict] = None) -> dict:
        out = {"format": RECORD_FORMAT, "container": container_id,
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "suspended_by": self.reason, "driver_version": self.driver_version,
               "visible_gpus": self.visible_gpus, "gpus": self.gpus,
               "lock_timeout_ms": self.lock_timeout_ms, "suspend_seconds": round(self.seconds, 6),
               "processes": [p.to_dict() for p in self.processes], "timings": self.timings}
        out.update(self.placement)
        out.update(extra or {})
        return out


def write_record(image_dir: str, record: dict) -> str:
    path = os.path.join(image_dir, RECORD_NAME)
    atomic_write(path, json.dumps(record, indent=1))
    return path


def read_record(image_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(image_dir, RECORD_NAME)) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


# ---- one container's CUDA processes ----------------------------------------------------------------
class ContainerGpu:
    """The CUDA processes of one container, and what the last Pause did to them.

    list_pids: every pid of the container (its cgroup, descendants included); driver_loader(hint_pids)
    returns a CudaDriver (blocking). Both are parameters so unit tests can run this without containers.
    """

    def __init__(self, container_id: str, spec: Mapping, list_pids: Callable[[], list[int]],
                 driver_loader: Callable[..., "CudaDriver"] = load_driver, proc: Path = PROC,
                 gpus_dir: Path = NVIDIA_GPUS, version_file: Path = NVIDIA_VERSION):
        self.id = container_id
        self.spec = spec
        self._list_pids = list_pids
        self._load = driver_loader
        self.proc = proc
        self.gpus_dir = gpus_dir
        self.version_file = version_file
        self.paused: Optional[Suspension] = None  # what Pause suspended (VRAM released)
        self.placement = None  # gpu_placement.Placement decided before the restore (plan_restore)
        self._settings: Optional[GpuSettings] = None

    def settings(self) -> GpuSettings:
        if self._settings is None:
            self._settings = GpuSettings.from_spec(self.spec, self.id)
        return self._settings

    def candidates(self) -> list[int]:
        """Pids of the container that map libcuda: the only ones the driver is asked about."""
        try:
            pids = self._list_pids()
        except Exception as exc:  # a vanished cgroup means no process left to care about
            log.debug("container %s: cannot list its processes: %s", self.id, exc)
            return []
        return [pid for pid in pids if mapped_libcuda(pid, self.proc)]

    async def driver(self, what: str, pids: list[int]) -> "CudaDriver":
        from cuda_bindings import CudaBindingsError

        try:
            return await asyncio.to_thread(self._load, pids)
        except CudaBindingsError as exc:
            raise TTRPCError(Code.FAILED_PRECONDITION,
                             f"{what} container {self.id}: its processes {pids} map libcuda but the shim cannot "
                             f"use the CUDA driver: {exc}") from exc

    async def _discover(self, driver, pids: list[int]) -> list:
        from cuda_bindings import discover

        found = await asyncio.to_thread(discover, pids, driver, proc=self.proc)
        return [p for p in found if p.holds_cuda]

    def _gpus_of(self, pid: int, visible: list[str], by_minor: dict[int, str],
                 container: Optional[list[str]] = None) -> tuple[list[str], str]:
        minors = gpu_minors(pid, self.proc)
        uuids = [by_minor[m] for m in sorted(minors) if m in by_minor]
        if minors and len(uuids) == len(minors):
            return uuids, "device-files"
        if container:  # the container's GPUs, from its spec
            return list(container), "container-spec"
        return list(visible), "all-visible"

    def _placement_facts(self, driver, pids: list[int]) -> tuple[dict, list[str]]:
        """(kybernate-gpu.json's placement fields, the container's GPUs); best effort: a checkpoint
        does not need them, a later restore onto other GPUs does."""
        from shim.gpu import placement as gpu_placement

        try:
            host = gpu_placement.host_gpus(driver, self.gpus_dir, self.version_file)
            facts = gpu_placement.record_fields(self.spec, host, [g.uuid for g in host.gpus])
            facts["libcuda"] = next(filter(None, (mapped_libcuda(pid, self.proc) for pid in pids)), None)
            return facts, list(facts["container_gpus"])
        except Exception as exc:  # noqa: BLE001 - reported, never fatal
            log.warning("container %s: cannot record its GPUs for a later restore: %s", self.id, exc)
            return {}, []

    async def suspend(self, reason: str, what: str) -> Optional[Suspension]:
        """Lock + checkpoint every CUDA process in parallel; None for a container without any.

        On a failure every process the batch changed is put back (cuda_bindings.suspend_all), and a
        TTRPCError names the pid and the CUDA error: FailedPrecondition when all went back, Internal
        when some did not."""
        pids = self.candidates()
        if not pids:
            log.debug("container %s: no process maps libcuda: no CUDA step for %s", self.id, what)
            return None
        settings = self.settings()
        driver = await self.driver(what, pids)
        processes = await self._discover(driver, pids)
        if not processes:
            log.info("container %s: %d process(es) map libcuda, none holds CUDA state", self.id, len(pids))
            return None

        def visible_gpus() -> list[str]:
            try:
                return driver.device_uuids()
            except Exception as exc:  # recording is best effort; the checkpoint does not need it
                log.warning("container %s: cannot list the GPUs: %s", self.id, exc)
                return []

        visible = await asyncio.to_thread(visible_gpus)
        facts, container_gpus = await asyncio.to_thread(self._placement_facts, driver, [p.pid for p in processes])
        by_minor = gpu_uuids_by_minor(self.gpus_dir)
        gpus = {p.pid: self._gpus_of(p.pid, visible, by_minor, container_gpus) for p in processes}

        from cuda_bindings import suspend_all

        started = time.perf_counter()
        result = await asyncio.to_thread(suspend_all, driver, [p.pid for p in processes],
                                         settings.lock_timeout_ms)
        seconds = time.perf_counter() - started
        if not result.ok:
            pid, error = result.first_failure
            back = "every process it had suspended was resumed"
            code = Code.FAILED_PRECONDITION
            if not result.rollback_ok:
                stuck = [f"pid {o.pid} ({describe(o.error)})" for o in result.rollback if not o.ok]
                back = "putting back the others failed: " + ", ".join(stuck)
                code = Code.INTERNAL
            raise TTRPCError(code, f"{what} container {self.id}: CUDA suspend of pid {pid} "
                                   f"({process_name(pid, self.proc) or '?'}) failed: {describe(error)} "
                                   f"(lock timeout {settings.lock_timeout_ms} ms); {back}")
        names = {p.pid: p.name for p in processes}
        done = [SuspendedProcess(o.pid, names.get(o.pid, ""), o.before.label, o.steps, *gpus[o.pid])
                for o in result.outcomes]
        log.info("container %s: %s: suspended %d CUDA process(es) %s in %.3f s", self.id, what, len(done),
                 [p.pid for p in done], seconds)
        used = sorted({g for p in done for g in p.gpus})
        if facts:
            facts["gpu_models"] = {u: m for u, m in facts["gpu_models"].items() if u in used or u in container_gpus}
            facts["gpu_count"] = len(container_gpus) or len(used)
        return Suspension(reason, done, seconds, settings.lock_timeout_ms, driver.driver_version(), visible,
                          placement=facts)

    async def put_back(self, suspension: Suspension, what: str) -> float:
        """Return each suspended process to the state it was found in (running, as a rule), in
        parallel; an Internal TTRPCError names every process that did not make it."""
        from cuda_bindings import ProcessState, resume_all

        driver = await self.driver(what, suspension.pids)
        to_run = [p.pid for p in suspension.processes if p.before == "running"]
        to_lock = [p.pid for p in suspension.processes if p.before == "locked"]

        def work():
            failures = []
            result = resume_all(driver, to_run) if to_run else None
            if result is not None:
                failures += [(o.pid, o.error) for o in result.failures]
            for pid in to_lock:  # someone else's lock (an operator's): give it back locked
                try:
                    driver.settle(pid, ProcessState.LOCKED)
                except Exception as exc:  # noqa: BLE001 - reported below
                    failures.append((pid, exc))
            return failures

        started = time.perf_counter()
        failures = await asyncio.to_thread(work)
        seconds = time.perf_counter() - started
        gone = [pid for pid, _ in failures if not (self.proc / str(pid)).exists()]
        if gone:  # exited (killed) while suspended: nothing left to resume
            log.info("container %s: %s: CUDA process(es) %s are gone", self.id, what, gone)
            failures = [(pid, err) for pid, err in failures if pid not in gone]
        if failures:
            detail = "; ".join(f"pid {pid} ({process_name(pid, self.proc) or '?'}): {describe(err)}"
                               for pid, err in failures)
            raise TTRPCError(Code.INTERNAL, f"{what} container {self.id}: CUDA resume failed: {detail}")
        log.info("container %s: %s: resumed %d CUDA process(es) in %.3f s", self.id, what,
                 len(suspension.processes), seconds)
        return seconds

    async def plan_restore(self, image_dir: str) -> Optional["Placement"]:
        """Before ``runc restore``: where the checkpointed CUDA processes go (shim.gpu.placement).

        None where the image holds no CUDA process (no kybernate-gpu.json: the CPU path, nothing
        loaded). Otherwise the driver is loaded and the decision kept for `resume_restored`; a restore
        that cannot work raises TTRPCError(FAILED_PRECONDITION) naming both GPU sets, the models and
        the driver versions."""
        self.placement = None
        record = read_record(image_dir) if image_dir else None
        if not record or not record.get("processes"):
            return None
        from cuda_bindings import CudaBindingsError

        from shim.gpu import placement as gpu_placement

        settings = self.settings()
        loader = self._load
        if loader is load_driver and record.get("libcuda"):
            loader = lambda pids: load_driver(pids, self.proc, paths=[str(record["libcuda"])])  # noqa: E731
        try:
            driver = await asyncio.to_thread(loader, [])
        except CudaBindingsError as exc:
            raise TTRPCError(Code.FAILED_PRECONDITION,
                             f"restore container {self.id}: the checkpoint holds {len(record['processes'])} CUDA "
                             f"process(es) ({RECORD_NAME}) but the shim cannot use the CUDA driver here: {exc}") from exc
        host = await asyncio.to_thread(gpu_placement.host_gpus, driver, self.gpus_dir, self.version_file)
        placement = gpu_placement.decide(self.id, record, gpu_placement.gpu_request(self.spec), host,
                                         settings.gpu_map)
        log.info("container %s: GPU placement at restore: %s", self.id, placement.summary())
        self.placement = placement
        return placement

    async def resume_restored(self, gpu_map: Optional[Mapping] = None, what: str = "restore") -> list[int]:
        """After a restore: resume the CUDA processes the driver reports as locked or checkpointed
        (not those CRIU's plugin already resumed). Returns the pids resumed."""
        pids = self.candidates()
        if not pids:
            return []
        from cuda_bindings import ProcessState, resume_all

        driver = await self.driver(what, pids)
        processes = await self._discover(driver, pids)
        failed = [p.pid for p in processes if p.state is ProcessState.FAILED]
        if failed:
            raise TTRPCError(Code.INTERNAL, f"{what} container {self.id}: CUDA process(es) {failed} are in state "
                                            "FAILED after the restore: " + describe_failed(failed[0]))
        waiting = [p.pid for p in processes if p.state in (ProcessState.LOCKED, ProcessState.CHECKPOINTED)]
        running = [p.pid for p in processes if p.state is ProcessState.RUNNING]
        if running:
            log.info("container %s: %s: CUDA process(es) %s already running (CRIU's plugin)", self.id, what, running)
        if not waiting:
            return []
        started = time.perf_counter()
        result = await asyncio.to_thread(resume_all, driver, waiting, gpu_map or None)
        if not result.ok:
            pid, error = result.first_failure
            others = [o.pid for o in result.failures if o.pid != pid]
            raise TTRPCError(Code.INTERNAL, f"{what} container {self.id}: CUDA resume of pid {pid} "
                                            f"({process_name(pid, self.proc) or '?'}) failed: {describe(error)}"
                                            + (f"; also failed: {others}" if others else ""))
        log.info("container %s: %s: resumed %d CUDA process(es) %s in %.3f s", self.id, what, len(waiting),
                 waiting, time.perf_counter() - started)
        return waiting


def describe_failed(pid: int) -> str:
    from cuda_bindings import ProcessFailed
    return describe(ProcessFailed(pid))


# ---- the container seams: called from shim.checkpoint.seam and shim.task.container ---------------------------------
def _container_pids(container: "Container") -> list[int]:
    init = container.init
    if init is None or init.pid <= 0:
        return []
    from shim.cgroups import Cgroup

    pids = Cgroup.for_pid(init.pid).pids()
    return pids if pids else [init.pid]


def of(container: "Container") -> ContainerGpu:
    """The container's ContainerGpu (made on first use, kept on the container)."""
    gpu = getattr(container, "_kybernate_gpu", None)
    if gpu is None or gpu.spec is not container.spec:
        gpu = ContainerGpu(container.id, container.spec, lambda: _container_pids(container))
        container._kybernate_gpu = gpu
    return gpu


def _frozen(container: "Container") -> bool:
    init = container.init
    if init is None or init.pid <= 0:
        return False
    try:
        from shim.cgroups import Cgroup, FreezeState

        return Cgroup.for_pid(init.pid).freeze_state() in (FreezeState.FROZEN, FreezeState.FREEZING)
    except Exception:
        return False


async def _thaw(container: "Container") -> None:
    await container.runtime.resume(container.id)


async def _freeze(container: "Container") -> None:
    await container.runtime.pause(container.id)


@asynccontextmanager
async def checkpointing(container: "Container", image_dir: str, keeps_running: bool) -> AsyncIterator[Optional[Suspension]]:
    """Around ``runc checkpoint``: CUDA processes suspended before, put back after (keep running) or
    on any failure, with the task thawed; ``kybernate-gpu.json`` written into image_dir on success.

    A task paused by us (VRAM released) is already suspended: nothing to do before or after, it stays
    paused. A task paused with its VRAM kept (gpu-pause: keep) is thawed for the suspend and frozen
    again, since a frozen process cannot answer the driver's lock."""
    gpu = of(container)
    init = container.init
    was_paused = init is not None and init.state is State.PAUSED
    what = "checkpoint"
    suspension = gpu.paused
    owned = False
    t0 = time.perf_counter()
    if suspension is None:
        try:
            async with _thawed(container, was_paused and bool(gpu.candidates())):
                suspension = await gpu.suspend("checkpoint", what)
        except RuntimeCommandError as exc:  # the thaw, or the freeze after the suspend
            if suspension is not None:
                await gpu.put_back(suspension, "checkpoint rollback")
            raise TTRPCError(Code.INTERNAL, f"checkpoint container {container.id}: the paused container "
                                            f"could not be thawed for the CUDA suspend and frozen again: {exc}") from exc
        owned = suspension is not None
    if suspension is None:  # the CPU path: nothing of ours around runc
        yield None
        return
    body_started = time.perf_counter()
    try:
        yield suspension
    except BaseException as exc:
        if owned:
            await _roll_back(container, gpu, suspension, was_paused, exc)
        raise
    suspension.timings["runtime_checkpoint_s"] = round(time.perf_counter() - body_started, 6)
    suspension.timings["suspend_s"] = round(body_started - t0, 6)
    try:
        write_record(image_dir, suspension.record(container.id, {"keeps_running": keeps_running,
                                                                   "image_dir": image_dir}))
    except OSError as exc:
        log.warning("container %s: cannot write %s into %s: %s", container.id, RECORD_NAME, image_dir, exc)
    if not keeps_running:
        gpu.paused = None  # the task has exited with the dump
        return
    if owned:
        try:
            async with _thawed(container, was_paused):
                await gpu.put_back(suspension, "checkpoint (leave running)")
        except RuntimeCommandError as exc:
            raise TTRPCError(Code.INTERNAL, f"checkpoint container {container.id}: the checkpoint is written "
                                            f"but thawing/freezing the paused container failed: {exc}") from exc


@asynccontextmanager
async def _thawed(container: "Container", active: bool) -> AsyncIterator[None]:
    """Thaw a paused container for driver calls (a frozen process cannot answer the driver's lock or
    restore) and freeze it again afterwards, also after a failure."""
    if not active:
        yield
        return
    await _thaw(container)
    try:
        yield
    finally:
        await _freeze(container)


async def _roll_back(container: "Container", gpu: ContainerGpu, suspension: Suspension, was_paused: bool,
                     cause: BaseException) -> None:
    """After a failed runtime checkpoint: thaw, put every CUDA process back, freeze again if it was
    paused. A failure here replaces the original error by one that says both."""
    problems = []
    try:
        if was_paused or _frozen(container):
            await _thaw(container)
    except RuntimeCommandError as exc:
        problems.append(f"thaw failed: {exc}")
    try:
        await gpu.put_back(suspension, "checkpoint rollback")
    except TTRPCError as exc:
        problems.append(exc.message)
    if was_paused:
        try:
            await _freeze(container)
        except RuntimeCommandError as exc:
            problems.append(f"freezing it again failed: {exc}")
    if problems:
        first = getattr(cause, "message", None) or str(cause)
        raise TTRPCError(Code.INTERNAL, f"checkpoint container {container.id} failed ({first}) and the rollback "
                                        f"failed too: " + "; ".join(problems)) from cause
    log.info("container %s: checkpoint failed; its %d CUDA process(es) were resumed", container.id,
             len(suspension.processes))


async def before_restore(container: "Container") -> Optional["Placement"]:
    """Before ``runc restore``: the GPU placement of the checkpointed CUDA processes (identity or
    remap), or TTRPCError(FAILED_PRECONDITION) when they cannot be restored onto the GPUs the new
    container's spec gives it. Nothing for an image without CUDA processes."""
    return await of(container).plan_restore(container.restore_from)


async def after_restore(container: "Container", gpu_map: Optional[Mapping] = None) -> None:
    """After ``runc restore``: resume the restored CUDA processes that are not running, with the GPU
    map `before_restore` decided (else the kybernate.io/gpu-map annotation's). On failure the
    restored task is killed and the error names the process and the CUDA error."""
    gpu = of(container)
    image_dir = container.restore_from
    record = read_record(image_dir) if image_dir else None
    try:
        if gpu_map is None:
            gpu_map = gpu.placement.gpu_map if gpu.placement is not None else gpu.settings().gpu_map
        resumed = await gpu.resume_restored(gpu_map)
    except BaseException:
        try:
            await container.runtime.kill(container.id, int(signal.SIGKILL), all=True)
        except RuntimeCommandError as exc:
            log.warning("container %s: kill after failed CUDA resume: %s", container.id, exc)
        raise
    if record and record.get("processes") and not resumed:
        log.info("container %s: %s lists %d CUDA process(es); none needed resuming", container.id,
                 RECORD_NAME, len(record["processes"]))


@asynccontextmanager
async def pausing(container: "Container") -> AsyncIterator[None]:
    """Around the runtime's pause (the freeze): suspend the CUDA processes first, so the VRAM is
    released; if the freeze fails they are resumed. Off with kybernate.io/gpu-pause: keep."""
    gpu = of(container)
    suspension = None
    if gpu.candidates() and gpu.settings().release_on_pause:
        suspension = await gpu.suspend("pause", "pause")
    try:
        yield
    except BaseException:
        if suspension is not None:
            await gpu.put_back(suspension, "pause rollback")
        raise
    gpu.paused = suspension


async def after_thaw(container: "Container") -> None:
    """After the runtime's resume (the thaw): resume what Pause suspended. If that fails the
    container is frozen again, so that it stays truthfully paused and Resume can be retried."""
    gpu = of(container)
    suspension = gpu.paused
    if suspension is None:
        return
    try:
        await gpu.put_back(suspension, "resume")
    except TTRPCError as exc:
        try:
            await _freeze(container)
            suffix = "; the container stays paused (Resume again to retry)"
        except RuntimeCommandError as freeze_exc:
            suffix = f"; freezing it again failed too ({freeze_exc}): it runs with CUDA suspended"
        raise TTRPCError(exc.code, exc.message + suffix) from exc
    gpu.paused = None
