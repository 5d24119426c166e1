"""Fixtures for cuda_bindings unit tests: a stand-in libcuda built from fakecuda.c, and live processes.

The stand-in keeps per-pid checkpoint state in files (see the comment atop fakecuda.c), so the tests
here and CLI subprocesses see the same driver. It proves our orchestration, never the real driver:
tests/gpu does that.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "fakecuda.c"


@dataclass(frozen=True)
class FakeLibs:
    full: Path  # every symbol, version from FAKECUDA_VERSION
    old: Path  # built without the cuCheckpointProcess* symbols


def _compile(out: Path, *defines: str) -> Path:
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        pytest.fail("a C compiler (gcc) is needed to build the stand-in libcuda from fakecuda.c")
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", *defines, "-o", str(out),
                    str(SOURCE), "-lpthread"], check=True)
    return out


@pytest.fixture(scope="session")
def fake_libs(tmp_path_factory) -> FakeLibs:
    root = tmp_path_factory.mktemp("fakecuda")
    return FakeLibs(full=_compile(root / "full" / "libcuda.so.1"),
                    old=_compile(root / "old" / "libcuda.so.1", "-DFAKECUDA_NO_CHECKPOINT"))


@dataclass(frozen=True)
class LogLine:
    call: str
    pid: int
    rc: int
    t0_ns: int
    t1_ns: int
    detail: str


class FakeCuda:
    """Control of the stand-in driver for one test: its state, script and call log."""

    def __init__(self, directory: Path, libs: FakeLibs):
        self.dir = directory
        self.libs = libs
        self.path = str(libs.full)

    def _rows(self) -> dict[int, list[str]]:
        path = self.dir / "state"
        if not path.exists():
            return {}
        rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        return {int(r[0]): r[1:] for r in rows}

    def _write(self, rows: dict[int, list[str]]) -> None:
        (self.dir / "state").write_text("".join(" ".join([str(p), *r]) + "\n" for p, r in rows.items()))

    def set_states(self, states: dict[int, int], devices: dict[int, list[int]] | None = None) -> None:
        """Pid -> state; devices (optional): pid -> the device ordinals it uses (kept otherwise)."""
        rows = self._rows()
        for pid, state in states.items():
            rows[pid] = [str(state)] + rows.get(pid, [])[1:]
        for pid, devs in (devices or {}).items():
            rows[pid] = rows.get(pid, ["0"])[:1] + [",".join(str(d) for d in devs)]
        self._write(rows)

    def states(self) -> dict[int, int]:
        return {p: int(r[0]) for p, r in self._rows().items()}

    def devices(self) -> dict[int, list[int]]:
        """Pid -> the device ordinals the stand-in has it on (pids listed with devices only)."""
        return {p: [int(d) for d in r[1].split(",")] for p, r in self._rows().items() if len(r) > 1}

    def script(self, *rules: str) -> None:
        (self.dir / "script").write_text("".join(r + "\n" for r in rules))

    def log(self, call: str | None = None) -> list[LogLine]:
        path = self.dir / "log"
        if not path.exists():
            return []
        lines = []
        for raw in path.read_text().splitlines():
            c, pid, rc, t0, t1, detail = raw.split(" ", 5)
            if call is None or c == call:
                lines.append(LogLine(c, int(pid), int(rc), int(t0), int(t1), detail))
        return lines

    def calls(self, pid: int) -> list[str]:
        """The checkpoint calls made for pid, in order, GetState left out."""
        return [l.call for l in self.log() if l.pid == pid and l.call != "state"]

    def clear_log(self) -> None:
        (self.dir / "log").unlink(missing_ok=True)

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a subprocess that should use this stand-in."""
        env = dict(os.environ, FAKECUDA_DIR=str(self.dir), KYBERNATE_LIBCUDA=self.path)
        env.update(extra)
        return env

    def driver(self, path: str | None = None):
        from cuda_bindings import CudaDriver
        return CudaDriver(path or self.path)


@pytest.fixture
def fake(fake_libs, tmp_path, monkeypatch) -> FakeCuda:
    directory = tmp_path / "fakecuda"
    directory.mkdir()
    monkeypatch.setenv("FAKECUDA_DIR", str(directory))
    for name in ("FAKECUDA_VERSION", "FAKECUDA_DEVICES", "FAKECUDA_INIT", "KYBERNATE_LIBCUDA"):
        monkeypatch.delenv(name, raising=False)
    return FakeCuda(directory, fake_libs)


class Processes:
    """Live child processes for the tests to use as pids; all killed at teardown."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.children: list[subprocess.Popen] = []

    def sleeper(self) -> int:
        """A process without CUDA: no libcuda mapped, no device open."""
        child = subprocess.Popen(["sleep", "300"])
        self.children.append(child)
        return child.pid

    def cuda_like(self, libpath: str, device_node: Path | None) -> int:
        """A process that maps a file named libcuda.so.1 and holds `device_node` open, as a running
        CUDA process maps libcuda and holds /dev/nvidia* open."""
        code = ("import ctypes, sys, time\n"
                "ctypes.CDLL(sys.argv[1])\n"
                "f = open(sys.argv[2]) if sys.argv[2] else None\n"
                "print('ready', flush=True)\n"
                "time.sleep(300)\n")
        child = subprocess.Popen([sys.executable, "-c", code, libpath,
                                  str(device_node) if device_node else ""],
                                 stdout=subprocess.PIPE, text=True)
        self.children.append(child)
        assert child.stdout.readline().strip() == "ready"
        return child.pid

    def close(self) -> None:
        for child in self.children:
            child.kill()
        for child in self.children:
            child.wait()


@pytest.fixture
def procs(tmp_path):
    processes = Processes(tmp_path)
    yield processes
    processes.close()


@pytest.fixture
def dead_pid() -> int:
    """A pid that no process has now (a child that has exited and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    deadline = time.time() + 5
    while os.path.exists(f"/proc/{child.pid}") and time.time() < deadline:
        time.sleep(0.01)
    return child.pid
