"""The node broker under a private containerd: a broker process, a stand-in for NVML's readings, and
busybox servers run with the kybernate runtime.

- `FakeGpu`: the JSON file `broker.readings.FileReadings` reads (the only stand-in: containerd,
  the shim, pause and resume, sockets are real). A test says which container pid holds how much
  VRAM on which GPU and whether it does GPU work; the stand-in drops frozen processes as the driver
  does for a container the shim paused.
- `BrokerProcess`: `kybernate broker serve --gpu-readings FILE` against the test's containerd, with
  the node config's [broker] section pointing into the test's dirs; stopped (SIGTERM) or killed.
- `run_server(cd, cid, port, ...)`: a busybox httpd (host network, 127.0.0.1:PORT) answering
  ``hello from CID`` at /, as the container's init process.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from .harness import KYBERNATE_RUNTIME, VENV_BIN, Containerd

GiB = 1 << 30
KYBERNATE = VENV_BIN / "kybernate"
GPU0 = "GPU-fake-0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class FakeGpu:
    """The readings file: GPUs, and per container pid its VRAM and whether it works."""

    def __init__(self, path: Path, total: int = 10 * GiB, used_by_others: int = 0, uuid: str = GPU0):
        self.path = path
        self.gpus = {uuid: {"uuid": uuid, "total": total, "used_by_others": used_by_others}}
        self.processes: dict[int, dict] = {}
        self.write()

    def holds(self, pid: int, used: int, gpu: str = GPU0, active: bool = False) -> None:
        self.processes[pid] = {"pid": pid, "gpu": gpu, "used": used, "active": active}
        self.write()

    def active(self, pid: int, active: bool) -> None:
        self.processes[pid]["active"] = active
        self.write()

    def others(self, used: int, gpu: str = GPU0) -> None:
        self.gpus[gpu]["used_by_others"] = used
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"gpus": list(self.gpus.values()), "processes": list(self.processes.values())}))
        tmp.replace(self.path)


def broker_config(cd: Containerd, workdir: Path, **extra) -> dict:
    """The [broker] section for a test: its socket and state in the test's dirs, a quick poll."""
    section = {"socket": str(cd.run_dir / "broker.sock"), "state_dir": str(workdir / "broker-state"),
               "poll_s": 0.2, "min_idle_s": 1.0, "silent_wake_s": 0.5, "wake_timeout_s": 60.0,
               "exec_wait_s": 30.0}
    section.update(extra)
    return section


class BrokerProcess:
    """``python -m kybernate.cli broker serve`` (this interpreter: the venv here, the device's python3
    with PYTHONPATH on the GPU machine). ``readings``: the stand-in's file, None for NVML."""

    def __init__(self, cd: Containerd, readings: Optional[Path], workdir: Path, env: Optional[dict] = None):
        self.cd = cd
        self.readings = readings
        self.extra_env = dict(env or {})
        self.log_path = workdir / "broker.log"
        self.proc: Optional[subprocess.Popen] = None
        self.socket = cd.node_sections["broker"]["socket"]

    def start(self, timeout: float = 30.0) -> "BrokerProcess":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        log = open(self.log_path, "ab")
        env = dict(self.cd.env, **self.extra_env)
        if os.environ.get("PYTHONPATH"):
            env.setdefault("PYTHONPATH", os.environ["PYTHONPATH"])
        readings = ["--gpu-readings", str(self.readings)] if self.readings is not None else []
        self.proc = subprocess.Popen([sys.executable, "-m", "kybernate.cli", "-a", self.cd.address, "broker",
                                      "serve", *readings],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        log.close()
        wait_for(lambda: os.path.exists(self.socket) or self.proc.poll() is not None, timeout, what="broker socket")
        if self.proc.poll() is not None:
            raise AssertionError(f"broker exited {self.proc.returncode}:\n{self.log()}")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def status(self) -> dict:
        from broker.control import call
        return call(self.socket, {"op": "status"}, timeout=10)

    def phase(self, cid: str, namespace: Optional[str] = None) -> str:
        ns = namespace or self.cd.namespace
        for c in self.status()["containers"]:
            if c["namespace"] == ns and c["id"] == cid:
                return c["phase"]
        return "unknown"

    def wait_phase(self, cid: str, phase: str, timeout: float = 20.0) -> None:
        wait_for(lambda: self.phase(cid) == phase, timeout, what=f"{cid} {phase}\n--- broker log:\n{self.log()[-3000:]}")


def kybernate(cd: Containerd, *args, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([str(KYBERNATE), "-a", cd.address, "-n", cd.namespace, *args], capture_output=True,
                       text=True, timeout=timeout, env=cd.env)
    if check and r.returncode != 0:
        raise AssertionError(f"kybernate {' '.join(args)} exited {r.returncode}: {r.stdout}{r.stderr}")
    return r


def run_server(cd: Containerd, cid: str, port: int, *annotations: str, net_host: bool = True) -> int:
    """A busybox httpd container (kybernate runtime) answering 'hello from CID'; returns its init pid."""
    flags = ["--net-host"] if net_host else []
    for a in annotations:
        flags += ["--annotation", a]
    script = (f"mkdir -p /tmp/www && echo 'hello from {cid}' > /tmp/www/index.html && "
              f"exec httpd -f -p 127.0.0.1:{port} -h /tmp/www")
    cd.ctr("run", "-d", "--null-io", "--runtime", KYBERNATE_RUNTIME, *flags, "docker.io/kybernate/busybox:test", cid,
           "sh", "-c", script)
    pid = task_pid(cd, cid)
    if net_host:
        wait_for(lambda: port_open(port), 10, what=f"httpd of {cid} on {port}")
    else:
        from broker.front import find_listeners
        wait_for(lambda: find_listeners([pid], [port]), 10, what=f"httpd of {cid} on {port} in its namespace")
    return pid


def run_sleeper(cd: Containerd, cid: str, *annotations: str) -> int:
    flags = []
    for a in annotations:
        flags += ["--annotation", a]
    cd.ctr("run", "-d", "--null-io", "--runtime", KYBERNATE_RUNTIME, *flags, "docker.io/kybernate/busybox:test", cid,
           "sleep", "100000")
    return task_pid(cd, cid)


def task_pid(cd: Containerd, cid: str) -> int:
    for line in cd.ctr("tasks", "ls").stdout.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == cid:
            return int(parts[1])
    raise AssertionError(f"no task {cid}")


def task_status(cd: Containerd, cid: str) -> str:
    for line in cd.ctr("tasks", "ls").stdout.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == cid:
            return parts[2]
    return "none"


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_get(port: int, path: str = "/", timeout: float = 30.0, agent: str = "test") -> tuple[int, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nUser-Agent: {agent}\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head else 0
    return status, body.decode(errors="replace")
