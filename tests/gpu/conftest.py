"""Fixtures for tests on a real NVIDIA GPU: skipped where there is no libcuda, no GPU, or no workload.

KYBERNATE_WORKLOAD names a prebuilt workload binary (tests/gpu/device_cuda.sh builds one); otherwise
it is built here with nvcc. KYB_GPU_REPORT, if set, names a JSON-lines file each test appends its
measurements and the driver's answers to, so a run leaves numbers and not only pass/fail.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_workload, shared with bench/
import gpu_workload  # noqa: E402


@pytest.fixture(scope="session")
def driver():
    from cuda_bindings import CudaBindingsError, CudaDriver
    try:
        drv = CudaDriver()
        count = drv.device_count()
    except CudaBindingsError as exc:
        pytest.skip(f"no usable CUDA driver here: {exc}")
    if count == 0 or shutil.which("nvidia-smi") is None:
        pytest.skip("no GPU (or no nvidia-smi) here")
    drv.require_checkpoint_api()  # a GPU node with a too old driver should fail loudly, not skip
    return drv


@pytest.fixture(scope="session")
def workload_binary(driver, tmp_path_factory):
    found = gpu_workload.find_binary()
    if found:
        return found
    if not (shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")):
        pytest.skip("no workload binary ($KYBERNATE_WORKLOAD) and no nvcc to build one")
    return gpu_workload.build(tmp_path_factory.mktemp("workload"))


@pytest.fixture
def spawn(workload_binary):
    """spawn(nbytes, **env) -> a started Workload; all are killed after the test."""
    started: list[gpu_workload.Workload] = []

    def start(nbytes: int, device: int = 0, **env: str) -> gpu_workload.Workload:
        w = gpu_workload.Workload(workload_binary, nbytes, device, env)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


@pytest.fixture
def report(request):
    """report(**fields): append one JSON line (with the test's name) to $KYB_GPU_REPORT."""
    path = os.environ.get("KYB_GPU_REPORT")

    def write(**fields) -> None:
        line = json.dumps({"test": request.node.name, **fields}, default=str)
        print(line)
        if path:
            with open(path, "a") as f:
                f.write(line + "\n")

    return write
