"""Start and watch workload.cu processes; read VRAM per pid from nvidia-smi. Used by tests/gpu and by
bench/cuda_bench.py, so that both judge a checkpoint by the same evidence: the byte check (bad=0)
and a tick count that continues where it stopped.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "workload.cu"
TICK = re.compile(r"^tick (\d+) bad=(\d+) err=(-?\d+)$")
# Pids we started, so a driver script can kill exactly those if a test run is cut short.
PID_FILE = os.environ.get("KYB_WORKLOAD_PIDS", "/tmp/kyb-workload-pids")
GIB = 1 << 30
MIB = 1 << 20


def build(out_dir: Path) -> Path:
    """nvcc -O2 -arch=sm_90 -cudart static: no JIT and no libcudart needed at run time."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    out = Path(out_dir) / "workload"
    subprocess.run([nvcc, "-O2", "-arch=sm_90", "-cudart", "static", "-o", str(out), str(SOURCE)],
                   check=True)
    return out


def find_binary() -> Path | None:
    """$KYBERNATE_WORKLOAD if it names a file; else None (the caller may build)."""
    path = os.environ.get("KYBERNATE_WORKLOAD")
    return Path(path) if path and Path(path).is_file() else None


@dataclass(frozen=True)
class Tick:
    number: int
    bad: int
    err: int
    at: float  # time.monotonic() when read


class Workload:
    """One workload process; a thread reads its stdout into `ticks`."""

    def __init__(self, binary: Path, nbytes: int, device: int = 0, env: dict | None = None):
        self.nbytes = nbytes
        self.ticks: list[Tick] = []
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen([str(binary), str(nbytes), "", str(device)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=dict(os.environ, **(env or {})))
        self.pid = self.proc.pid
        with open(PID_FILE, "a") as f:
            f.write(f"{self.pid}\n")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.strip()
            m = TICK.match(line)
            with self._cond:
                self.lines.append(line)
                if m:
                    self.ticks.append(Tick(int(m[1]), int(m[2]), int(m[3]), time.monotonic()))
                self._cond.notify_all()
        self.proc.wait()  # stdout closed: reap, so that waiters see the exit at once
        with self._cond:
            self._cond.notify_all()

    @property
    def last(self) -> int:
        with self._cond:
            return self.ticks[-1].number if self.ticks else 0

    def wait_tick(self, number: int, timeout: float = 30.0) -> Tick:
        """Wait until tick `number` (or a later one) has been printed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (self.ticks and self.ticks[-1].number >= number):
                if not self._reader.is_alive():
                    raise RuntimeError(f"workload {self.pid} exited {self.proc.returncode}: "
                                       f"{self.lines[-3:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"workload {self.pid}: no tick {number} in {timeout}s "
                                       f"(last {self.lines[-2:]})")
                self._cond.wait(min(left, 0.5))
            return self.ticks[-1]

    def wait_ready(self, ticks: int = 2, timeout: float = 60.0) -> None:
        self.wait_tick(ticks, timeout)

    def verify(self) -> None:
        """Every tick so far: bad=0, err=0, and numbered one after another (the count continued)."""
        with self._cond:
            ticks = list(self.ticks)
        assert ticks, f"workload {self.pid} printed no tick"
        broken = [t for t in ticks if t.bad or t.err]
        assert not broken, f"workload {self.pid}: corrupt ticks {broken[:3]}"
        numbers = [t.number for t in ticks]
        assert numbers == list(range(1, len(numbers) + 1)), f"tick count jumped: {numbers}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def __enter__(self) -> "Workload":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def vram_mib_by_pid() -> dict[int, int]:
    """nvidia-smi --query-compute-apps: MiB of VRAM each process holds now."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    usage = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            usage[int(parts[0])] = int(parts[1]) if parts[1].isdigit() else 0
    return usage


def wait_vram(pid: int, predicate, timeout: float = 10.0) -> int:
    """Poll nvidia-smi until predicate(MiB held by pid, 0 if absent) holds; return the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        mib = vram_mib_by_pid().get(pid, 0)
        if predicate(mib) or time.monotonic() > deadline:
            return mib
        time.sleep(0.2)
