"""Kybernate at the Kubernetes level: containerd's CRI API driven with the generated Python client the
way kubelet drives it, on containerd 1.7 and 2.1.

containerd runs with the harness's config in which the kybernate runtime entry is replaced by exactly
what the node installer writes (packaging/containerd_toml.py: runtime_type, pod_annotations and
container_annotations kybernate.io/*, options). Pods use host networking (no CNI here) and the
harness's local pause image; nothing is pulled.

- pod lifecycle: RunPodSandbox with runtime_handler "kybernate", two containers created, started,
  ExecSync'd, stopped and removed, the pod stopped and removed; one shim process serves the whole pod
  (psutil), pod and container annotations kybernate.io/* reach the containers' OCI specs, the shim is
  gone afterwards;
- the operator command at this level: `kybernate ps`, `kybernate checkpoint NS/POD/CONTAINER`, and its
  refusals (unknown pod, container not run by kybernate);
- restore through the pod annotation kybernate.io/restore-from;
- containerd 2.1: CRI CheckpointContainer writes kubelet's checkpoint archive, and that archive is
  restored (CreateContainer with the archive as image).
"""
from __future__ import annotations

import http.server
import json
import os
import re
import secrets
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest

from proto.k8s.cri.runtime.v1 import api_pb2 as cri
from proto.k8s.cri.runtime.v1 import api_pb2_grpc as cri_grpc

from .harness import BUSYBOX_REF, PAUSE_REF, VENV_BIN, Containerd, unavailable_reason
from .checkpoint_support import stands_still
from .images import build_image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "packaging"))
import containerd_toml as ct  # noqa: E402  (what the node installer writes)

sys.path.remove(str(REPO / "packaging"))

VERSIONS = ("1.7", "2.1")
HANDLER = "kybernate"
SHIM_NAME = "containerd-shim-kybernate-v1"
KYBERNATE = VENV_BIN / "kybernate"
# /tmp/hold parks it between writes, so that a dump never catches /tmp/count open (a restore into a
# fresh rootfs could not reopen it): see checkpoint_support.hold_counter
COUNTER = ["sh", "-c", "i=0; while :; do while [ -e /tmp/hold ]; do sleep 0.05; done; "
                       "i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done"]


class CriContainerd(Containerd):
    """The harness's containerd whose kybernate runtime entry is the installer's.

    Also restrict_oom_score_adj: kubelet asks for oom_score_adj -998 for the pause container, which this
    unprivileged-for-that machine refuses ("failed to update /proc/self/oom_score_adj: Permission
    denied" from runc init, for runc-v2 as for us); the CRI plugin's own option clamps it to
    containerd's value, as on nodes that run containerd inside a container.
    """

    def config_toml(self) -> str:
        out, skip = [], False
        cri_table = '[plugins."io.containerd.grpc.v1.cri"]'
        for line in super().config_toml().splitlines():
            if line.startswith("["):
                skip = ".runtimes.kybernate" in line
            if not skip:
                out.append(line)
            if line.strip() == cri_table:
                out.append("  restrict_oom_score_adj = true")
        if self.version == "2.1":
            out += ['[plugins."io.containerd.cri.v1.runtime"]', "  restrict_oom_score_adj = true"]
        base = "\n".join(out) + "\n"
        assert "restrict_oom_score_adj" in base
        version = (2, 1, 0) if self.version == "2.1" else (1, int(self.version.split(".")[1]), 0)
        return ct.merge_config(base, version, ct.RuntimeSettings()).text


def kubelet_labels(pod: str, uid: str, namespace: str = "kybtest") -> dict:
    """The labels kubelet puts on every sandbox and container (kybernate finds pods by them)."""
    return {"io.kubernetes.pod.name": pod, "io.kubernetes.pod.namespace": namespace,
            "io.kubernetes.pod.uid": uid}


class Cri:
    def __init__(self, cd: Containerd):
        self.cd = cd
        self.channel = grpc.insecure_channel("unix://" + cd.address)
        self.rt = cri_grpc.RuntimeServiceStub(self.channel)
        self.pods: list[str] = []
        self.uids: dict[str, str] = {}

    def run_pod(self, name: str, annotations: dict | None = None, handler: str = HANDLER,
                namespace: str = "kybtest") -> tuple[str, cri.PodSandboxConfig]:
        uid = secrets.token_hex(8)
        logs = self.cd.workdir / "pod-logs" / uid
        logs.mkdir(parents=True)
        config = cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=0),
            log_directory=str(logs),   # no hostname: host network means the host's UTS namespace
            labels={"app": name, **kubelet_labels(name, uid, namespace)}, annotations=annotations or {},
            linux=cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(
                namespace_options=cri.NamespaceOption(network=cri.NODE, pid=cri.CONTAINER, ipc=cri.POD))))
        self.uids[name] = uid
        pod_id = self.rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config, runtime_handler=handler),
                                       timeout=120).pod_sandbox_id
        self.pods.append(pod_id)
        return pod_id, config

    def create(self, pod_id: str, sandbox: cri.PodSandboxConfig, name: str, command: list[str],
               annotations: dict | None = None, image: str = BUSYBOX_REF, attempt: int = 0) -> str:
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name, attempt=attempt), image=cri.ImageSpec(image=image),
            command=command, annotations=annotations or {},
            labels={**kubelet_labels(sandbox.metadata.name, sandbox.metadata.uid, sandbox.metadata.namespace),
                    "io.kubernetes.container.name": name},
            log_path=f"{name}/{attempt}.log")
        return self.rt.CreateContainer(cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config,
                                                                  sandbox_config=sandbox),
                                       timeout=120).container_id

    def start(self, cid: str) -> None:
        self.rt.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=120)

    def state(self, cid: str) -> int:
        return self.rt.ContainerStatus(cri.ContainerStatusRequest(container_id=cid), timeout=30).status.state

    def exec(self, cid: str, cmd: list[str], timeout: int = 20) -> cri.ExecSyncResponse:
        return self.rt.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout), timeout=timeout + 10)

    def remove_pod(self, pod_id: str) -> None:
        self.rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
        self.rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
        if pod_id in self.pods:
            self.pods.remove(pod_id)

    def cleanup(self) -> None:
        for pod_id in list(self.pods):
            try:
                self.remove_pod(pod_id)
            except grpc.RpcError:
                pass
        self.channel.close()


@pytest.fixture(scope="module", params=VERSIONS, ids=lambda v: f"containerd-{v}")
def cri_cd(request, tmp_path_factory):
    reason = unavailable_reason(request.param)
    if reason:
        pytest.skip(reason)
    cd = CriContainerd(request.param, tmp_path_factory.mktemp(f"cri-{request.param}"))
    cd.start()
    try:
        cd.import_pause()
        cd.import_busybox(namespace="k8s.io")
        yield cd
    finally:
        cd.stop()
    assert not cd.leftovers()


@pytest.fixture
def client(cri_cd):
    c = Cri(cri_cd)
    yield c
    c.cleanup()


def is_kybernate_shim(proc: psutil.Process, cd: Containerd) -> bool:
    args = proc.cmdline()
    return any(a.endswith(SHIM_NAME) for a in args) and cd.address in args


def serving_shim(cd: Containerd, cid: str) -> psutil.Process:
    """The shim serving a task: the parent of its init process (the shim is the subreaper of its
    containers). Its command line may name another id: spare shims are started ahead (`warm`)."""
    parent = psutil.Process(task_pid(cd, cid)).parent()
    assert parent is not None and is_kybernate_shim(parent, cd), (cid, parent and parent.cmdline())
    return parent


def live_shims(cd: Containerd) -> list[psutil.Process]:
    """kybernate shim processes of this containerd that serve at least one container."""
    found = []
    for p in psutil.process_iter():
        try:
            if is_kybernate_shim(p, cd) and p.children():
                found.append(p)
        except psutil.Error:
            pass
    return found


def task_pid(cd: Containerd, cid: str) -> int:
    out = cd.ctr("tasks", "ls", namespace="k8s.io").stdout
    for line in out.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == cid:
            return int(parts[1])
    raise AssertionError(f"no task {cid} in `ctr -n k8s.io tasks ls`:\n{out}")


def spec_annotations(cd: Containerd, cid: str) -> dict:
    info = json.loads(cd.ctr("containers", "info", cid, namespace="k8s.io").stdout)
    return info["Spec"].get("annotations", {})


def wait_for(predicate, timeout: float = 15, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def kybernate(cd: Containerd, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(KYBERNATE), "--address", cd.address, *args], capture_output=True, text=True,
                          timeout=timeout, env=cd.env)


def read_count(client: Cri, cid: str) -> int:
    r = client.exec(cid, ["cat", "/tmp/count"])
    return int(r.stdout.decode().strip() or 0) if r.exit_code == 0 else -1


# ---- the pod lifecycle --------------------------------------------------------------------------------
def test_pod_lifecycle_through_cri_with_one_shim(cri_cd, client):
    version = client.rt.Version(cri.VersionRequest(version="v1"), timeout=10)
    assert version.runtime_name == "containerd"
    pod_id, sandbox = client.run_pod("lifecycle", annotations={"kybernate.io/probe": "from-the-pod",
                                                               "other.io/ignored": "x"})
    status = client.rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=30).status
    assert status.state == cri.SANDBOX_READY and status.runtime_handler == HANDLER

    main = client.create(pod_id, sandbox, "main", ["sleep", "3600"],
                         annotations={"kybernate.io/container-probe": "from-the-container"})
    side = client.create(pod_id, sandbox, "side", ["sh", "-c", "echo side started; exec sleep 3600"])
    assert client.state(main) == cri.CONTAINER_CREATED
    client.start(main)
    client.start(side)
    assert client.state(main) == cri.CONTAINER_RUNNING and client.state(side) == cri.CONTAINER_RUNNING

    r = client.exec(main, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 3)
    assert client.exec(main, ["true"]).exit_code == 0
    assert client.exec(side, ["cat", "/proc/1/cmdline"]).stdout.split(b"\0")[0] == b"sleep"

    # One shim for the pod: the sandbox and both containers are children of the same shim process,
    # and no other kybernate shim of this containerd serves anything.
    shims = {serving_shim(cri_cd, cid).pid for cid in (pod_id, main, side)}
    assert len(shims) == 1, shims
    shim = psutil.Process(shims.pop())
    assert [p.pid for p in live_shims(cri_cd)] == [shim.pid]
    assert sorted(c.pid for c in shim.children()) == sorted(task_pid(cri_cd, c) for c in (pod_id, main, side))

    # pod_annotations / container_annotations from the installer's entry pass kybernate.io/* through
    ann = spec_annotations(cri_cd, main)
    assert ann.get("kybernate.io/probe") == "from-the-pod"
    assert ann.get("kybernate.io/container-probe") == "from-the-container"
    assert "other.io/ignored" not in ann
    assert spec_annotations(cri_cd, side).get("kybernate.io/probe") == "from-the-pod"

    t0 = time.monotonic()
    client.rt.StopContainer(cri.StopContainerRequest(container_id=main, timeout=10), timeout=60)
    assert client.state(main) == cri.CONTAINER_EXITED
    assert time.monotonic() - t0 < 15
    client.rt.RemoveContainer(cri.RemoveContainerRequest(container_id=main), timeout=60)
    with pytest.raises(grpc.RpcError) as exc:
        client.state(main)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    assert shim.is_running(), "the pod's shim must outlive one of its containers"
    client.remove_pod(pod_id)   # stops `side` and the sandbox, removes them
    assert wait_for(lambda: not shim.is_running() or shim.status() == psutil.STATUS_ZOMBIE, 15), \
        "the shim did not exit after its pod was removed"
    assert not live_shims(cri_cd)
    listed = client.rt.ListContainers(cri.ListContainersRequest(), timeout=30).containers
    assert not [c for c in listed if c.pod_sandbox_id == pod_id]


def test_two_pods_get_two_shims(cri_cd, client):
    a, sa = client.run_pod("pod-a")
    b, sb = client.run_pod("pod-b")
    shims = {}
    for pod, sandbox in ((a, sa), (b, sb)):
        cid = client.create(pod, sandbox, "c", ["sleep", "3600"])
        client.start(cid)
        shims[pod] = {serving_shim(cri_cd, pod).pid, serving_shim(cri_cd, cid).pid}
    assert len(shims[a]) == 1 and len(shims[b]) == 1 and shims[a] != shims[b], shims
    client.remove_pod(a)
    client.remove_pod(b)
    assert wait_for(lambda: not live_shims(cri_cd), 15)


# ---- the operator command at the Kubernetes level -------------------------------------------------------
def test_kybernate_ps_lists_the_pod(cri_cd, client):
    pod_id, sandbox = client.run_pod("listed")
    cid = client.create(pod_id, sandbox, "app", ["sleep", "3600"])
    client.start(cid)
    r = kybernate(cri_cd, "ps", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["id"]: row for row in json.loads(r.stdout)}
    assert rows[cid]["pod"] == "kybtest/listed/app"
    assert rows[cid]["status"] == "running" and rows[cid]["pid"] == task_pid(cri_cd, cid)
    assert rows[cid]["pid"] in rows[cid]["pids"]
    assert pod_id in rows                       # the sandbox is a kybernate container too
    if not os.path.exists("/dev/nvidiactl"):
        assert rows[cid]["cuda"] is None and rows[cid]["cuda_note"] == "no driver"
    text = kybernate(cri_cd, "ps")
    assert "kybtest/listed/app" in text.stdout and "running" in text.stdout


def test_checkpoint_of_unknown_pod_or_foreign_container_is_refused(cri_cd, client):
    r = kybernate(cri_cd, "checkpoint", "kybtest/no-such-pod")
    assert r.returncode == 1
    assert "no pod kybtest/no-such-pod" in r.stderr
    pod_id, sandbox = client.run_pod("runc-pod", handler="")   # the default runtime: runc
    cid = client.create(pod_id, sandbox, "app", ["sleep", "3600"])
    client.start(cid)
    r = kybernate(cri_cd, "checkpoint", "kybtest/runc-pod/app")
    assert r.returncode == 1
    assert "is run by io.containerd.runc.v2, not by kybernate" in r.stderr
    r = kybernate(cri_cd, "checkpoint", "kybtest/runc-pod/nope")
    assert r.returncode == 1 and "no container 'nope' in pod kybtest/runc-pod" in r.stderr


def test_checkpoint_and_restore_through_the_pod_annotation(cri_cd, client):
    """`kybernate checkpoint NS/POD/CONTAINER` writes into the node's store, in the pod namespace's
    scope; a new pod of that namespace restores it by name through the pod annotation
    kybernate.io/restore-from (passed through by the installer's pod_annotations)."""
    pod_id, sandbox = client.run_pod("counter")
    cid = client.create(pod_id, sandbox, "counter", COUNTER)
    client.start(cid)
    assert wait_for(lambda: read_count(client, cid) >= 30, 20)
    client.exec(cid, ["touch", "/tmp/hold"])  # parked between writes: no /tmp/count open in the dump
    assert stands_still(lambda: read_count(client, cid)), "the counter did not stop at /tmp/hold"
    r = kybernate(cri_cd, "checkpoint", "kybtest/counter/counter", "--exit")
    assert r.returncode == 0, r.stdout + r.stderr
    parent = cri_cd.checkpoint_store / "k8s.io" / "kybtest" / "counter" / "counter"
    images = [d for d in parent.iterdir() if (d / "inventory.img").exists()]
    assert len(images) == 1 and f"checkpoint of kybtest/counter/counter" in r.stdout, (r.stdout, images)
    assert wait_for(lambda: client.state(cid) == cri.CONTAINER_EXITED, 15)
    client.remove_pod(pod_id)

    name = f"counter/counter/{images[0].name}"     # relative to the scope <store>/k8s.io/kybtest
    pod2, sandbox2 = client.run_pod("counter-restored", annotations={"kybernate.io/restore-from": name})
    restored = client.create(pod2, sandbox2, "counter", COUNTER)
    client.start(restored)
    assert client.state(restored) == cri.CONTAINER_RUNNING
    first = wait_for(lambda: max(read_count(client, restored), 0), 10)
    # A fresh start would count from 1; the restored process goes on from where it was checkpointed.
    assert first >= 30, first
    assert wait_for(lambda: read_count(client, restored) > first, 5)
    # the sandbox of the restored pod is a fresh pause container, not a restore
    assert client.rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod2),
                                      timeout=30).status.state == cri.SANDBOX_READY


def test_a_pod_of_another_namespace_cannot_restore_it(cri_cd, client):
    """The same checkpoint, named by a pod of another Kubernetes namespace (relative, or by its path
    in the store): the task's Create (CRI StartContainer) is refused with the one sentence for every
    refused restore."""
    pod_id, sandbox = client.run_pod("victim")
    cid = client.create(pod_id, sandbox, "app", COUNTER)
    client.start(cid)
    r = kybernate(cri_cd, "checkpoint", "kybtest/victim/app")
    assert r.returncode == 0, r.stdout + r.stderr
    image = next((cri_cd.checkpoint_store / "k8s.io" / "kybtest" / "victim" / "app").iterdir())
    client.remove_pod(pod_id)
    for value in (f"victim/app/{image.name}", str(image), f"../kybtest/victim/app/{image.name}"):
        pod2, sandbox2 = client.run_pod("thief", annotations={"kybernate.io/restore-from": value},
                                        namespace="other-team")
        thief = client.create(pod2, sandbox2, "app", COUNTER)
        with pytest.raises(grpc.RpcError) as refused:
            client.start(thief)
        assert "no checkpoint of that name that this container may restore from" in refused.value.details(), \
            refused.value.details()
        client.remove_pod(pod2)


def test_a_pod_asking_for_a_criu_plugin_dir_is_refused(cri_cd, client, tmp_path):
    """The pod annotation reaches the sandbox first: RunPodSandbox is refused naming the key, and a
    container annotation refuses the container's start; nothing is loaded from the directory."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    with pytest.raises(grpc.RpcError) as refused:
        client.run_pod("plugin", annotations={"kybernate.io/criu-plugin-dir": str(plugins)})
    assert f"kybernate.io/criu-plugin-dir={str(plugins)!r}" in refused.value.details(), refused.value.details()
    pod_id, sandbox = client.run_pod("plugin-container")
    cid = client.create(pod_id, sandbox, "app", COUNTER, annotations={"kybernate.io/criu-plugin-dir": str(plugins)})
    with pytest.raises(grpc.RpcError) as refused:
        client.start(cid)
    assert "plugin dir comes only from the node's config" in refused.value.details(), refused.value.details()


class Registry:
    """A read-only OCI distribution registry on 127.0.0.1 serving one image layout (no network here).

    The CRI restore of a checkpoint archive pulls the checkpoint's base image by its repo digest
    (containerd 2.1 CRImportCheckpoint: client.Pull(RootfsImageRef)) even when it is present locally;
    containerd talks plain HTTP to localhost registries."""

    def __init__(self, layout: Path):
        self.layout = layout
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                status, headers, data = registry.answer(self.path)
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"localhost:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def blob(self, digest: str) -> bytes | None:
        path = self.layout / "blobs" / digest.replace(":", "/")
        return path.read_bytes() if path.is_file() else None

    def answer(self, path: str) -> tuple[int, dict, bytes]:
        if path.rstrip("/") == "/v2":
            return 200, {"Docker-Distribution-API-Version": "registry/2.0"}, b"{}"
        m = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)", path)
        if not m:
            return 404, {}, b""
        _name, kind, ref = m.groups()
        if kind == "manifests":
            index = json.loads((self.layout / "index.json").read_text())
            desc = index["manifests"][0]
            if ref.startswith("sha256:") and ref != desc["digest"]:
                return 404, {}, b""
            return 200, {"Content-Type": desc["mediaType"], "Docker-Content-Digest": desc["digest"]}, \
                self.blob(desc["digest"])
        data = self.blob(ref)
        if data is None:
            return 404, {}, b""
        return 200, {"Content-Type": "application/octet-stream", "Docker-Content-Digest": ref}, data

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def registry_image(cri_cd, tmp_path):
    """busybox, served by a local registry and pulled into CRI's namespace with its repo digest name
    (as a kubelet pull makes it), so that its container's image_ref is `repo@sha256:...`."""
    if cri_cd.version != "2.1":
        pytest.skip("CRI CheckpointContainer is implemented from containerd 2.0 on")
    layout = tmp_path / "layout"
    layout.mkdir()
    reg = Registry(layout)
    try:
        ref = f"{reg.host}/kybernate/busybox:test"
        archive = build_image(tmp_path / "busybox.tar", ref=ref)
        with tarfile.open(archive.path) as tar:
            tar.extractall(layout)
        cri_cd.ctr("images", "pull", "--plain-http", ref, namespace="k8s.io", timeout=120)
        repo_digest = f"{ref.rsplit(':', 1)[0]}@{archive.manifest_digest}"
        cri_cd.ctr("images", "tag", ref, repo_digest, namespace="k8s.io")
        yield ref
    finally:
        reg.close()


def test_cri_checkpoint_archive_and_its_restore(cri_cd, client, tmp_path, registry_image):
    pod_id, sandbox = client.run_pod("archived")
    cid = client.create(pod_id, sandbox, "counter", COUNTER, image=registry_image)
    status = client.rt.ContainerStatus(cri.ContainerStatusRequest(container_id=cid), timeout=30).status
    assert "@sha256:" in status.image_ref, status.image_ref
    client.start(cid)
    assert wait_for(lambda: read_count(client, cid) >= 30, 20)
    archive = tmp_path / "counter.tar"
    try:
        client.rt.CheckpointContainer(cri.CheckpointContainerRequest(container_id=cid, location=str(archive),
                                                                      timeout=120), timeout=180)
    except grpc.RpcError as exc:
        pytest.fail(f"CRI CheckpointContainer: {exc.code().name}: {exc.details()}")
    assert client.state(cid) == cri.CONTAINER_RUNNING      # kubelet's checkpoints leave it running
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "checkpoint/inventory.img" in names, names
    assert {"config.dump", "spec.dump", "status.dump"} <= set(names), names
    client.remove_pod(pod_id)

    pod2, sandbox2 = client.run_pod("archive-restored")
    restored = client.create(pod2, sandbox2, "counter", COUNTER, image=str(archive))
    client.start(restored)
    first = wait_for(lambda: max(read_count(client, restored), 0), 10)
    assert first >= 30, first
    status = client.rt.ContainerStatus(cri.ContainerStatusRequest(container_id=restored), timeout=30).status
    assert status.annotations.get("restored") == "true"     # CRI's own mark of a restored container

    # the same archive through the operator command, into another running pod of ours
    pod3, _ = client.run_pod("archive-restored-by-kybernate")
    r = kybernate(cri_cd, "restore", "kybtest/archive-restored-by-kybernate/counter", "--from", str(archive))
    assert r.returncode == 0, r.stdout + r.stderr
    listed = client.rt.ListContainers(cri.ListContainersRequest(filter=cri.ContainerFilter(pod_sandbox_id=pod3)),
                                      timeout=30).containers
    assert len(listed) == 1 and listed[0].state == cri.CONTAINER_RUNNING
    assert f"as container {listed[0].id[:13]}" in r.stdout
    assert wait_for(lambda: read_count(client, listed[0].id) >= 30, 10)
