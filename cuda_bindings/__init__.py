"""cffi (ABI mode) binding of libcuda's process checkpoint API, for checkpointing GPU containers.

CudaDriver is the typed API; discover() finds the CUDA processes of a container; suspend_all and
resume_all act on many processes in parallel with rollback. Nothing here knows about containers.
"""
from .batch import BatchResult, ProcessOutcome, resume_all, suspend_all
from .discovery import CudaProcess, cgroup_dir_of, cgroup_pids, discover, discover_cgroup
from .driver import CudaDriver, ProcessState, Transition, format_uuid, parse_uuid
from .errors import (BatchFailed, CudaBindingsError, CudaError, DriverMissing, DriverTooOld,
                     NotACudaProcess, ProcessFailed)
from .procfs import ProcEvidence

__all__ = [
    "BatchFailed", "BatchResult", "CudaBindingsError", "CudaDriver", "CudaError", "CudaProcess",
    "DriverMissing", "DriverTooOld", "NotACudaProcess", "ProcEvidence", "ProcessFailed",
    "ProcessOutcome", "ProcessState", "Transition", "cgroup_dir_of", "cgroup_pids", "discover",
    "discover_cgroup", "format_uuid", "parse_uuid", "resume_all", "suspend_all",
]
