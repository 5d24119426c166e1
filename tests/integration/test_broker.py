"""The node broker (issue 17) under a private containerd, with CPU containers run by the kybernate
runtime. The only stand-in is the GPU readings file (`FakeGpu`: which pid holds how much VRAM and
whether it does GPU work); containerd, the shim, pause and resume, the sockets are real.

Shown here: idle release after the set time (not before); wake on connect with the first request
answered and kubelet's probes answered while parked; `kybernate wake`; an exec into a parked
container wakes it; making room by priority then LRU, and a clear refusal naming the holder when
no room can be made, with nothing paused; concurrent wakes that never over-commit the GPU; the broker
killed and restarted (parked stays parked, a broken-off wake is finished); bad annotations and bad
wakes; events seen by `ctr events`; `kybernate ps --gpus`. One test runs on containerd 2.1.
"""
from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from broker.readings import FileReadings

from .broker_support import (GPU0, BrokerProcess, FakeGpu, GiB, broker_config, free_port, http_get, kybernate,
                             run_server, run_sleeper, task_status, wait_for)
from .harness import Containerd, unavailable_reason

IDLE = "kybernate.io/idle-release-after"
PORT = "kybernate.io/wake-port"
PRIO = "kybernate.io/gpu-priority"


def _start(version: str, workdir: Path) -> Containerd:
    reason = unavailable_reason(version)
    if reason:
        pytest.skip(reason)
    cd = Containerd(version, workdir)
    cd.write_node_config(broker=broker_config(cd, workdir))
    try:
        cd.start()
        cd.import_busybox()
    except BaseException:
        cd.stop()
        raise
    return cd


@pytest.fixture(scope="module")
def cd(tmp_path_factory):
    instance = _start("1.6", tmp_path_factory.mktemp("broker-1.6"))
    yield instance
    instance.stop()
    assert not instance.leftovers()


class Node:
    """One test's broker, GPU stand-in and events."""

    def __init__(self, cd: Containerd, workdir: Path, **gpu):
        self.cd = cd
        self.workdir = workdir
        self.gpu = FakeGpu(workdir / "readings.json", **gpu)
        self.broker = BrokerProcess(cd, self.gpu.path, workdir)
        self.events_proc = subprocess.Popen([str(cd.install.ctr), "--address", cd.address, "events"],
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                            env=cd.env)

    def events(self) -> list[tuple[str, dict]]:
        """(topic, facts) of the broker's events so far (ctr events' output)."""
        self.events_proc.terminate()
        out, _ = self.events_proc.communicate(timeout=10)
        found = []
        for line in out.splitlines():
            if "/kybernate/broker/" in line:
                topic = next(w for w in line.split() if w.startswith("/kybernate/broker/"))
                found.append((topic, json.loads(line[line.index("{"):])))
        return found

    def close(self) -> None:
        self.broker.stop()
        if self.events_proc.poll() is None:
            self.events_proc.kill()
            self.events_proc.communicate()
        self.cd._delete_all_through_containerd()


@pytest.fixture
def node(cd, tmp_path):
    n = Node(cd, tmp_path)
    yield n
    print("--- broker log (shown when the test failed):\n" + n.broker.log()[-6000:])
    n.close()


# ---- idle release -------------------------------------------------------------------------------------
def test_idle_release_after_the_set_time_and_not_before(node):
    cd = node.cd
    port = free_port()
    pid = run_server(cd, "web", port, f"{IDLE}=2s")
    node.gpu.holds(pid, 2 * GiB, active=True)
    keep = run_sleeper(cd, "keep")                      # no idle release: never parked
    node.gpu.holds(keep, GiB)
    node.broker.start()
    time.sleep(3.0)                                     # busy for longer than 2 s: stays resident
    assert node.broker.phase("web") == "resident" and task_status(cd, "web") == "RUNNING"
    idle_from = time.monotonic()
    node.gpu.active(pid, False)
    node.broker.wait_phase("web", "parked", 15)
    parked_after = time.monotonic() - idle_from
    assert parked_after >= 1.8, f"parked {parked_after:.2f} s after its GPU went idle, before the 2 s it asked for"
    assert task_status(cd, "web") == "PAUSED", "containerd's own state says paused"
    assert node.broker.phase("keep") == "resident" and task_status(cd, "keep") == "RUNNING"
    status = {c["id"]: c for c in node.broker.status()["containers"]}
    assert status["web"]["vram"] == {GPU0: 2 * GiB} and status["web"]["reason"].startswith("idle")
    wait_for(lambda: node.broker.status()["gpus"][GPU0]["free"] == 10 * GiB - GiB, 5,
             what="the parked container's VRAM free in the broker's next reading")
    topics = node.events()
    releases = [f for t, f in topics if t == "/kybernate/broker/release"]
    assert len(releases) == 1 and releases[0]["id"] == "web"
    labels = releases[0]["labels"]
    assert labels["trigger"] == "idle" and labels["bytes"] == str(2 * GiB) and float(labels["duration_s"]) >= 0
    assert labels["kybernate.io/event"] == "release" and labels["gpus"] == GPU0


# ---- wake on connect, probes, kybernate wake, exec ---------------------------------------------------
def test_wake_on_connect_answers_the_first_request_and_probes_do_not_wake(node):
    cd = node.cd
    port = free_port()
    pid = run_server(cd, "web", port, f"{IDLE}=1s")
    node.gpu.holds(pid, 3 * GiB)
    node.broker.start()
    node.broker.wait_phase("web", "parked", 15)
    # kubelet's probes while parked: answered by the broker, the container stays parked
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass                                                        # tcpSocket probe
    status, body = http_get(port, "/healthz", agent="kube-probe/1.30", timeout=5)
    assert status == 200 and body == "parked\n"
    time.sleep(0.5)
    assert node.broker.phase("web") == "parked" and task_status(cd, "web") == "PAUSED"
    # the first real request wakes it and is answered by the container itself
    t0 = time.monotonic()
    status, body = http_get(port, timeout=30)
    first = time.monotonic() - t0
    assert (status, body) == (200, "hello from web\n")
    assert task_status(cd, "web") == "RUNNING" and node.broker.phase("web") == "resident"
    status, body = http_get(port, timeout=5)                           # straight to the container now
    assert (status, body) == (200, "hello from web\n")
    wakes = [f for t, f in node.events() if t == "/kybernate/broker/wake"]
    assert len(wakes) == 1
    assert wakes[0]["labels"]["trigger"] == "connection" and wakes[0]["labels"]["reason"] == f"connection on port {port}"
    assert wakes[0]["labels"]["bytes"] == str(3 * GiB)
    assert "http probe answered while parked" in node.broker.log()
    print(f"first request through the front: {first:.3f} s")


def test_wake_on_connect_in_the_containers_own_network_namespace(node):
    """No host network: the container's port exists only in its own namespace (as a pod's does); a
    client there (as another pod or a Service's traffic would arrive) wakes it the same way."""
    from broker.front import socket_in_netns
    cd = node.cd
    pid = run_server(cd, "pod", 8080, f"{IDLE}=1s", net_host=False)
    node.gpu.holds(pid, GiB)
    node.broker.start()
    node.broker.wait_phase("pod", "parked", 15)
    assert {c["id"]: c for c in node.broker.status()["containers"]}["pod"]["wake_ports"] == [8080]
    client = socket_in_netns(pid, socket.AF_INET)
    client.settimeout(30)
    try:
        client.connect(("127.0.0.1", 8080))
        client.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := client.recv(65536):
            data += chunk
    finally:
        client.close()
    assert data.startswith(b"HTTP/1.") and data.endswith(b"hello from pod\n")
    assert task_status(cd, "pod") == "RUNNING" and node.broker.phase("pod") == "resident"


def test_wake_port_annotation_and_kybernate_wake_and_ps(node):
    cd = node.cd
    port, other = free_port(), free_port()
    pid = run_server(cd, "web", port, f"{IDLE}=1s", f"{PORT}={other}")   # a port it does not listen on
    node.gpu.holds(pid, GiB)
    node.broker.start()
    node.broker.wait_phase("web", "parked", 15)
    view = {c["id"]: c for c in node.broker.status()["containers"]}["web"]
    assert view["wake_ports"] == [] and f"no listening socket on port(s) {other}" in view["front"]
    ps = kybernate(cd, "ps", "--gpus", "--socket", node.broker.socket, check=True).stdout
    line = next(l for l in ps.splitlines() if "/web" in l)
    assert line.split()[:2] == [GPU0, "parked"] and "1.00 GiB" in line
    r = kybernate(cd, "wake", "web", "--socket", node.broker.socket, "--json", check=True)
    result = json.loads(r.stdout)
    assert result["bytes"] == GiB and result["evicted"] == [] and not result["already_resident"]
    assert task_status(cd, "web") == "RUNNING"
    r = kybernate(cd, "wake", "web", "--socket", node.broker.socket, check=True)
    assert "already resident" in r.stdout
    ps = kybernate(cd, "ps", "--gpus", "--socket", node.broker.socket, check=True).stdout
    assert next(l for l in ps.splitlines() if "/web" in l).split()[:2] == [GPU0, "resident"]


def test_an_exec_into_a_parked_container_wakes_it(node):
    cd = node.cd
    pid = run_sleeper(cd, "job", f"{IDLE}=1s")
    node.gpu.holds(pid, GiB)
    node.broker.start()
    node.broker.wait_phase("job", "parked", 15)
    r = cd.ctr("tasks", "exec", "--exec-id", "look", "job", "echo", "awake", timeout=60)
    assert r.stdout.strip() == "awake"
    assert task_status(cd, "job") == "RUNNING" and node.broker.phase("job") == "resident"
    wakes = [f for t, f in node.events() if t == "/kybernate/broker/wake"]
    assert [w["labels"]["trigger"] for w in wakes] == ["exec"]
    # no broker serving (killed: its socket file is left, nobody answers): an exec into a paused
    # container fails at once, as runc's would
    node.broker.kill()
    cd.ctr("tasks", "pause", "job")
    t0 = time.monotonic()
    r = cd.ctr("tasks", "exec", "--exec-id", "look2", "job", "echo", "awake", check=False, timeout=60)
    assert r.returncode != 0 and time.monotonic() - t0 < 10
    assert "the container is paused (and no node broker serves this node to wake it)" in r.stderr
    cd.ctr("tasks", "resume", "job")


# ---- making room ----------------------------------------------------------------------------------------
def _touch(node: Node, pid: int) -> None:
    """GPU work for a moment: the container becomes the most recently used."""
    node.gpu.active(pid, True)
    time.sleep(0.6)
    node.gpu.active(pid, False)


def test_make_room_parks_lowest_priority_then_least_recently_used(node):
    cd = node.cd
    node.gpu.gpus[GPU0]["total"] = 13 * GiB
    node.gpu.write()
    target = run_sleeper(cd, "target", f"{IDLE}=1s")
    node.gpu.holds(target, 6 * GiB)
    node.broker.start()
    node.broker.wait_phase("target", "parked", 15)
    pids = {}
    for cid, prio in (("high", 10), ("old", 0), ("mid", 0), ("low", -5)):
        pids[cid] = run_sleeper(cd, cid, f"{IDLE}=1h", f"{PRIO}={prio}")
        node.gpu.holds(pids[cid], 3 * GiB)
    for cid in ("high", "old", "mid", "low"):       # oldest use first: high, then old, mid, low (newest)
        _touch(node, pids[cid])
    time.sleep(1.5)                                  # all idle for longer than min_idle_s (1 s)
    assert node.broker.status()["gpus"][GPU0]["free"] == GiB
    r = kybernate(cd, "wake", "target", "--socket", node.broker.socket, "--json", check=True)
    result = json.loads(r.stdout)
    ns = cd.namespace
    assert result["evicted"] == [f"{ns}/low", f"{ns}/old"], "priority first (low), then least recently used (old)"
    assert {c: task_status(cd, c) for c in ("target", "high", "old", "mid", "low")} == {
        "target": "RUNNING", "high": "RUNNING", "old": "PAUSED", "mid": "RUNNING", "low": "PAUSED"}
    assert node.broker.status()["gpus"][GPU0]["free"] >= 0
    releases = [(f["id"], f["labels"]["trigger"]) for t, f in node.events() if t == "/kybernate/broker/release"]
    assert releases[-2:] == [("low", "make-room"), ("old", "make-room")]


def test_no_room_names_the_holder_and_pauses_nothing(node):
    cd = node.cd
    node.gpu.gpus[GPU0]["total"] = 8 * GiB
    node.gpu.write()
    target = run_sleeper(cd, "target", f"{IDLE}=1s")
    node.gpu.holds(target, 4 * GiB)
    node.broker.start()
    node.broker.wait_phase("target", "parked", 15)
    pinned = run_sleeper(cd, "pinned")                         # no idle release: never parked
    node.gpu.holds(pinned, 5 * GiB)
    idle = run_sleeper(cd, "idle", f"{IDLE}=1h")
    node.gpu.holds(idle, 2 * GiB)
    time.sleep(1.5)
    r = kybernate(cd, "wake", "target", "--socket", node.broker.socket)
    assert r.returncode == 3, r.stdout + r.stderr
    ns = cd.namespace
    assert f"cannot wake {ns}/target: it needs 4.00 GiB on GPU {GPU0}, 1.00 GiB is free" in r.stderr
    assert f"{ns}/pinned (5.00 GiB, no idle release)" in r.stderr and f"{ns}/idle (2.00 GiB)" in r.stderr
    time.sleep(0.5)
    assert {c: task_status(cd, c) for c in ("target", "pinned", "idle")} == {
        "target": "PAUSED", "pinned": "RUNNING", "idle": "RUNNING"}, "nothing half-done"
    assert node.broker.phase("idle") == "resident" and node.broker.phase("target") == "parked"


# ---- concurrency ----------------------------------------------------------------------------------------
class FreeWatch:
    """Samples the GPU stand-in as the driver would report it (frozen processes hold nothing) and
    keeps the lowest free VRAM seen: below zero would be an over-committed GPU."""

    def __init__(self, path: Path):
        self.readings = FileReadings(str(path))
        self.lowest = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            free = self.readings.read().gpus[GPU0].free
            self.lowest = free if self.lowest is None else min(self.lowest, free)
            time.sleep(0.005)

    def close(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.lowest


def test_concurrent_wakes_never_over_commit(node):
    cd = node.cd
    node.gpu.gpus[GPU0].update(total=10 * GiB, used_by_others=2 * GiB)
    node.gpu.write()
    ports = {"a": free_port(), "b": free_port()}
    pids = {c: run_server(cd, c, ports[c], f"{IDLE}=1s") for c in ("a", "b")}
    for c in ("a", "b"):
        node.gpu.holds(pids[c], 4 * GiB)
    node.broker.start()
    node.broker.wait_phase("a", "parked", 15)
    node.broker.wait_phase("b", "parked", 15)
    spare = run_sleeper(cd, "spare", f"{IDLE}=1h")     # resident, idle: the one to park for the second wake
    node.gpu.holds(spare, 4 * GiB)
    time.sleep(1.5)
    watch = FreeWatch(node.gpu.path)
    answers: dict = {}

    def get(c: str, i: int) -> None:
        answers[(c, i)] = http_get(ports[c], timeout=60)

    def wake(c: str) -> None:
        answers[(c, "cmd")] = kybernate(cd, "wake", c, "--socket", node.broker.socket, "--json")

    threads = [threading.Thread(target=get, args=(c, i)) for c in ("a", "b") for i in range(3)]
    threads += [threading.Thread(target=wake, args=(c,)) for c in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    lowest = watch.close()
    for c in ("a", "b"):
        for i in range(3):
            assert answers[(c, i)] == (200, f"hello from {c}\n")
        assert answers[(c, "cmd")].returncode == 0, answers[(c, "cmd")].stderr
    assert lowest is not None and lowest >= 0, f"GPU over-committed: free went down to {lowest / GiB:.2f} GiB"
    assert {c: task_status(cd, c) for c in ("a", "b", "spare")} == {"a": "RUNNING", "b": "RUNNING", "spare": "PAUSED"}
    wakes = [f["id"] for t, f in node.events() if t == "/kybernate/broker/wake"]
    assert sorted(wakes) == ["a", "b"], "each container resumed once, however many asked"


# ---- the broker killed and restarted ----------------------------------------------------------------------
def test_broker_killed_and_restarted(node):
    cd = node.cd
    port = free_port()
    pid = run_server(cd, "web", port, f"{IDLE}=1s")
    node.gpu.holds(pid, 2 * GiB)
    job = run_sleeper(cd, "job", f"{IDLE}=1s")
    node.gpu.holds(job, GiB)
    node.broker.start()
    node.broker.wait_phase("web", "parked", 15)
    node.broker.wait_phase("job", "parked", 15)
    records_path = Path(cd.node_sections["broker"]["state_dir"]) / "parked.json"
    node.broker.kill()
    # killed between writing "waking" and the Resume: a restarted broker must finish the wake
    records = json.loads(records_path.read_text())
    records[f"{cd.namespace}/job"]["phase"] = "waking"
    records_path.write_text(json.dumps(records))
    node.gpu.active(job, True)          # busy once woken: not parked again at once
    node.broker.start()
    wait_for(lambda: task_status(cd, "job") == "RUNNING", 20, what="job resumed by the restarted broker")
    node.broker.wait_phase("job", "resident", 10)
    # the parked one stays parked, with its VRAM known, and its front works again
    assert task_status(cd, "web") == "PAUSED" and node.broker.phase("web") == "parked"
    view = {c["id"]: c for c in node.broker.status()["containers"]}["web"]
    assert view["vram"] == {GPU0: 2 * GiB} and view["wake_ports"] == [port]
    assert http_get(port, timeout=30) == (200, "hello from web\n")
    assert task_status(cd, "web") == "RUNNING"
    # killed while a container was parked, resumed by someone else meanwhile: running, record gone
    node.gpu.active(pid, False)
    node.broker.wait_phase("web", "parked", 15)
    node.broker.kill()
    cd.ctr("tasks", "resume", "web")
    node.broker.start()
    node.broker.wait_phase("web", "resident", 10)
    assert f"{cd.namespace}/web" not in json.loads(records_path.read_text())
    assert "its wake was broken off" in node.broker.log()


def test_broker_killed_at_random_points_of_wakes_leaves_nothing_frozen(node):
    """SIGKILL at a random moment while a connection wakes a parked container (before, during or after
    the Resume, or while making room), then a new broker: every container ends either running, or
    paused with the broker's record of it (parked: a connection wakes it). None is left frozen with no
    one to wake it."""
    import random
    cd = node.cd
    node.gpu.gpus[GPU0]["total"] = 3 * GiB
    node.gpu.write()
    ports = {c: free_port() for c in ("a", "b")}
    pids = {c: run_server(cd, c, ports[c], f"{IDLE}=1s") for c in ("a", "b")}
    for c in ("a", "b"):
        node.gpu.holds(pids[c], 2 * GiB)          # room for one of them at a time: wakes make room
    records_path = Path(cd.node_sections["broker"]["state_dir"]) / "parked.json"
    rng = random.Random(17)
    node.broker.start()
    for round_ in range(8):
        wait_for(lambda: all(task_status(cd, c) == "PAUSED" for c in ("a", "b")) or
                 sum(task_status(cd, c) == "RUNNING" for c in ("a", "b")) == 1, 20, what="settled")
        target = "a" if round_ % 2 else "b"
        result: dict = {}
        t = threading.Thread(target=lambda: result.setdefault("r", _try_get(ports[target])), daemon=True)
        t.start()
        time.sleep(rng.uniform(0.0, 0.08))
        node.broker.kill()
        t.join(30)
        node.broker.start()
        def settled() -> bool:
            records = json.loads(records_path.read_text()) if records_path.exists() else {}
            for c in ("a", "b"):
                status = task_status(cd, c)
                record = records.get(f"{cd.namespace}/{c}")
                if status == "PAUSED" and (record is None or record["phase"] != "parked"):
                    return False
                if status not in ("PAUSED", "RUNNING"):
                    return False
            return True
        wait_for(settled, 20, what=f"round {round_}: every container running, or parked with its record\n"
                                   f"{node.broker.log()[-3000:]}")
    # and each parked one still wakes on a connection
    for c in ("a", "b"):
        assert http_get(ports[c], timeout=30) == (200, f"hello from {c}\n")


def _try_get(port: int):
    try:
        return http_get(port, timeout=20)
    except OSError as exc:
        return exc


# ---- bad input ---------------------------------------------------------------------------------------------
def test_bad_annotations_and_bad_wakes_are_clear_errors_and_the_container_runs_on(node):
    cd = node.cd
    bad = {"dur": f"{IDLE}=soon", "port": f"{PORT}=http", "prio": f"{PRIO}=high"}
    pids = {}
    for cid, ann in bad.items():
        pids[cid] = run_sleeper(cd, cid, ann, f"{IDLE}=1s" if cid != "dur" else f"{PRIO}=1")
        node.gpu.holds(pids[cid], GiB)
    cpu = run_sleeper(cd, "cpu", f"{IDLE}=1s")          # not on any GPU
    node.broker.start()
    time.sleep(3.0)
    status = {c["id"]: c for c in node.broker.status()["containers"]}
    for cid, key in (("dur", IDLE), ("port", PORT), ("prio", PRIO)):
        assert task_status(cd, cid) == "RUNNING" and status[cid]["phase"] == "resident"
        assert key in status[cid]["refused"], status[cid]
    log = node.broker.log()
    assert f"AUDIT refused container=dur namespace={cd.namespace} key={IDLE} value='soon'" in log
    assert f"key={PORT} value='http'" in log and f"key={PRIO} value='high'" in log
    r = kybernate(cd, "wake", "nosuch", "--socket", node.broker.socket)
    assert r.returncode != 0 and "no container 'nosuch'" in r.stderr
    r = kybernate(cd, "wake", "cpu", "--socket", node.broker.socket)
    assert r.returncode == 1 and "is not a GPU container" in r.stderr
    assert task_status(cd, "cpu") == "RUNNING" and cpu > 0


# ---- containerd 2.1 ----------------------------------------------------------------------------------------
def test_idle_release_and_wake_on_connect_on_containerd_2_1(tmp_path):
    cd2 = _start("2.1", tmp_path / "cd")
    node = None
    try:
        node = Node(cd2, tmp_path)
        port = free_port()
        pid = run_server(cd2, "web", port, f"{IDLE}=1s")
        node.gpu.holds(pid, 2 * GiB)
        node.broker.start()
        node.broker.wait_phase("web", "parked", 15)
        assert task_status(cd2, "web") == "PAUSED"
        assert http_get(port, timeout=30) == (200, "hello from web\n")
        assert task_status(cd2, "web") == "RUNNING"
        topics = [t for t, _ in node.events()]
        assert topics == ["/kybernate/broker/release", "/kybernate/broker/wake"]
    finally:
        if node is not None:
            node.close()
        cd2.stop()
    assert not cd2.leftovers()
