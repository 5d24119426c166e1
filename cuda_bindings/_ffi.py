"""cffi declarations of the part of libcuda we call, in ABI mode (no compiler at install time).

The structs are written as the driver's cuda.h (CUDA 13.0) defines them; tests compare their sizes and
offsets against the real header where one is installed. Two deliberate simplifications, both
ABI-identical: CUresult is declared as int (we ask the driver for error names rather than copy its
enum), and CUcheckpointRestoreArgs.reserved is sized by the same expression cuda.h uses,
52 - sizeof(CUcheckpointGpuPair *), evaluated here because cdef cannot take sizeof.
"""
from __future__ import annotations

import os

from cffi import FFI

from .errors import DriverMissing

DEFAULT_LIBRARY = "libcuda.so.1"
LIBRARY_ENV = "KYBERNATE_LIBCUDA"

_POINTER_SIZE = FFI().sizeof("void *")

CDEF = """
typedef int CUresult;
typedef int CUdevice;
typedef uint64_t cuuint64_t;

typedef struct CUuuid_st {
    char bytes[16];
} CUuuid;

typedef enum CUprocessState_enum {
    CU_PROCESS_STATE_RUNNING = 0,
    CU_PROCESS_STATE_LOCKED = 1,
    CU_PROCESS_STATE_CHECKPOINTED = 2,
    CU_PROCESS_STATE_FAILED = 3
} CUprocessState;

typedef struct CUcheckpointLockArgs_st {
    unsigned int timeoutMs;
    unsigned int reserved0;
    cuuint64_t reserved1[7];
} CUcheckpointLockArgs;

typedef struct CUcheckpointCheckpointArgs_st {
    cuuint64_t reserved[8];
} CUcheckpointCheckpointArgs;

typedef struct CUcheckpointGpuPair_st {
    CUuuid oldUuid;
    CUuuid newUuid;
} CUcheckpointGpuPair;

typedef struct CUcheckpointRestoreArgs_st {
    CUcheckpointGpuPair *gpuPairs;
    unsigned int gpuPairsCount;
    char reserved[%(restore_reserved)d];
    cuuint64_t reserved1;
} CUcheckpointRestoreArgs;

typedef struct CUcheckpointUnlockArgs_st {
    cuuint64_t reserved[8];
} CUcheckpointUnlockArgs;

CUresult cuInit(unsigned int Flags);
CUresult cuDriverGetVersion(int *driverVersion);
CUresult cuGetErrorName(CUresult error, const char **pStr);
CUresult cuGetErrorString(CUresult error, const char **pStr);

CUresult cuDeviceGetCount(int *count);
CUresult cuDeviceGet(CUdevice *device, int ordinal);
CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice dev);
CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice dev);
CUresult cuDeviceGetName(char *name, int len, CUdevice dev);

CUresult cuCheckpointProcessGetRestoreThreadId(int pid, int *tid);
CUresult cuCheckpointProcessGetState(int pid, CUprocessState *state);
CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args);
CUresult cuCheckpointProcessCheckpoint(int pid, CUcheckpointCheckpointArgs *args);
CUresult cuCheckpointProcessRestore(int pid, CUcheckpointRestoreArgs *args);
CUresult cuCheckpointProcessUnlock(int pid, CUcheckpointUnlockArgs *args);
""" % {"restore_reserved": 52 - _POINTER_SIZE}

CHECKPOINT_SYMBOLS = (
    "cuCheckpointProcessGetRestoreThreadId",
    "cuCheckpointProcessGetState",
    "cuCheckpointProcessLock",
    "cuCheckpointProcessCheckpoint",
    "cuCheckpointProcessRestore",
    "cuCheckpointProcessUnlock",
)

ffi = FFI()
ffi.cdef(CDEF)


def library_path(explicit: str | os.PathLike | None = None) -> str:
    """Which library to load: the argument, else $KYBERNATE_LIBCUDA, else the loader's libcuda.so.1."""
    if explicit:
        return os.fspath(explicit)
    return os.environ.get(LIBRARY_ENV) or DEFAULT_LIBRARY


def open_library(path: str):
    """dlopen the driver; a failure becomes DriverMissing with the loader's reason."""
    try:
        return ffi.dlopen(path)
    except OSError as exc:
        raise DriverMissing(path, str(exc)) from None


def symbol(lib, name: str):
    """The function `name` of `lib`, or None where this driver does not export it."""
    try:
        return getattr(lib, name)
    except AttributeError:
        return None
