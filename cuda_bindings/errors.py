"""Exceptions of cuda_bindings: one base class, one class per condition a caller must tell apart.

Why separate classes: the shim reacts differently to each. A missing or too old driver means "this node
cannot checkpoint GPU containers" (refuse the request, say why); a pid without CUDA is simply skipped
during discovery; a CudaError during suspend means "roll back and report the driver's words".
"""
from __future__ import annotations

# The driver API version that introduced cuCheckpointProcess* (CUDA 12.8, driver branch r570), and the
# one whose CUcheckpointRestoreArgs gained gpuPairs/gpuPairsCount (CUDA 13.0, driver branch r580).
# cuda.h carries no history comments; these numbers come from NVIDIA's release documentation.
CHECKPOINT_API_VERSION = 12080
GPU_REMAP_API_VERSION = 13000


def format_version(version: int | None) -> str:
    """12080 -> '12.8' (the driver reports 1000 * major + 10 * minor)."""
    if version is None:
        return "unknown"
    return f"{version // 1000}.{(version % 1000) // 10}"


class CudaBindingsError(Exception):
    """Base of every error this package raises on purpose."""


class CudaError(CudaBindingsError):
    """A CUDA driver call returned something other than CUDA_SUCCESS.

    Carries the CUresult number, the driver's own name and text for it (cuGetErrorName /
    cuGetErrorString), and which call on which pid failed, so logs need no second lookup.
    """

    def __init__(self, result: int, name: str, text: str, call: str | None = None,
                 pid: int | None = None):
        self.result = result
        self.name = name
        self.text = text
        self.call = call
        self.pid = pid
        where = ""
        if call:
            where = f"{call}(pid {pid}): " if pid is not None else f"{call}: "
        super().__init__(f"{where}{name} ({result}): {text}")

    def to_dict(self) -> dict:
        return {"type": "CudaError", "result": self.result, "name": self.name, "text": self.text,
                "call": self.call, "pid": self.pid}


class DriverMissing(CudaBindingsError):
    """libcuda.so.1 could not be loaded: no NVIDIA driver on this node, or a wrong path given."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"cannot load the CUDA driver library {path!r}: {reason} "
                         "(install the NVIDIA driver, or point KYBERNATE_LIBCUDA at libcuda.so.1)")

    def to_dict(self) -> dict:
        return {"type": "DriverMissing", "path": self.path, "reason": self.reason}


class DriverTooOld(CudaBindingsError):
    """The driver lacks a feature we need; the message names the version that has it."""

    def __init__(self, feature: str, needed: int, found: int | None, missing: tuple[str, ...] = ()):
        self.feature = feature
        self.needed = needed
        self.found = found
        self.missing = missing
        lacks = f" (it lacks {', '.join(missing)})" if missing else ""
        super().__init__(f"{feature} needs CUDA driver API {format_version(needed)} or newer "
                         f"({needed}); this driver reports {format_version(found)} ({found}){lacks}")

    def to_dict(self) -> dict:
        return {"type": "DriverTooOld", "feature": self.feature, "needed": self.needed,
                "found": self.found, "missing": list(self.missing)}


class NotACudaProcess(CudaBindingsError):
    """The pid does not exist, or the driver says it holds no CUDA state to lock or checkpoint."""

    def __init__(self, pid: int, reason: str, cuda_error: CudaError | None = None):
        self.pid = pid
        self.reason = reason
        self.cuda_error = cuda_error
        super().__init__(f"pid {pid} is not a CUDA process: {reason}")

    def to_dict(self) -> dict:
        return {"type": "NotACudaProcess", "pid": self.pid, "reason": self.reason,
                "cuda_error": self.cuda_error.to_dict() if self.cuda_error else None}


class ProcessFailed(CudaBindingsError):
    """The driver reports CU_PROCESS_STATE_FAILED: an uncorrectable error during checkpoint/restore.

    No step we could take brings such a process back, so suspend/resume stop and say so.
    """

    def __init__(self, pid: int):
        self.pid = pid
        super().__init__(f"pid {pid}: the CUDA driver reports the process FAILED "
                         "(uncorrectable error during an earlier checkpoint or restore)")

    def to_dict(self) -> dict:
        return {"type": "ProcessFailed", "pid": self.pid}


class BatchFailed(CudaBindingsError):
    """A parallel suspend/resume had failures; carries the whole BatchResult."""

    def __init__(self, result):
        self.result = result
        pid, error = result.first_failure
        super().__init__(f"{result.operation} of {len(result.outcomes)} process(es) failed at pid "
                         f"{pid}: {error}" + ("" if result.rollback_ok else "; rollback incomplete"))


def error_dict(error: BaseException | None) -> dict | None:
    """JSON-ready form of an error (ours carry structure; anything else its text)."""
    if error is None:
        return None
    to_dict = getattr(error, "to_dict", None)
    if to_dict is not None:
        return to_dict()
    return {"type": type(error).__name__, "text": str(error)}
