"""The CUDA driver, loaded once per shim, only when needed, and only from the host.

Why only from the host: the shim runs as root in the host's namespaces; a library it dlopens runs
as root. A container process controls what it maps and an image controls its GPU record, so neither
may name the library (the path a process maps, /proc/PID/root/..., a path in kybernate-gpu.json are
never loaded). The candidates, in order: the node config's ``gpu.libcuda`` (or KYBERNATE_LIBCUDA in
the shim's environment, which containerd hands it), the dynamic loader's libcuda.so.1, then the
driver's well-known host directories, each only if root owns the file and its directory and neither
is writable by group or others.

Every driver call blocks (a 2 GiB checkpoint takes a second or more): callers run it in a thread.
"""
from __future__ import annotations

import logging
import os
import stat
import threading
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # pragma: no cover
    from cuda_bindings import CudaDriver

log = logging.getLogger("kybernate.shim")

#: where NVIDIA's installers and the GPU Operator put libcuda.so.1 on the host
WELL_KNOWN_DIRS = ("/usr/local/nvidia/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib/aarch64-linux-gnu",
                   "/run/nvidia/driver/usr/lib/x86_64-linux-gnu")
LIBCUDA = "libcuda.so.1"


def root_owned(path: str) -> bool:
    """The file and its directory belong to root and nobody else may write them."""
    try:
        for p in (path, os.path.dirname(path)):
            st = os.stat(p)
            if st.st_uid != 0 or st.st_mode & 0o022:
                return False
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


class DriverLoader:
    """Loads the CudaDriver once (a success is cached; a failure is retried on the next use)."""

    def __init__(self, libcuda: str = ""):
        self.libcuda = libcuda  # the node's explicit path ("" = the loader, then the well-known dirs)
        self._driver: Optional["CudaDriver"] = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._driver is not None

    def __call__(self) -> "CudaDriver":
        with self._lock:
            if self._driver is None:
                self._driver = self._load()
            return self._driver

    def _load(self) -> "CudaDriver":
        from cuda_bindings import CudaDriver, DriverMissing

        if self.libcuda:  # the node named it: no fallback to anything else
            driver = CudaDriver(self.libcuda)
            log.info("CUDA driver loaded from %s (node config)", self.libcuda)
            return driver
        try:
            return CudaDriver(LIBCUDA)
        except DriverMissing as exc:
            first = exc
        for directory in WELL_KNOWN_DIRS:
            candidate = os.path.join(directory, LIBCUDA)
            if os.path.exists(candidate) and root_owned(candidate):
                try:
                    driver = CudaDriver(candidate)
                except DriverMissing:
                    continue
                log.info("CUDA driver loaded from %s (a well-known driver directory)", candidate)
                return driver
        raise first


_loaders: dict[str, DriverLoader] = {}
_loaders_lock = threading.Lock()


def shared_loader(libcuda: str = "") -> DriverLoader:
    """The shim process's one loader for this libcuda setting (a driver is dlopen'd once per process)."""
    with _loaders_lock:
        loader = _loaders.get(libcuda)
        if loader is None:
            loader = _loaders[libcuda] = DriverLoader(libcuda)
        return loader


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


def describe_failed(pid: int) -> str:
    from cuda_bindings import ProcessFailed
    return describe(ProcessFailed(pid))
