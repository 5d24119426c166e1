"""What the broker tells (Prometheus metrics, Kubernetes pod events, containerd events) and its
control socket (root only, one JSON line each way, errors with a code)."""
from __future__ import annotations

import asyncio
import json
import os
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from broker import BrokerError
from broker.control import ControlServer, call
from broker.notify import KubeEvents, Metrics, Move, Notifier

GiB = 1 << 30


def move(kind="wake", labels=None):
    return Move(kind, "k8s.io", "abc123", "team/web-0/server", "connection", "connection on port 8080", 0.4123,
                2 * GiB, ("GPU-0",), labels if labels is not None else
                {"io.kubernetes.pod.namespace": "team", "io.kubernetes.pod.name": "web-0",
                 "io.kubernetes.pod.uid": "uid-1"})


class ApiServer:
    """A stand-in Kubernetes API server on 127.0.0.1 that records what is posted."""

    def __init__(self):
        self.posted = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.posted.append((self.path, self.headers["Authorization"], json.loads(body)))
                self.send_response(201)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_pod_events_are_posted_with_the_facts():
    api = ApiServer()
    try:
        kube = KubeEvents(api.url, "tok", None, "node-1")
        asyncio.run(Notifier(kube=kube).moved(move()))
        asyncio.run(Notifier(kube=kube).moved(move("release", labels={})))   # not a pod: nothing posted
    finally:
        api.close()
    assert len(api.posted) == 1
    path, auth, event = api.posted[0]
    assert path == "/api/v1/namespaces/team/events" and auth == "Bearer tok"
    assert event["involvedObject"] == {"kind": "Pod", "namespace": "team", "name": "web-0", "apiVersion": "v1",
                                       "uid": "uid-1"}
    assert event["reason"] == "GpuWoken" and event["type"] == "Normal"
    assert event["message"] == ("container team/web-0/server got its GPU memory back (connection on port 8080): "
                                "2.00 GiB in 0.412 s")
    assert event["source"] == {"component": "kybernate-broker", "host": "node-1"}


def test_in_cluster_credentials(tmp_path):
    assert KubeEvents.in_cluster({}, str(tmp_path)) is None
    (tmp_path / "token").write_text("secret\n")
    (tmp_path / "ca.crt").write_text("")
    with pytest.raises(Exception):
        # an empty CA file is no CA: refused at once rather than posting without verification
        KubeEvents.in_cluster({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, str(tmp_path))


def test_an_unreachable_api_server_does_not_fail_the_move(caplog):
    kube = KubeEvents("http://127.0.0.1:9", "tok", None, "n")
    asyncio.run(Notifier(kube=kube).moved(move()))
    assert "Kubernetes event for team/web-0/server not posted" in caplog.text


def test_metrics():
    m = Metrics()
    n = Notifier(metrics=m)
    asyncio.run(n.moved(move("release")))
    asyncio.run(n.moved(move("wake")))
    n.failed("wake")
    n.probe("http")
    n.phases({"resident": 2, "parked": 1})
    from prometheus_client import generate_latest
    text = generate_latest(m.registry).decode()
    for line in ('kybernate_broker_releases_total{trigger="connection"} 1.0',
                 'kybernate_broker_wakes_total{trigger="connection"} 1.0',
                 'kybernate_broker_bytes_moved_total{direction="to_host"} 2.147483648e+09',
                 'kybernate_broker_bytes_moved_total{direction="to_gpu"} 2.147483648e+09',
                 'kybernate_broker_wake_seconds_count 1.0',
                 'kybernate_broker_failures_total{operation="wake"} 1.0',
                 'kybernate_broker_probes_answered_total{kind="http"} 1.0',
                 'kybernate_broker_containers{phase="parked"} 1.0'):
        assert line in text, line


def test_metrics_are_served_over_http():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = Metrics()
    m.serve(f"127.0.0.1:{port}")
    try:
        Notifier(metrics=m).failed("release")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'kybernate_broker_failures_total{operation="release"} 1.0' in body
    finally:
        m.close()


# ---- the control socket --------------------------------------------------------------------------------
class FakeBroker:
    def status(self):
        return {"containers": [], "gpus": {}}

    async def wake(self, key, reason, trigger):
        if key[1] == "boom":
            raise RuntimeError("NVML: GPU is lost")
        if key[1] == "full":
            raise BrokerError("cannot wake default/full: it needs ...", "no-room")
        from broker.service import WakeResult
        return WakeResult(f"{key[0]}/{key[1]}", 0.25, GiB, ("default/old",))


def test_control_socket(tmp_path):
    path = str(tmp_path / "run" / "broker.sock")

    async def scenario():
        server = ControlServer(FakeBroker(), path)
        await server.start()
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        try:
            status = await asyncio.to_thread(call, path, {"op": "status"})
            woke = await asyncio.to_thread(call, path, {"op": "wake", "namespace": "default", "id": "c1"})
            with pytest.raises(BrokerError) as full:
                await asyncio.to_thread(call, path, {"op": "wake", "namespace": "default", "id": "full"})
            with pytest.raises(BrokerError) as bad:
                await asyncio.to_thread(call, path, {"op": "wake", "namespace": "", "id": 3})
            with pytest.raises(BrokerError) as unknown:
                await asyncio.to_thread(call, path, {"op": "reboot"})
            with pytest.raises(BrokerError, match="the broker failed: RuntimeError: NVML: GPU is lost") as boom:
                await asyncio.to_thread(call, path, {"op": "wake", "namespace": "default", "id": "boom"})
            assert boom.value.code == "failed"
        finally:
            await server.close()
        return status, woke, full.value, bad.value, unknown.value

    status, woke, full, bad, unknown = asyncio.run(scenario())
    assert status == {"containers": [], "gpus": {}}
    assert woke == {"name": "default/c1", "latency_s": 0.25, "bytes": GiB, "evicted": ["default/old"],
                    "already_resident": False}
    assert full.code == "no-room" and str(full).startswith("cannot wake default/full")
    assert bad.code == "invalid" and "namespace and a container id" in str(bad)
    assert unknown.code == "invalid" and "unknown request 'reboot'" in str(unknown)
    assert not os.path.exists(path)


def test_no_broker_is_a_clear_error(tmp_path):
    with pytest.raises(BrokerError, match="no kybernate broker at .*is `kybernate broker serve` running") as info:
        call(str(tmp_path / "none.sock"), {"op": "status"})
    assert info.value.code == "unavailable"


def test_a_peer_that_is_not_root_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")
    import shutil
    import tempfile
    where = tempfile.mkdtemp(prefix="kyb-broker-peer-", dir="/tmp")   # pytest's tmp dirs are root's alone
    os.chmod(where, 0o755)
    path = os.path.join(where, "broker.sock")

    async def scenario():
        server = ControlServer(FakeBroker(), path)
        await server.start()
        os.chmod(path, 0o666)         # let the unprivileged peer reach it: SO_PEERCRED must still refuse
        try:
            def as_nobody():
                import subprocess
                # the broker answers a refused peer at once, without reading: the send may find it closed
                code = ("import socket,sys\ns=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
                        "try:\n    s.sendall(b'{\"op\": \"status\"}\\n')\nexcept BrokenPipeError:\n    pass\n"
                        "print(s.recv(4096).decode())")
                return subprocess.run(["/usr/bin/python3", "-I", "-c", code, path], capture_output=True, text=True,
                                      user=65534, timeout=20)
            return await asyncio.to_thread(as_nobody)
        finally:
            await server.close()

    try:
        r = asyncio.run(scenario())
    finally:
        shutil.rmtree(where, ignore_errors=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"ok": False, "code": "denied", "error": "only root may talk to the kybernate broker"}
