"""Typed API over libcuda's process checkpoint calls: CudaDriver.

Each primitive (lock, checkpoint, restore, unlock) is one driver call with its argument struct built
the way cuda.h defines it. On top sits `settle(pid, target)`, which reads the process's state and does
only the missing steps towards the target: suspend and resume are settle to CHECKPOINTED and to
RUNNING, so they are safe to retry from any state. That matters because CRIU's own CUDA plugin may
already have restored (or left checkpointed) a process before the shim looks at it.
"""
from __future__ import annotations

import enum
import time
import uuid as uuidlib
from dataclasses import dataclass
from typing import Mapping, Union

from . import _ffi, procfs
from .errors import (CHECKPOINT_API_VERSION, GPU_REMAP_API_VERSION, CudaBindingsError, CudaError,
                     DriverTooOld, NotACudaProcess, ProcessFailed)

ffi = _ffi.ffi
# Types resolved once: ffi.new("...") would parse the string again at every call.
_INT_P = ffi.typeof("int *")
_STATE_P = ffi.typeof("CUprocessState *")
_LOCK_ARGS_P = ffi.typeof("CUcheckpointLockArgs *")

CUDA_SUCCESS = 0
CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_NOT_INITIALIZED = 3
CUDA_ERROR_NOT_FOUND = 500
# Lock timeout unless the caller names one. cuda.h's 0 means "wait forever": a process stuck in a long
# kernel would then hang the shim's checkpoint request with it, so we never default to that.
DEFAULT_LOCK_TIMEOUT_MS = 10_000
# Answers of the driver that mean "this pid has no CUDA state to act on".
NOT_A_CUDA_PROCESS_RESULTS = frozenset({CUDA_ERROR_NOT_INITIALIZED, CUDA_ERROR_NOT_FOUND})


class ProcessState(enum.IntEnum):
    """CUprocessState as cuda.h numbers it."""

    RUNNING = 0
    LOCKED = 1
    CHECKPOINTED = 2
    FAILED = 3

    @property
    def label(self) -> str:
        return self.name.lower()


_STATES = tuple(ProcessState)  # index = CUprocessState value

# One step along RUNNING <-> LOCKED <-> CHECKPOINTED: (state, direction) -> (call, next state).
_STEP = {
    (ProcessState.RUNNING, 1): ("lock", ProcessState.LOCKED),
    (ProcessState.LOCKED, 1): ("checkpoint", ProcessState.CHECKPOINTED),
    (ProcessState.CHECKPOINTED, -1): ("restore", ProcessState.LOCKED),
    (ProcessState.LOCKED, -1): ("unlock", ProcessState.RUNNING),
}

UuidLike = Union[str, bytes, uuidlib.UUID]
GpuMap = Mapping[UuidLike, UuidLike]


def parse_uuid(value: UuidLike) -> bytes:
    """'GPU-1a2b...'/'1a2b...' (nvidia-smi's form, prefix optional), 16 bytes, or a UUID -> 16 bytes."""
    if isinstance(value, uuidlib.UUID):
        return value.bytes
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 16:
            raise ValueError(f"a GPU UUID has 16 bytes, not {len(value)}")
        return bytes(value)
    text = value.strip()
    if text.upper().startswith("GPU-"):
        text = text[4:]
    try:
        return uuidlib.UUID(text).bytes
    except ValueError:
        raise ValueError(f"not a GPU UUID: {value!r}") from None


def format_uuid(raw: bytes) -> str:
    """16 bytes -> 'GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx', as nvidia-smi prints it."""
    return "GPU-" + str(uuidlib.UUID(bytes=bytes(raw)))


@dataclass(frozen=True)
class Transition:
    """What settle (suspend/resume) found, left, and did; seconds is the whole call's duration."""

    pid: int
    before: ProcessState
    after: ProcessState
    steps: tuple[str, ...]
    seconds: float


def _refuse(make_error):
    """Stands in for a checkpoint function this driver lacks: every call raises make_error()."""
    def call(*_args):
        raise make_error()
    return call


class CudaDriver:
    """One loaded libcuda. Thread-safe: every method is one or a few independent driver calls.

    libpath: path of libcuda (default $KYBERNATE_LIBCUDA, else the loader's libcuda.so.1).
    Raises DriverMissing where the library cannot be loaded, CudaError where cuInit fails; a driver
    older than the checkpoint API loads fine (driver_version() and devices work) and raises
    DriverTooOld at the first checkpoint call.
    """

    def __init__(self, libpath: str | None = None):
        self.path = _ffi.library_path(libpath)
        self._lib = _ffi.open_library(self.path)
        self._version = self._read_version()
        missing = tuple(n for n in _ffi.CHECKPOINT_SYMBOLS if _ffi.symbol(self._lib, n) is None)
        self.checkpoint_supported = not missing and self._version >= CHECKPOINT_API_VERSION
        self._missing = missing
        for name in _ffi.CHECKPOINT_SYMBOLS:
            fn = _ffi.symbol(self._lib, name) if self.checkpoint_supported else _refuse(self._too_old)
            setattr(self, "_" + name, fn)
        self._uuid_fn = (_ffi.symbol(self._lib, "cuDeviceGetUuid_v2")
                         or _ffi.symbol(self._lib, "cuDeviceGetUuid"))
        # The driver must be initialised in the calling process before restore (cuda.h).
        self._check(self._lib.cuInit(0), "cuInit")

    # ---- version and errors -------------------------------------------------------------------
    def _read_version(self) -> int:
        out = ffi.new("int *")
        self._check(self._lib.cuDriverGetVersion(out), "cuDriverGetVersion")
        return out[0]

    def driver_version(self) -> int:
        """The driver's CUDA API version, 1000 * major + 10 * minor (13000 for CUDA 13.0)."""
        return self._version

    def _too_old(self) -> DriverTooOld:
        return DriverTooOld("the CUDA checkpoint API (cuCheckpointProcess*)", CHECKPOINT_API_VERSION,
                            self._version, self._missing)

    def require_checkpoint_api(self) -> None:
        """Raise DriverTooOld now rather than at the first call (for start-up checks)."""
        if not self.checkpoint_supported:
            raise self._too_old()

    def error(self, result: int, call: str | None = None, pid: int | None = None) -> CudaError:
        """A CudaError with the driver's own name and text for `result`."""
        text_ptr = ffi.new("const char **")
        name = f"CUresult {result}"
        text = "unrecognized error code"
        if self._lib.cuGetErrorName(result, text_ptr) == CUDA_SUCCESS and text_ptr[0] != ffi.NULL:
            name = ffi.string(text_ptr[0]).decode(errors="replace")
        if self._lib.cuGetErrorString(result, text_ptr) == CUDA_SUCCESS and text_ptr[0] != ffi.NULL:
            text = ffi.string(text_ptr[0]).decode(errors="replace")
        return CudaError(result, name, text, call, pid)

    def _check(self, result: int, call: str, pid: int | None = None) -> None:
        if result == CUDA_SUCCESS:
            return
        err = self.error(result, call, pid)
        if pid is not None:
            if not procfs.pid_exists(pid):
                raise NotACudaProcess(pid, "no such process", err)
            if result in NOT_A_CUDA_PROCESS_RESULTS:
                raise NotACudaProcess(pid, f"the driver answers {err.name}", err)
            if result == CUDA_ERROR_INVALID_VALUE and not procfs.maps_libcuda(pid):
                raise NotACudaProcess(pid, f"the driver answers {err.name} and the process does "
                                           "not map libcuda", err)
        raise err

    @staticmethod
    def _valid_pid(pid: int) -> int:
        if isinstance(pid, bool) or not isinstance(pid, int):
            raise TypeError(f"pid must be an int, not {type(pid).__name__}")
        if pid <= 0:
            raise NotACudaProcess(pid, "not a valid pid")
        return pid

    # ---- one driver call each ------------------------------------------------------------------
    def state(self, pid: int) -> ProcessState:
        """The driver's view of the process: RUNNING, LOCKED, CHECKPOINTED or FAILED."""
        out = ffi.new(_STATE_P)
        self._check(self._cuCheckpointProcessGetState(self._valid_pid(pid), out),
                    "cuCheckpointProcessGetState", pid)
        value = out[0]
        if not 0 <= value < len(_STATES):
            raise CudaBindingsError(f"pid {pid}: the driver reports unknown state {value}")
        return _STATES[value]

    def lock(self, pid: int, timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS) -> None:
        """Block the process's further CUDA calls; timeout_ms 0 waits forever (cuda.h).

        On a timeout the driver leaves the process RUNNING."""
        if not 0 <= timeout_ms <= 0xFFFFFFFF:
            raise ValueError(f"timeout_ms must fit an unsigned int, not {timeout_ms}")
        args = ffi.new(_LOCK_ARGS_P)
        args.timeoutMs = timeout_ms
        self._check(self._cuCheckpointProcessLock(self._valid_pid(pid), args),
                    "cuCheckpointProcessLock", pid)

    def checkpoint(self, pid: int) -> None:
        """Copy a LOCKED process's device memory to its host memory and release the GPU."""
        self._check(self._cuCheckpointProcessCheckpoint(self._valid_pid(pid), ffi.NULL),
                    "cuCheckpointProcessCheckpoint", pid)

    def restore(self, pid: int, gpu_map: GpuMap | None = None) -> None:
        """Bring a CHECKPOINTED process's memory back (it stays LOCKED until unlock).

        gpu_map {old_uuid: new_uuid} remaps GPUs; the driver wants every checkpointed GPU in it.
        Drivers before CUDA 13.0 have no such argument: DriverTooOld, rather than silently ignoring it.
        """
        pid = self._valid_pid(pid)
        if not gpu_map:
            self._check(self._cuCheckpointProcessRestore(pid, ffi.NULL),
                        "cuCheckpointProcessRestore", pid)
            return
        if self._version < GPU_REMAP_API_VERSION:
            raise DriverTooOld("GPU remapping at restore (CUcheckpointRestoreArgs.gpuPairs)",
                               GPU_REMAP_API_VERSION, self._version)
        pairs = ffi.new("CUcheckpointGpuPair[]", len(gpu_map))
        for pair, (old, new) in zip(pairs, gpu_map.items()):
            ffi.memmove(pair.oldUuid.bytes, parse_uuid(old), 16)
            ffi.memmove(pair.newUuid.bytes, parse_uuid(new), 16)
        args = ffi.new("CUcheckpointRestoreArgs *")
        args.gpuPairs = pairs
        args.gpuPairsCount = len(gpu_map)
        self._check(self._cuCheckpointProcessRestore(pid, args), "cuCheckpointProcessRestore", pid)

    def unlock(self, pid: int) -> None:
        """Let a LOCKED process make CUDA calls again."""
        self._check(self._cuCheckpointProcessUnlock(self._valid_pid(pid), ffi.NULL),
                    "cuCheckpointProcessUnlock", pid)

    def restore_thread_id(self, pid: int) -> int:
        """The tid of the process's CUDA restore thread (CRIU must not freeze it before restore)."""
        out = ffi.new(_INT_P)
        self._check(self._cuCheckpointProcessGetRestoreThreadId(self._valid_pid(pid), out),
                    "cuCheckpointProcessGetRestoreThreadId", pid)
        return out[0]

    # ---- whole-process helpers -----------------------------------------------------------------
    def settle(self, pid: int, target: ProcessState, timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS,
               gpu_map: GpuMap | None = None, current: ProcessState | None = None,
               progress: list[str] | None = None) -> Transition:
        """Move the process to `target` doing only the missing steps; return what was done.

        current: the state if the caller just read it (saves one driver call). progress: a list the
        completed steps are appended to as they happen, so a caller still knows them after a failure.
        """
        if target is ProcessState.FAILED:
            raise ValueError("FAILED is not a state to move a process to")
        started = time.perf_counter()
        before = self.state(pid) if current is None else current
        if before is ProcessState.FAILED:
            raise ProcessFailed(pid)
        steps: list[str] = [] if progress is None else progress
        first = len(steps)
        calls = {"lock": lambda: self.lock(pid, timeout_ms), "checkpoint": lambda: self.checkpoint(pid),
                 "restore": lambda: self.restore(pid, gpu_map), "unlock": lambda: self.unlock(pid)}
        state = before
        while state is not target:
            step, state_after = _STEP[state, 1 if state < target else -1]
            calls[step]()
            steps.append(step)
            state = state_after
        return Transition(pid, before, state, tuple(steps[first:]),
                          time.perf_counter() - started)

    def suspend(self, pid: int, timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS) -> Transition:
        """Lock and checkpoint, skipping what is already done: safe to retry from any state."""
        return self.settle(pid, ProcessState.CHECKPOINTED, timeout_ms=timeout_ms)

    def resume(self, pid: int, gpu_map: GpuMap | None = None) -> Transition:
        """Restore and unlock, skipping what is already done: safe to retry from any state."""
        return self.settle(pid, ProcessState.RUNNING, gpu_map=gpu_map)

    # ---- devices -------------------------------------------------------------------------------
    def device_count(self) -> int:
        out = ffi.new("int *")
        self._check(self._lib.cuDeviceGetCount(out), "cuDeviceGetCount")
        return out[0]

    def device_uuid(self, ordinal: int) -> str:
        """UUID of device `ordinal` in nvidia-smi's form ('GPU-...'): the keys of a gpu_map."""
        dev = ffi.new("CUdevice *")
        self._check(self._lib.cuDeviceGet(dev, ordinal), "cuDeviceGet")
        out = ffi.new("CUuuid *")
        self._check(self._uuid_fn(out, dev[0]), "cuDeviceGetUuid_v2")
        return format_uuid(ffi.buffer(out.bytes, 16)[:])

    def device_uuids(self) -> list[str]:
        return [self.device_uuid(i) for i in range(self.device_count())]

    def device_name(self, ordinal: int) -> str:
        """The device's model name as the driver reports it ('NVIDIA H100 80GB HBM3')."""
        dev = ffi.new("CUdevice *")
        self._check(self._lib.cuDeviceGet(dev, ordinal), "cuDeviceGet")
        buf = ffi.new("char[]", 256)
        self._check(self._lib.cuDeviceGetName(buf, 256, dev[0]), "cuDeviceGetName")
        return ffi.string(buf).decode(errors="replace")

    def devices(self) -> list[tuple[str, str]]:
        """(UUID, model name) of every device, in the driver's order."""
        return [(self.device_uuid(i), self.device_name(i)) for i in range(self.device_count())]
