"""Our cffi declarations against the real cuda.h: same sizes, same offsets, same enum values.

A struct declared one byte off would pass every stand-in test (the stand-in is ours too) and corrupt
the real driver's arguments, so the layouts are checked against NVIDIA's header where one is
installed (CUDA_HOME or /usr/local/cuda), and against the fixed numbers of the 64-bit ABI always.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cuda_bindings._ffi import ffi

FIELDS = {
    "CUuuid": ["bytes"],
    "CUcheckpointLockArgs": ["timeoutMs", "reserved0", "reserved1"],
    "CUcheckpointCheckpointArgs": ["reserved"],
    "CUcheckpointGpuPair": ["oldUuid", "newUuid"],
    "CUcheckpointRestoreArgs": ["gpuPairs", "gpuPairsCount", "reserved", "reserved1"],
    "CUcheckpointUnlockArgs": ["reserved"],
}
ENUM = ["CU_PROCESS_STATE_RUNNING", "CU_PROCESS_STATE_LOCKED", "CU_PROCESS_STATE_CHECKPOINTED",
        "CU_PROCESS_STATE_FAILED"]


def ours() -> dict[str, int]:
    numbers = {}
    for struct, fields in FIELDS.items():
        numbers[f"sizeof {struct}"] = ffi.sizeof(struct)
        for field in fields:
            numbers[f"offsetof {struct}.{field}"] = ffi.offsetof(struct, field)
    numbers["sizeof CUprocessState"] = ffi.sizeof("CUprocessState")
    numbers.update(ffi.typeof("CUprocessState").relements)
    return numbers


def test_lp64_numbers():
    got = ours()
    assert got["sizeof CUcheckpointLockArgs"] == 64
    assert got["offsetof CUcheckpointLockArgs.reserved1"] == 8
    assert got["sizeof CUcheckpointGpuPair"] == 32
    assert got["offsetof CUcheckpointGpuPair.newUuid"] == 16
    assert got["sizeof CUcheckpointRestoreArgs"] == 64
    assert got["offsetof CUcheckpointRestoreArgs.gpuPairsCount"] == 8
    assert got["offsetof CUcheckpointRestoreArgs.reserved"] == 12
    assert got["offsetof CUcheckpointRestoreArgs.reserved1"] == 56
    assert got["sizeof CUcheckpointUnlockArgs"] == got["sizeof CUcheckpointCheckpointArgs"] == 64
    assert [got[n] for n in ENUM] == [0, 1, 2, 3]


def _cuda_header() -> Path | None:
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda.h").exists():
            return Path(root) / "include"
    return None


def test_matches_installed_cuda_header(tmp_path):
    include = _cuda_header()
    cc = shutil.which("gcc") or shutil.which("cc")
    if include is None or cc is None:
        pytest.skip("no cuda.h (CUDA_HOME or /usr/local/cuda) or no C compiler here")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <cuda.h>', 'int main(void) {']
    for struct, fields in FIELDS.items():
        lines.append(f'printf("sizeof {struct} %zu\\n", sizeof({struct}));')
        for field in fields:
            lines.append(f'printf("offsetof {struct}.{field} %zu\\n", offsetof({struct}, {field}));')
    lines.append('printf("sizeof CUprocessState %zu\\n", sizeof(CUprocessState));')
    for name in ENUM:
        lines.append(f'printf("{name} %d\\n", (int){name});')
    lines.append('printf("CUDA_VERSION %d\\n", CUDA_VERSION); return 0; }')
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines) + "\n")
    subprocess.run([cc, f"-I{include}", "-o", str(tmp_path / "layout"), str(src)], check=True)
    out = subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True, check=True)
    theirs = {}
    for line in out.stdout.splitlines():
        key, _, value = line.rpartition(" ")
        theirs[key] = int(value)
    if theirs.pop("CUDA_VERSION") < 13000:
        pytest.skip("installed cuda.h predates CUDA 13 (no GPU remapping fields)")
    assert ours() == theirs
