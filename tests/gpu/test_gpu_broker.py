"""The node broker on a real GPU (issue 17): three GPU containers whose VRAM together exceeds what is
left free on the GPU, woken in turn by connections.

Each container runs the CUDA workload as a tiny TCP server (WORKLOAD_PORT: a connection gets one
tick over all of its VRAM and the tick line; no GPU work between connections), with
kybernate.io/idle-release-after and kybernate.io/wake-port. The broker (real NVML through
nvidia-ml-py, no stand-in) parks all three once idle; then a holder process (the bare workload, busy)
fills the GPU so that only two of them fit (it allocates, ticks once and sleeps). Requests go round-robin A, B, C, A, B, C: each one is
answered by its container with the next tick and bad=0 (every byte of its VRAM intact after the trips
to host RAM), the third and later wakes each park the least recently used container first, and a
sampler watching NVML never sees more than two of the three holding VRAM, nor the GPU full.

KYB_GPU_OUT: gpu_broker.json and gpu_broker.md (wake latency per request as the client saw it and as
the broker measured it, bytes moved per wake and park) for bench/results.

Run on the GPU machine (after scripts/gpu-bundle.sh here):
    OUT=$OUT KYB_GPU_TEST_FILE=tests/gpu/test_gpu_broker.py bash tests/gpu/device_containers.sh
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional

import pytest

from tests.gpu import gpu_workload
from tests.gpu.test_gpu_containers import (OUT, SKIP, WORKLOAD_REF, GpuContainer, env, parse_tick,  # noqa: F401
                                           results, wait_for)
from tests.integration.broker_support import BrokerProcess, free_port

pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

GiB = 1 << 30
MiB = 1 << 20
IDLE_S = 20          # idle release: long enough that the round-robin's evictions are make-room's
PAUSE_BETWEEN_S = 2.5   # > min_idle_s + a poll: the previous one is idle enough to be parked for room
RESULTS: dict = {}


def _nvml():
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml
    except Exception as exc:   # noqa: BLE001 - skip with the reason
        pytest.skip(f"NVML unusable here (nvidia-ml-py, libnvidia-ml): {exc}")


class ServerContainer(GpuContainer):
    """The workload as a TCP server on PORT (host network), ticking once per connection."""

    def __init__(self, env, cid: str, nbytes: int, port: int, annotations: dict):
        super().__init__(env, cid, nbytes, annotations=annotations)
        self.port = port
        self.last_tick = 0

    def run_args(self, annotations: Optional[dict] = None) -> list[str]:
        args = super().run_args(annotations)
        i = args.index(WORKLOAD_REF)
        args[i:i] = ["--env", f"WORKLOAD_PORT={self.port}"]
        return args

    def start(self) -> "ServerContainer":
        self.ctr(*self.run_args(), timeout=60)
        self.env.containers.append(self)
        wait_for(lambda: _port_open(self.port), 120, what=f"{self.id} listening on {self.port}")
        line, _ = self.request()
        # the port check above was a connection too (a tick): the first request answers tick 2
        tick = parse_tick(line)
        assert tick is not None and tick.n >= 1 and tick.bad == 0 and tick.err == 0, line
        self.last_tick = tick.n
        return self

    def request(self, timeout: float = 120.0) -> tuple[str, float]:
        """One tick over the whole VRAM through a connection: (its line, seconds to the answer)."""
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(b"tick\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        return data.decode().strip(), round(time.perf_counter() - t0, 4)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Sampler:
    """NVML every 20 ms: how many of our containers hold VRAM at once, and the least free VRAM."""

    def __init__(self, nvml, handle, pids: dict[str, int]):
        self.nvml, self.handle, self.pids = nvml, handle, pids
        self.most_resident = 0
        self.least_free: Optional[int] = None
        self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        nv = self.nvml
        while not self.stop.is_set():
            try:
                on_gpu = {int(p.pid) for p in nv.nvmlDeviceGetComputeRunningProcesses(self.handle)
                          if (p.usedGpuMemory or 0) > 64 * MiB}
                free = int(nv.nvmlDeviceGetMemoryInfo(self.handle).free)
            except nv.NVMLError:
                continue
            self.samples += 1
            self.most_resident = max(self.most_resident, sum(1 for pid in self.pids.values() if pid in on_gpu))
            self.least_free = free if self.least_free is None else min(self.least_free, free)
            time.sleep(0.02)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def _events(proc: subprocess.Popen) -> list[tuple[str, dict]]:
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    found = []
    for line in out.splitlines():
        if "/kybernate/broker/" in line and "{" in line:
            topic = next(w for w in line.split() if w.startswith("/kybernate/broker/"))
            found.append((topic, json.loads(line[line.index("{"):])))
    return found


def _save() -> None:
    if not OUT:
        return
    Path(OUT).mkdir(parents=True, exist_ok=True)
    (Path(OUT) / "gpu_broker.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    lines = ["# Node broker on the GPU: three containers, room for two (issue 17)", ""]
    setup = RESULTS.get("setup", {})
    if setup:
        lines += [f"GPU {setup.get('gpu')}: {setup.get('total_gib')} GiB; each container {setup.get('container_gib')} GiB; "
                  f"holder {setup.get('holder_gib')} GiB; free with the holder and nothing resident "
                  f"{setup.get('free_with_holder_gib')} GiB", ""]
    rows = RESULTS.get("requests", [])
    if rows:
        lines += ["| # | container | answer | client s | broker wake s | GiB back | parked for room |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for i, r in enumerate(rows, 1):
            lines.append(f"| {i} | {r['container']} | {r['answer']} | {r['client_s']} | {r.get('wake_s', '-')} | "
                         f"{r.get('wake_gib', '-')} | {r.get('evicted', '') or '-'} |")
    for key in ("parks", "most_resident", "least_free_gib", "samples"):
        if key in RESULTS:
            lines.append(f"- {key}: {RESULTS[key]}")
    (Path(OUT) / "gpu_broker.md").write_text("\n".join(lines) + "\n")


def test_three_containers_room_for_two_woken_in_turn_by_connections(env, tmp_path):
    nv = _nvml()
    handle = nv.nvmlDeviceGetHandleByIndex(0)
    uuid = nv.nvmlDeviceGetUUID(handle)
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    total = int(nv.nvmlDeviceGetMemoryInfo(handle).total)
    free0 = int(nv.nvmlDeviceGetMemoryInfo(handle).free)
    size = min(4 * GiB, (free0 // 8) // GiB * GiB)
    assert size >= GiB, f"only {free0 / GiB:.1f} GiB free on the GPU"
    RESULTS.clear()
    RESULTS["setup"] = {"gpu": uuid, "total_gib": round(total / GiB, 2), "container_gib": size / GiB}

    cd = env.cd
    state = tmp_path / "broker-state"
    cd.write_node_config(**{**cd.node_sections, "broker": {
        "socket": str(cd.run_dir / "broker.sock"), "state_dir": str(state), "poll_s": 0.5, "min_idle_s": 1.0,
        "silent_wake_s": 1.0, "wake_timeout_s": 120.0, "exec_wait_s": 30.0, "kube_events": False}})
    events = subprocess.Popen([str(cd.install.ctr), "--address", cd.address, "events"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=cd.env)
    libdir = os.path.dirname(env.libcuda)
    broker = BrokerProcess(cd, None, tmp_path, env={"LD_LIBRARY_PATH": libdir})   # NVML: libnvidia-ml beside libcuda
    holder = None
    sampler = None
    containers: dict[str, ServerContainer] = {}
    try:
        for name in ("a", "b", "c"):
            port = free_port()
            containers[name] = ServerContainer(env, f"brk-{name}", size, port, {
                "kybernate.io/idle-release-after": f"{IDLE_S}s", "kybernate.io/wake-port": str(port)}).start()
        broker.start(timeout=60)
        for c in containers.values():
            wait_for(lambda c=c: broker.phase(c.id) == "parked", 60, what=f"{c.id} parked\n{broker.log()[-3000:]}")
        wait_for(lambda: int(nv.nvmlDeviceGetMemoryInfo(handle).free) > free0 - GiB, 30,
                 what="the parked containers' VRAM free again")
        # the holder: busy, not a kybernate container; leaves room for two and a half containers
        free_parked = int(nv.nvmlDeviceGetMemoryInfo(handle).free)
        holder_bytes = max(0, free_parked - int(2.5 * size)) // MiB * MiB
        # (it ticks once and then sleeps: its GPU does no work, whatever NVML reports per process)
        holder = (gpu_workload.Workload(Path(env.workload), holder_bytes, env={"WORKLOAD_TICK_MS": "600000"})
                  if holder_bytes else None)
        if holder is not None:
            holder.wait_ready(ticks=1, timeout=120)
        free_held = int(nv.nvmlDeviceGetMemoryInfo(handle).free)
        RESULTS["setup"].update(holder_gib=round(holder_bytes / GiB, 2), free_with_holder_gib=round(free_held / GiB, 2))
        assert 2 * size < free_held < 3 * size, f"{free_held / GiB:.2f} GiB free: two containers must fit, not three"

        sampler = Sampler(nv, handle, {n: c.pid for n, c in containers.items()})
        requests = []
        for name in ("a", "b", "c", "a", "b", "c"):
            c = containers[name]
            line, seconds = c.request()
            tick = parse_tick(line)
            assert tick is not None, f"{c.id} answered {line!r}"
            assert tick.n == c.last_tick + 1 and tick.bad == 0 and tick.err == 0, \
                f"{c.id}: {line} after tick {c.last_tick}: bytes lost or the process restarted"
            c.last_tick = tick.n
            requests.append({"container": c.id, "answer": line, "client_s": seconds})
            assert broker.phase(c.id) == "resident"
            time.sleep(PAUSE_BETWEEN_S)
        sampler.close()
        phases = {c.id: broker.phase(c.id) for c in containers.values()}
        found = _events(events)
        wakes = [f for t, f in found if t == "/kybernate/broker/wake"]
        parks = [f for t, f in found if t == "/kybernate/broker/release"]
        made_for: list[list[str]] = []      # the make-room parks before each wake, in containerd's order
        pending: list[str] = []
        for topic, facts in found:
            if topic == "/kybernate/broker/release" and facts["labels"]["trigger"] == "make-room":
                pending.append(facts["id"])
            elif topic == "/kybernate/broker/wake":
                made_for.append(pending)
                pending = []
        for r, w, made in zip(requests, wakes, made_for):
            assert w["id"] == r["container"], (requests, wakes)
            r.update(wake_s=float(w["labels"]["duration_s"]), wake_gib=round(int(w["labels"]["bytes"]) / GiB, 2),
                     evicted=",".join(made))
        RESULTS.update(requests=requests, parks=[(p["id"], p["labels"]["trigger"], p["labels"]["bytes"],
                                                  p["labels"]["duration_s"]) for p in parks],
                       most_resident=sampler.most_resident, least_free_gib=round((sampler.least_free or 0) / GiB, 2),
                       samples=sampler.samples, phases_at_end=phases)
        _save()
        assert len(wakes) == 6, f"one wake per request: {wakes}"
        assert [r["evicted"] for r in requests] == ["", "", "brk-a", "brk-b", "brk-c", "brk-a"], \
            "the least recently used one is parked to make room"
        assert sampler.most_resident <= 2, "three containers held VRAM at once: over-committed"
        assert sampler.least_free is not None and sampler.least_free > 0
        assert list(phases.values()).count("resident") == 2
    finally:
        if sampler is not None:
            sampler.close()
        if events.poll() is None:
            events.kill()
            events.communicate()
        _save()
        broker.stop()
        if OUT:
            (Path(OUT) / "broker.log").write_text(broker.log())
        if holder is not None:
            holder.stop()
        for c in containers.values():
            c.remove()
        nv.nvmlShutdown()
