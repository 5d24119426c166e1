"""GPU readings: NVML's answers turned into a Reading (with a stand-in pynvml module: the calls and
their error codes as nvidia-ml-py gives them), and the file stand-in's model of a paused container."""
from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest

from broker.readings import FileReadings, NvmlReadings, frozen

GiB = 1 << 30


class FakeNvml(types.ModuleType):
    NVML_SUCCESS = 0
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NOT_FOUND = 6

    class NVMLError(Exception):
        def __init__(self, value):
            self.value = value
            super().__init__(f"NVML error {value}")

    def __init__(self):
        super().__init__("pynvml")
        self.devices = {0: "GPU-aaa", 1: "GPU-bbb"}
        self.procs = {0: [(10, 2 * GiB), (11, None)], 1: [(20, GiB)]}
        self.samples = {0: [(10, 1_000, 0, 0), (11, 2_000, 35, 0)], 1: "unsupported"}
        self.device_util = {1: 50}
        self.asked_since = []
        self.shut = False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return self.devices[h].encode()

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(total=80 * GiB, free=(80 - 3 * (h + 1)) * GiB)

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [types.SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in self.procs[h]]

    def nvmlDeviceGetProcessUtilization(self, h, since):
        self.asked_since.append((h, since))
        s = self.samples[h]
        if s == "unsupported":
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        if not s:
            raise self.NVMLError(self.NVML_ERROR_NOT_FOUND)
        return [types.SimpleNamespace(pid=p, timeStamp=t, smUtil=sm, memUtil=mem, encUtil=0, decUtil=0)
                for p, t, sm, mem in s]

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=self.device_util.get(h, 0), memory=0)


@pytest.fixture
def nvml(monkeypatch):
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def test_nvml_readings(nvml):
    r = NvmlReadings()
    nvml.samples[0] = [(10, 10**18, 0, 0), (11, 10**18 + 5, 35, 0)]
    reading = r.read()
    assert {g: (x.total, x.free) for g, x in reading.gpus.items()} == {
        "GPU-aaa": (80 * GiB, 77 * GiB), "GPU-bbb": (80 * GiB, 74 * GiB)}
    assert [(p.pid, p.gpu, p.used) for p in reading.processes] == [
        (10, "GPU-aaa", 2 * GiB), (11, "GPU-aaa", 0), (20, "GPU-bbb", GiB)]
    # pid 11 worked; GPU-bbb has no per-process samples and is busy: every process on it counts
    assert reading.active_pids == {11, 20} and reading.busy_gpus == {"GPU-bbb"}
    assert any("per-process utilization" in p for p in reading.problems)
    # the next reading asks only for samples after the newest one seen
    nvml.samples[0] = []
    nvml.device_util[1] = 0
    reading = r.read()
    assert reading.active_pids == frozenset() and reading.busy_gpus == frozenset()
    assert nvml.asked_since[-2] == (0, 10**18 + 5)
    r.close()
    assert nvml.shut


def test_file_readings_drop_gone_and_frozen_processes(tmp_path):
    path = tmp_path / "r.json"
    me = os.getpid()
    path.write_text(json.dumps({
        "gpus": [{"uuid": "G", "total": 10 * GiB, "used_by_others": GiB}],
        "processes": [{"pid": me, "gpu": "G", "used": 2 * GiB, "active": True},
                      {"pid": 2**22 + 7, "gpu": "G", "used": 3 * GiB, "active": True}]}))
    reading = FileReadings(str(path)).read()
    assert [(p.pid, p.used) for p in reading.processes] == [(me, 2 * GiB)]
    assert reading.gpus["G"].free == 7 * GiB and reading.active_pids == {me}


def test_frozen_reads_the_freezer(tmp_path):
    proc = tmp_path / "proc"
    (proc / "5").mkdir(parents=True)
    (proc / "5" / "cgroup").write_text("7:freezer:/ns/c1\n6:memory:/ns/c1\n")
    v1 = tmp_path / "v1"
    (v1 / "freezer" / "ns" / "c1").mkdir(parents=True)
    (v1 / "freezer" / "ns" / "c1" / "freezer.state").write_text("FROZEN\n")
    assert frozen(5, proc, v1)
    (v1 / "freezer" / "ns" / "c1" / "freezer.state").write_text("THAWED\n")
    assert not frozen(5, proc, v1)
    (proc / "5" / "cgroup").write_text("0::/ns/c1\n")
    v2 = tmp_path / "v2"
    (v2 / "ns" / "c1").mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("cpu memory\n")
    (v2 / "ns" / "c1" / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    assert frozen(5, proc, v2)
    (v2 / "ns" / "c1" / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    assert not frozen(5, proc, v2)
    assert not frozen(6, proc, v2)
