"""What the broker tells the operator about each move: containerd events, Kubernetes pod events and
Prometheus metrics. None of them may hold up or fail a move: each failure is a log line.

- containerd: topic ``/kybernate/broker/release`` or ``/kybernate/broker/wake`` in the container's
  namespace, a ``containerd.events.ContainerUpdate`` whose labels carry the facts (`ctr events`:
  ``{"id":"c1","labels":{"kybernate.io/event":"wake","reason":"connection on port 8080",
  "duration_s":"0.412","bytes":"2147483648",...}}``).
- Kubernetes (containers of a pod, where the broker has in-cluster credentials: the service account's
  token and CA, KUBERNETES_SERVICE_HOST/PORT): a core/v1 Event on the pod, reason ``GpuReleased`` or
  ``GpuWoken``, posted by component ``kybernate-broker``.
- Prometheus (``[broker] metrics_address``): kybernate_broker_releases_total{trigger},
  kybernate_broker_wakes_total{trigger}, kybernate_broker_wake_seconds (histogram),
  kybernate_broker_bytes_moved_total{direction}, kybernate_broker_failures_total{operation},
  kybernate_broker_probes_answered_total{kind}, kybernate_broker_containers{phase}.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import socket
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Mapping, Optional

log = logging.getLogger("kybernate.broker")

TOPIC_RELEASE = "/kybernate/broker/release"
TOPIC_WAKE = "/kybernate/broker/wake"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
LABEL_POD_NAMESPACE = "io.kubernetes.pod.namespace"
LABEL_POD_NAME = "io.kubernetes.pod.name"
LABEL_POD_UID = "io.kubernetes.pod.uid"


@dataclass(frozen=True)
class Move:
    """One release or wake, as every channel reports it."""

    kind: str               # "release" | "wake"
    namespace: str
    container_id: str
    name: str               # NS/POD/CONTAINER or NS/ID
    trigger: str            # idle | make-room | command | connection | exec | restart
    reason: str             # a sentence: "idle 300 s", "connection on port 8080", ...
    duration_s: float
    bytes: int
    gpus: tuple[str, ...]
    labels: Mapping[str, str]   # the container's containerd labels (the pod's, for CRI containers)

    def facts(self) -> dict[str, str]:
        return {"kybernate.io/event": self.kind, "trigger": self.trigger, "reason": self.reason,
                "duration_s": f"{self.duration_s:.3f}", "bytes": str(self.bytes), "gpus": ",".join(self.gpus)}


class Metrics:
    """The broker's Prometheus metrics in a registry of their own, served on ``address``."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = CollectorRegistry()
        self.releases = Counter("kybernate_broker_releases", "Containers parked (VRAM to host RAM)",
                                ["trigger"], registry=self.registry)
        self.wakes = Counter("kybernate_broker_wakes", "Containers woken (VRAM back on the GPU)",
                             ["trigger"], registry=self.registry)
        self.wake_seconds = Histogram("kybernate_broker_wake_seconds", "Time from a wake request to a resident container",
                                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
                                      registry=self.registry)
        self.bytes_moved = Counter("kybernate_broker_bytes_moved", "VRAM bytes moved by releases and wakes",
                                   ["direction"], registry=self.registry)
        self.failures = Counter("kybernate_broker_failures", "Releases and wakes that failed", ["operation"],
                                registry=self.registry)
        self.probes = Counter("kybernate_broker_probes_answered", "Probes answered for parked containers",
                              ["kind"], registry=self.registry)
        self.containers = Gauge("kybernate_broker_containers", "Containers the broker knows, by phase",
                                ["phase"], registry=self.registry)
        self.server = None

    def serve(self, address: str) -> None:
        from prometheus_client import start_http_server
        from shim.policy.node import split_host_port
        host, port = split_host_port(address)
        self.server, _ = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class KubeEvents:
    """Posts core/v1 Events about pods to the API server (urllib, in a thread)."""

    def __init__(self, api: str, token: str, ca_file: Optional[str], node: str, token_file: str = ""):
        self.api = api.rstrip("/")
        self.token = token
        self.token_file = token_file        # read again at each post: projected tokens are rotated
        self.context = ssl.create_default_context(cafile=ca_file) if api.startswith("https") else None
        self.node = node

    @classmethod
    def in_cluster(cls, environ: Mapping[str, str] = os.environ, sa_dir: Optional[str] = None) -> Optional["KubeEvents"]:
        """From the pod's service account (KYBERNATE_SA_DIR: where the node sees it, for a broker run
        in the node's namespaces), None without one."""
        sa_dir = sa_dir or environ.get("KYBERNATE_SA_DIR") or SA_DIR
        host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT", "443")
        token_file = os.path.join(sa_dir, "token")
        if not host or not os.path.isfile(token_file):
            return None
        with open(token_file) as f:
            token = f.read().strip()
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", token, os.path.join(sa_dir, "ca.crt"),
                   environ.get("NODE_NAME") or socket.gethostname(), token_file)

    def event_for(self, move: Move, now: Optional[datetime.datetime] = None) -> Optional[dict]:
        ns, pod = move.labels.get(LABEL_POD_NAMESPACE), move.labels.get(LABEL_POD_NAME)
        if not (ns and pod):
            return None
        stamp = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
        what = "released its GPU memory to host RAM" if move.kind == "release" else "got its GPU memory back"
        involved = {"kind": "Pod", "namespace": ns, "name": pod, "apiVersion": "v1"}
        if move.labels.get(LABEL_POD_UID):
            involved["uid"] = move.labels[LABEL_POD_UID]
        return {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{pod}.kybernate-", "namespace": ns},
            "involvedObject": involved,
            "reason": "GpuReleased" if move.kind == "release" else "GpuWoken",
            "message": f"container {move.name} {what} ({move.reason}): {move.bytes / (1 << 30):.2f} GiB "
                       f"in {move.duration_s:.3f} s",
            "type": "Normal",
            "source": {"component": "kybernate-broker", "host": self.node},
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
            "reportingComponent": "kybernate-broker", "reportingInstance": self.node,
        }

    def post(self, event: dict) -> int:
        if self.token_file:
            with open(self.token_file) as f:
                self.token = f.read().strip()
        ns = event["metadata"]["namespace"]
        req = urllib.request.Request(f"{self.api}/api/v1/namespaces/{ns}/events", method="POST",
                                     data=json.dumps(event).encode(),
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10, context=self.context) as resp:
            return resp.status


class Notifier:
    def __init__(self, containerd=None, metrics: Optional[Metrics] = None, kube: Optional[KubeEvents] = None):
        self.containerd = containerd
        self.metrics = metrics
        self.kube = kube

    async def moved(self, move: Move) -> None:
        if self.metrics is not None:
            if move.kind == "release":
                self.metrics.releases.labels(move.trigger).inc()
                self.metrics.bytes_moved.labels("to_host").inc(move.bytes)
            else:
                self.metrics.wakes.labels(move.trigger).inc()
                self.metrics.wake_seconds.observe(move.duration_s)
                self.metrics.bytes_moved.labels("to_gpu").inc(move.bytes)
        if self.containerd is not None:
            from .containerd import update_event
            topic = TOPIC_RELEASE if move.kind == "release" else TOPIC_WAKE
            try:
                await self.containerd.publish(move.namespace, topic, update_event(move.container_id, move.facts()))
            except Exception as exc:   # noqa: BLE001 - never fails the move
                log.warning("event %s for %s not published to containerd: %s", topic, move.name, exc)
        if self.kube is not None:
            event = self.kube.event_for(move)
            if event is not None:
                try:
                    await asyncio.to_thread(self.kube.post, event)
                except (OSError, urllib.error.URLError, ValueError) as exc:
                    log.warning("Kubernetes event for %s not posted: %s", move.name, exc)

    def failed(self, operation: str) -> None:
        if self.metrics is not None:
            self.metrics.failures.labels(operation).inc()

    def probe(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.probes.labels(kind).inc()

    def phases(self, counts: Mapping[str, int]) -> None:
        if self.metrics is not None:
            for phase, n in counts.items():
                self.metrics.containers.labels(phase).set(n)
