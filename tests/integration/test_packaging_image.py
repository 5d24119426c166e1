"""packaging/Containerfile built with buildah from Debian alone, and its containers run under containerd
as the installer DaemonSet runs them, against a stand-in node.

1. A Debian bookworm base image made here (debootstrap --variant=minbase from Debian's archive, cached in
   /var/cache/kybernate-test; no other registry is reachable), then the Containerfile built with buildah
   on it (its wheels stage fetches our dependencies' wheels from PyPI for the nodes' Python).
2. The images imported into a private containerd 1.6. A "node" container stands in for the node: a Debian
   with python3, in the host's pid namespace (as hostPID gives the DaemonSet's containers), with its own
   /opt, /etc/containerd, /usr/local/bin, /etc/kybernate and /run/kybernate (dirs of this test) and the
   host's cgroupfs. The DaemonSet's two containers run as the YAML says (privileged, host pid, the same
   /host mounts, the same entry points), with KYBERNATE_HOST_PID naming the stand-in node's process
   instead of the real pid 1, so nothing of this machine is installed on or restarted:
   - `install`: installs Kybernate on the node offline from the image's wheelhouse (venv built by the
     node's python3, the links, the runtime merged into the node's config.toml) and says so;
   - `broker`: waits for the venv and runs `kybernate broker serve` in the node's namespaces, against the
     private containerd (GPU readings from the stand-in file, as in tests/integration/test_broker.py).
3. The broker so started parks an idle kybernate container of that containerd and a connection wakes it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .broker_support import FakeGpu, GiB, free_port, http_get, run_server, task_status, wait_for
from .harness import REPO, Containerd, unavailable_reason

CACHE = Path(os.environ.get("KYB_IMAGE_CACHE", "/var/cache/kybernate-test"))
DEBIAN_MIRROR = os.environ.get("KYB_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE = "localhost/kybernate-test/debian:bookworm"
NODE = "localhost/kybernate-test/node:bookworm"
INSTALLER = "localhost/kybernate-installer:test"
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"

pytestmark = pytest.mark.slow


def _run(*cmd, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def _have_image(name: str) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", name], capture_output=True).returncode == 0


def debian_base() -> str:
    """The Debian bookworm base image in buildah's store (made once from a cached debootstrap rootfs)."""
    if _have_image(BASE):
        return BASE
    CACHE.mkdir(parents=True, exist_ok=True)
    rootfs_tar = CACHE / "debian-bookworm-minbase.tar"
    if not rootfs_tar.exists():
        rootfs = CACHE / "rootfs.tmp"
        shutil.rmtree(rootfs, ignore_errors=True)
        _run("debootstrap", "--variant=minbase", "bookworm", rootfs, DEBIAN_MIRROR, timeout=900)
        _run("tar", "-C", rootfs, "-cf", f"{rootfs_tar}.tmp", ".")
        os.replace(f"{rootfs_tar}.tmp", rootfs_tar)
        shutil.rmtree(rootfs, ignore_errors=True)
    working = _run("buildah", "from", "scratch").stdout.strip()
    try:
        _run("buildah", "add", working, rootfs_tar, "/")
        _run("buildah", "config", "--cmd", "/bin/sh", working)
        _run("buildah", "commit", "-q", working, BASE)
    finally:
        subprocess.run(["buildah", "rm", working], capture_output=True)
    return BASE


def build(containerfile: Path, tag: str, context: Path, *args: str) -> None:
    ca = ["-v", f"{HOST_CA}:/run/host-ca.crt:ro", "--build-arg", "PIP_CERT=/run/host-ca.crt"] if os.path.exists(HOST_CA) else []
    _run("buildah", "bud", "--pull=never", "--network", "host", "--build-arg", f"DEBIAN={BASE}", *ca, *args,
         "-f", containerfile, "-t", tag, context, timeout=1500)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    for tool in ("buildah", "debootstrap"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (scripts/setup.sh installs it)")
    if os.geteuid() != 0:
        pytest.skip("needs root")
    work = tmp_path_factory.mktemp("images")
    debian_base()
    subprocess.run(["buildah", "rmi", INSTALLER], capture_output=True)     # the previous run's, if any
    build(REPO / "packaging" / "Containerfile", INSTALLER, REPO, "--build-arg", "PYTHON_VERSION=3.11")
    subprocess.run(["buildah", "rmi", "--prune"], capture_output=True)     # the wheels stage, untagged
    node_cf = work / "Node.containerfile"
    node_cf.write_text("ARG DEBIAN\nFROM ${DEBIAN}\nRUN apt-get update && apt-get install -y --no-install-recommends "
                       "python3 python3-venv && rm -rf /var/lib/apt/lists/*\n")
    if not _have_image(NODE):
        build(node_cf, NODE, work)
    archives = {}
    for name, ref in ((INSTALLER, "docker.io/kybernate/installer:test"), (NODE, "docker.io/kybernate/node:test")):
        path = work / (ref.split("/")[-1].replace(":", "-") + ".tar")
        _run("buildah", "push", "-q", name, f"docker-archive:{path}:{ref}")
        archives[ref] = path
    return archives


def _mount(src: Path, dst: str, ro: bool = False) -> list[str]:
    return ["--mount", f"type=bind,src={src},dst={dst},options=rbind:{'ro' if ro else 'rw'}"]


def test_the_containerfile_builds_and_its_containers_install_and_run_the_broker(images, tmp_path):
    reason = unavailable_reason("1.6")
    if reason:
        pytest.skip(reason)
    cd = Containerd("1.6", tmp_path / "cd")
    node_dirs = {name: tmp_path / "node" / name for name in ("opt", "etc-containerd", "bin", "etc-kybernate", "run-kybernate")}
    for d in node_dirs.values():
        d.mkdir(parents=True)
    (node_dirs["etc-kybernate"] / "config.toml").write_text(
        '[broker]\nsocket = "/run/kybernate/broker.sock"\nstate_dir = "/run/kybernate/broker"\npoll_s = 0.2\n'
        'min_idle_s = 1\nsilent_wake_s = 0.5\nkube_events = false\n')
    gpu = FakeGpu(node_dirs["run-kybernate"] / "readings.json")
    try:
        cd.start()
        cd.import_busybox()
        for ref, archive in images.items():
            cd.ctr("images", "import", archive, timeout=300)
        # the host's pid namespace, as hostPID: named through this process (pid 1 of this machine may not be
        # opened by runc here)
        host_pid = ["--privileged", "--with-ns", f"pid:/proc/{os.getpid()}/ns/pid"]
        # the stand-in node
        cd.ctr("run", "-d", "--null-io", *host_pid,
               *_mount(node_dirs["opt"], "/opt"), *_mount(node_dirs["etc-containerd"], "/etc/containerd"),
               *_mount(node_dirs["bin"], "/usr/local/bin"), *_mount(node_dirs["etc-kybernate"], "/etc/kybernate"),
               *_mount(node_dirs["run-kybernate"], "/run/kybernate"), *_mount(cd.run_dir, str(cd.run_dir)),
               *_mount(Path("/sys/fs/cgroup"), "/sys/fs/cgroup"),
               "docker.io/kybernate/node:test", "node", "sleep", "100000")
        node_pid = _task_pid(cd, "node")
        # the DaemonSet's `install` container
        install_log = tmp_path / "install.log"
        cd.ctr("run", "-d", "--log-uri", f"file://{install_log}", *host_pid,
               "--env", f"KYBERNATE_HOST_PID={node_pid}",
               "--env", "KYBERNATE_INSTALL_ARGS=--containerd-version 1.6 --restart-command true",
               *_mount(node_dirs["opt"], "/host/opt"), *_mount(node_dirs["etc-containerd"], "/host/etc/containerd", ro=True),
               *_mount(node_dirs["bin"], "/host/usr/local/bin", ro=True),
               "docker.io/kybernate/installer:test", "install")
        wait_for(lambda: "kybernate installed on this node" in _text(install_log) or task_status(cd, "install") == "STOPPED",
                 400, interval=1, what="the install container")
        assert "kybernate installed on this node" in _text(install_log), _text(install_log)[-4000:]
        assert (node_dirs["opt"] / "kybernate" / "venv" / "bin" / "kybernate").exists()
        assert os.readlink(node_dirs["bin"] / "containerd-shim-kybernate-v1") == "/opt/kybernate/venv/bin/containerd-shim-kybernate-v1"
        assert "io.containerd.kybernate.v1" in (node_dirs["etc-containerd"] / "config.toml").read_text()
        # the DaemonSet's `broker` container
        broker_log = tmp_path / "broker.log"
        cd.ctr("run", "-d", "--log-uri", f"file://{broker_log}", *host_pid,
               "--env", f"KYBERNATE_HOST_PID={node_pid}", "--env", f"CONTAINERD_ADDRESS={cd.address}",
               "--env", "KYBERNATE_BROKER_ARGS=--gpu-readings /run/kybernate/readings.json",
               *_mount(node_dirs["opt"], "/host/opt", ro=True),
               "docker.io/kybernate/installer:test", "broker", "/bin/sh", "/kybernate/broker-entrypoint.sh")
        socket_path = node_dirs["run-kybernate"] / "broker.sock"
        wait_for(lambda: socket_path.exists() or task_status(cd, "broker") == "STOPPED", 120, interval=0.5,
                 what="the broker's socket")
        assert socket_path.exists(), _text(broker_log)[-4000:]
        # it does its job: an idle kybernate container is parked, a connection wakes it
        port = free_port()
        pid = run_server(cd, "web", port, "kybernate.io/idle-release-after=1s")
        gpu.holds(pid, 2 * GiB)
        from broker.control import call
        wait_for(lambda: any(c["id"] == "web" and c["phase"] == "parked"
                             for c in call(str(socket_path), {"op": "status"})["containers"]), 30,
                 what=f"web parked by the broker in the DaemonSet's container\n{_text(broker_log)[-3000:]}")
        assert task_status(cd, "web") == "PAUSED"
        assert http_get(port, timeout=30) == (200, "hello from web\n")
        assert task_status(cd, "web") == "RUNNING"
        assert "broker serving /run/kybernate/broker.sock" in _text(broker_log)
        # the DaemonSet's `store` container: the tier worker, in the node's namespaces
        store_log = tmp_path / "store.log"
        cd.ctr("run", "-d", "--log-uri", f"file://{store_log}", *host_pid, "--env", f"KYBERNATE_HOST_PID={node_pid}",
               *_mount(node_dirs["opt"], "/host/opt", ro=True),
               "docker.io/kybernate/installer:test", "store", "/bin/sh", "/kybernate/store-entrypoint.sh")
        wait_for(lambda: "tier worker" in _text(store_log) or task_status(cd, "store") == "STOPPED", 120,
                 interval=0.5, what="the tier worker")
        assert "starting the tier worker in the namespaces of pid" in _text(store_log), _text(store_log)[-3000:]
        assert "tier worker" in _text(store_log) and task_status(cd, "store") == "RUNNING", _text(store_log)[-3000:]
    finally:
        cd.stop()
    assert not cd.leftovers()


def _task_pid(cd: Containerd, cid: str) -> int:
    for line in cd.ctr("tasks", "ls").stdout.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == cid:
            return int(parts[1])
    raise AssertionError(f"no task {cid}")


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def test_the_daemonset_runs_the_broker_with_the_entry_point_the_image_has():
    """The YAML and the image agree: the broker container's command is the entry point the Containerfile
    copies; its service account may create events and nothing else (read as text: no YAML library here)."""
    yaml_text = (REPO / "packaging" / "kubernetes" / "installer-daemonset.yaml").read_text()
    containerfile = (REPO / "packaging" / "Containerfile").read_text()
    assert 'command: ["/bin/sh", "/kybernate/broker-entrypoint.sh"]' in yaml_text
    assert "COPY packaging/kubernetes/broker-entrypoint.sh /kybernate/broker-entrypoint.sh" in containerfile
    assert 'command: ["/bin/sh", "/kybernate/store-entrypoint.sh"]' in yaml_text  # the tier worker
    assert "COPY packaging/kubernetes/store-entrypoint.sh /kybernate/store-entrypoint.sh" in containerfile
    assert "hostPID: true" in yaml_text and "serviceAccountName: kybernate-broker" in yaml_text
    rules = yaml_text[yaml_text.index("kind: ClusterRole\n"):yaml_text.index("---", yaml_text.index("kind: ClusterRole\n"))]
    assert 'resources: ["events"]' in rules and 'verbs: ["create", "patch"]' in rules and rules.count("resources") == 1
    assert yaml_text.count("broker-token") == 2    # the projected token: mounted, and its volume
