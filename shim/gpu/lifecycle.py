"""The GPU layer: a container's CUDA processes around checkpoint, restore and pause.

Why it exists: CRIU cannot dump a process that holds GPU memory ("Can't handle non-regular mapping"
on the device VMA), and a frozen cgroup keeps its VRAM. The driver's checkpoint API moves a process's
device memory into its host memory and closes its device files (lock + checkpoint, "suspend"), and
brings it back (restore + unlock, "resume"). `GpuLayer` stacks these steps on the plain CRIU path
(`shim.checkpoint.layer`):

- checkpoint: suspend every CUDA process of the task in parallel, ``runc checkpoint``, then, when the
  task keeps running, put each process back as it was found. If anything fails after the first lock,
  every process is put back and the task thawed before the error is returned.
- restore: before ``runc restore`` the GPU placement (identity, remap, or refused before anything is
  created: `shim.gpu.placement`); after it, resume the CUDA processes the driver reports as locked or
  checkpointed (CRIU's CUDA plugin, where installed, may already have resumed some: never assume). A
  failure kills the restored task and names the process and the CUDA error.
- pause: suspend, then freeze (the VRAM is released); resume: thaw, then resume. The annotation
  ``kybernate.io/gpu-pause: keep`` turns that off per container.

What it costs a CPU-only task: one read of each of its processes' /proc/PID/maps. The driver (and
cffi, and cuda_bindings) is loaded only once some process of the container maps libcuda, and only
from the host (`shim.gpu.driver`). Every driver call runs in a thread, so the shim keeps serving
State, Pids and other containers meanwhile. The layer never imports the task package: it gets a
`TaskHandle` and nothing else.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional

from ttrpc.codes import Code
from ttrpc.errors import TTRPCError

from shim.checkpoint.layer import LifecycleLayer, TaskHandle
from shim.gpu import placement as gpu_placement
from shim.gpu.driver import describe, describe_failed, shared_loader
from shim.gpu.placement import NVIDIA_GPUS, NVIDIA_VERSION
from shim.gpu.procfs import PROC, gpu_minors, gpu_uuids_by_minor, mapped_libcuda, process_name
from shim.gpu.records import (RECORD_NAME, RecordError, SuspendedProcess, Suspension, has_record, read_record,
                              write_record)
from shim.gpu.settings import GpuSettings
from shim.runtime.runc import RuntimeCommandError

if TYPE_CHECKING:  # pragma: no cover
    from cuda_bindings import CudaDriver
    from shim.gpu.placement import Placement

log = logging.getLogger("kybernate.shim")
_FROM_SPEC = object()  # ContainerGpu.request: parse the spec (tests, and callers without a selection)


class ContainerGpu:
    """The CUDA processes of one container, and what the last Pause did to them.

    list_pids: every pid of the container (its cgroup, descendants included; raises when they cannot
    be listed); driver_loader() returns a CudaDriver (blocking). Both are parameters so unit tests can
    run this without containers.
    """

    def __init__(self, container_id: str, spec: Mapping, list_pids: Callable[[], list[int]],
                 driver_loader: Optional[Callable[[], "CudaDriver"]] = None, proc: Path = PROC,
                 gpus_dir: Path = NVIDIA_GPUS, version_file: Path = NVIDIA_VERSION, request=None):
        self.id = container_id
        # the GPUs the runtime selection granted (None: none); by default what the spec names
        self.request = _FROM_SPEC if request is None else request
        self.spec = spec
        self._list_pids = list_pids
        self._load = driver_loader or shared_loader()
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
        except Exception as exc:  # noqa: BLE001 - said, never taken for "no CUDA process"
            raise TTRPCError(Code.FAILED_PRECONDITION, f"container {self.id}: cannot list its processes to find "
                                                       f"the CUDA ones: {exc}") from exc
        return [pid for pid in pids if mapped_libcuda(pid, self.proc)]

    async def driver(self, what: str, pids: list[int]) -> "CudaDriver":
        from cuda_bindings import CudaBindingsError

        try:
            return await asyncio.to_thread(self._load)
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
        try:
            record = read_record(image_dir) if image_dir else None
        except RecordError as exc:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"restore container {self.id}: {exc}") from exc
        if not record or not record.get("processes"):
            return None
        from cuda_bindings import CudaBindingsError

        settings = self.settings()
        try:
            driver = await asyncio.to_thread(self._load)
        except CudaBindingsError as exc:
            raise TTRPCError(Code.FAILED_PRECONDITION,
                             f"restore container {self.id}: the checkpoint holds {len(record['processes'])} CUDA "
                             f"process(es) ({RECORD_NAME}) "
                             f"but the shim cannot use the CUDA driver here: {exc}") from exc
        host = await asyncio.to_thread(gpu_placement.host_gpus, driver, self.gpus_dir, self.version_file)
        request = gpu_placement.gpu_request(self.spec) if self.request is _FROM_SPEC else self.request
        placement = gpu_placement.decide(self.id, record, request, host,
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



# ---- the layer -----------------------------------------------------------------------------------
def task_pids(task: TaskHandle) -> list[int]:
    """Every pid of the task's cgroup; [] once its init is gone (nothing left to care about). A
    cgroup that cannot be read while the init lives raises: that is never "no CUDA process"."""
    pid = task.init_pid()
    if pid <= 0 or not (PROC / str(pid)).exists():
        return []
    from shim.cgroups import Cgroup

    pids = Cgroup.for_pid(pid).pids()
    return pids if pids else [pid]


def frozen(task: TaskHandle) -> bool:
    """Whether the task's cgroup is frozen (or freezing); an unreadable cgroup raises."""
    pid = task.init_pid()
    if pid <= 0:
        return False
    from shim.cgroups import Cgroup, FreezeState

    return Cgroup.for_pid(pid).freeze_state() in (FreezeState.FROZEN, FreezeState.FREEZING)


class GpuLayer:
    """CUDA suspend/resume stacked on an inner layer (the plain CRIU path, as a rule).

    One per container, made at Create (so a malformed GPU annotation refuses the Create); it keeps
    what the last Pause suspended (`paused`: the VRAM is in host RAM) and the placement decided
    before a restore."""

    name = "gpu"

    def __init__(self, inner: LifecycleLayer, task_id: str, spec: Mapping, *, libcuda: str = "",
                 gpu: Optional["ContainerGpu"] = None, list_pids: Optional[Callable[[], list[int]]] = None,
                 granted=_FROM_SPEC):
        self.inner = inner
        self._task_pids: Optional[Callable[[], list[int]]] = list_pids
        self.gpu = gpu or ContainerGpu(task_id, spec, self._pids, driver_loader=shared_loader(libcuda))
        if gpu is None:
            self.gpu.request = granted  # what the runtime selection granted, not what the spec claims
        self.gpu.settings()  # refuses a malformed annotation now, at Create
        self._task: Optional[TaskHandle] = None
        self._was_paused = False
        self._suspension: Optional[Suspension] = None  # suspended for the checkpoint in flight
        self._owned = False
        self._t0 = 0.0
        self._body_started = 0.0

    def _pids(self) -> list[int]:
        if self._task_pids is not None:
            return self._task_pids()
        return task_pids(self._task) if self._task is not None else []

    def _bind(self, task: TaskHandle) -> None:
        self._task = task

    @property
    def paused(self) -> Optional[Suspension]:
        return self.gpu.paused

    # -- create ---------------------------------------------------------------------------------
    def prepare(self, task: TaskHandle) -> None:
        """Load the driver in a background thread now, so that the first checkpoint or pause does not
        pay for dlopen + cuInit. A failure is left for that first use to report."""
        self._bind(task)
        self.inner.prepare(task)
        load = self.gpu._load
        if getattr(load, "loaded", False):
            return

        def head_start() -> None:
            try:
                load()
            except Exception as exc:  # noqa: BLE001 - only a head start; the real use reports
                log.info("container %s: CUDA driver not loaded ahead: %s", task.id, exc)

        threading.Thread(target=head_start, name="cuda-driver-load", daemon=True).start()

    # -- checkpoint -----------------------------------------------------------------------------
    async def before_checkpoint(self, task: TaskHandle, image_dir: str, keeps_running: bool,
                                was_paused: bool) -> None:
        """Suspend every CUDA process. A task paused by us (VRAM released) is already suspended. A
        task paused with its VRAM kept is thawed for the suspend and frozen again (a frozen process
        cannot answer the driver's lock)."""
        self._bind(task)
        await self.inner.before_checkpoint(task, image_dir, keeps_running, was_paused)
        gpu = self.gpu
        self._was_paused = was_paused
        self._t0 = time.perf_counter()
        suspension = gpu.paused
        self._owned = False
        if suspension is None:
            try:
                async with _Thawed(task, was_paused and bool(gpu.candidates())):
                    suspension = await gpu.suspend("checkpoint", "checkpoint")
            except RuntimeCommandError as exc:  # the thaw, or the freeze after the suspend
                if suspension is not None:
                    await gpu.put_back(suspension, "checkpoint rollback")
                raise TTRPCError(Code.INTERNAL, f"checkpoint container {task.id}: the paused container could "
                                                f"not be thawed for the CUDA suspend and frozen again: {exc}") from exc
            self._owned = suspension is not None
        self._suspension = suspension
        self._body_started = time.perf_counter()

    async def after_checkpoint(self, task: TaskHandle, image_dir: str, keeps_running: bool, was_paused: bool,
                               failure: Optional[BaseException]) -> None:
        suspension, self._suspension = self._suspension, None
        try:
            if suspension is None:
                return
            if failure is not None:
                if self._owned:
                    await _roll_back(task, self.gpu, suspension, was_paused, failure)
                return
            suspension.timings["runtime_checkpoint_s"] = round(time.perf_counter() - self._body_started, 6)
            suspension.timings["suspend_s"] = round(self._body_started - self._t0, 6)
            try:
                write_record(image_dir, suspension.record(task.id, {"keeps_running": keeps_running,
                                                                    "image_dir": image_dir}))
            except OSError as exc:
                log.warning("container %s: cannot write %s into %s: %s", task.id, RECORD_NAME, image_dir, exc)
            if not keeps_running:
                self.gpu.paused = None  # the task has exited with the dump
                return
            if self._owned:
                try:
                    async with _Thawed(task, was_paused):
                        await self.gpu.put_back(suspension, "checkpoint (leave running)")
                except RuntimeCommandError as exc:
                    raise TTRPCError(Code.INTERNAL, f"checkpoint container {task.id}: the checkpoint is written "
                                                    f"but thawing/freezing the paused container failed: {exc}") from exc
        finally:
            await self.inner.after_checkpoint(task, image_dir, keeps_running, was_paused, failure)

    # -- restore --------------------------------------------------------------------------------
    async def before_restore(self, task: TaskHandle, image_dir: str) -> None:
        """The GPU placement of the checkpointed CUDA processes (identity or remap), or
        TTRPCError(FAILED_PRECONDITION) before anything is created."""
        self._bind(task)
        await self.inner.before_restore(task, image_dir)
        await self.gpu.plan_restore(image_dir)

    async def after_restore(self, task: TaskHandle, image_dir: str) -> None:
        """Resume the restored CUDA processes that are not running, with the GPU map the placement
        decided (else the kybernate.io/gpu-map annotation's). On failure the restored task is killed
        (the caller then undoes the restore) and the error names the process and the CUDA error."""
        self._bind(task)
        gpu = self.gpu
        try:
            gpu_map = gpu.placement.gpu_map if gpu.placement is not None else gpu.settings().gpu_map
            resumed = await gpu.resume_restored(gpu_map)
        except BaseException:
            try:
                await task.runtime.kill(task.id, int(signal.SIGKILL), all=True)
            except RuntimeCommandError as exc:
                log.warning("container %s: kill after failed CUDA resume: %s", task.id, exc)
            raise
        if gpu.placement is not None and not resumed:
            log.info("container %s: %s lists CUDA process(es); none needed resuming", task.id, RECORD_NAME)
        await self.inner.after_restore(task, image_dir)

    # -- pause and resume -------------------------------------------------------------------------
    async def before_pause(self, task: TaskHandle) -> None:
        """Suspend the CUDA processes before the freeze, so the VRAM is released (unless
        kybernate.io/gpu-pause: keep)."""
        self._bind(task)
        await self.inner.before_pause(task)
        gpu = self.gpu
        self._suspension = None
        if gpu.settings().release_on_pause and gpu.candidates():
            self._suspension = await gpu.suspend("pause", "pause")

    async def after_pause(self, task: TaskHandle, failure: Optional[BaseException]) -> None:
        """The freeze failed: resume what was suspended. It worked: remember it for Resume."""
        suspension, self._suspension = self._suspension, None
        try:
            if failure is not None:
                if suspension is not None:
                    await self.gpu.put_back(suspension, "pause rollback")
                return
            self.gpu.paused = suspension
        finally:
            await self.inner.after_pause(task, failure)

    async def after_resume(self, task: TaskHandle) -> None:
        """After the thaw: resume what Pause suspended. If that fails the container is frozen again,
        so that it stays truthfully paused and Resume can be retried."""
        self._bind(task)
        suspension = self.gpu.paused
        if suspension is not None:
            try:
                await self.gpu.put_back(suspension, "resume")
            except TTRPCError as exc:
                try:
                    await task.runtime.pause(task.id)
                    suffix = "; the container stays paused (Resume again to retry)"
                except RuntimeCommandError as freeze_exc:
                    suffix = f"; freezing it again failed too ({freeze_exc}): it runs with CUDA suspended"
                raise TTRPCError(exc.code, exc.message + suffix) from exc
            self.gpu.paused = None
        await self.inner.after_resume(task)


class _Thawed:
    """Thaw a paused container for driver calls (a frozen process cannot answer the driver's lock or
    restore) and freeze it again afterwards, also after a failure."""

    def __init__(self, task: TaskHandle, active: bool):
        self.task, self.active = task, active

    async def __aenter__(self) -> None:
        if self.active:
            await self.task.runtime.resume(self.task.id)

    async def __aexit__(self, *exc) -> None:
        if self.active:
            await self.task.runtime.pause(self.task.id)



async def _roll_back(task: TaskHandle, gpu: "ContainerGpu", suspension: Suspension, was_paused: bool,
                     cause: BaseException) -> None:
    """After a failed runtime checkpoint: thaw, put every CUDA process back, freeze again if it was
    paused. A failure here replaces the original error by one that says both."""
    problems = []
    try:
        if was_paused or frozen(task):
            await task.runtime.resume(task.id)
    except (RuntimeCommandError, OSError) as exc:
        problems.append(f"thaw failed: {exc}")
    try:
        await gpu.put_back(suspension, "checkpoint rollback")
    except TTRPCError as exc:
        problems.append(exc.message)
    if was_paused:
        try:
            await task.runtime.pause(task.id)
        except RuntimeCommandError as exc:
            problems.append(f"freezing it again failed: {exc}")
    if problems:
        first = getattr(cause, "message", None) or str(cause)
        raise TTRPCError(Code.INTERNAL, f"checkpoint container {task.id} failed ({first}) and the rollback "
                                        f"failed too: " + "; ".join(problems)) from cause
    log.info("container %s: checkpoint failed; its %d CUDA process(es) were resumed", task.id,
             len(suspension.processes))


def stack(inner: LifecycleLayer, task_id: str, spec: Mapping, *, has_gpus: bool, restore_image: str = "",
          libcuda: str = "", node_has_driver: Optional[bool] = None, granted=_FROM_SPEC) -> LifecycleLayer:
    """The container's layers, chosen once at Create: the GPU layer on top of `inner` when the
    container has GPUs (its spec, as the runtime selection read it), restores an image with a GPU
    record, or the node has a CUDA driver (a process may still map it: the layer then costs one read
    of /proc/PID/maps per process and operation); else `inner` alone. `granted`: the GPU request the
    runtime selection granted (None: no GPUs); placement at restore uses it, never an env value the
    node did not accept."""
    if node_has_driver is None:
        node_has_driver = bool(libcuda) or NVIDIA_VERSION.exists()
    if has_gpus or node_has_driver or (restore_image and has_record(restore_image)):
        return GpuLayer(inner, task_id, spec, libcuda=libcuda, granted=granted)
    return inner
