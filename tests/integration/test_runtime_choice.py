"""Which OCI runtime runs a container under real containerd, and what a GPU request in it counts for.

- `ctr run --env NVIDIA_VISIBLE_DEVICES=all` (what every CUDA image carries, and what a pod author can
  write): the node config does not accept it by default, so the container runs as a CPU container
  with runc, and the shim's log (through containerd's) has the audit line.
- Device nodes already in the spec (`ctr run --device`, as containerd's CDI support leaves them):
  a plain device runs as before; NVIDIA-numbered nodes (195:N, made here in a temp dir: no driver
  answers them, runc only creates them) make a GPU container that runs with plain runc, with no
  nvidia-container-runtime on containerd's PATH.
- A node config that accepts the env and names a runtime (`[gpu] accept_visible_devices_env`,
  `nvidia_runtime`): that runtime runs the container (a stand-in script that records its call and
  runs runc), and nothing is ignored.
"""
from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path

import pytest

from .harness import BUSYBOX_REF, KYBERNATE_RUNTIME, Containerd, unavailable_reason


def bundle_state(cd: Containerd, cid: str) -> dict:
    """The shim's record of its choice in the task's bundle (kybernate.json)."""
    path = cd.state / "io.containerd.runtime.v2.task" / cd.namespace / cid / "kybernate.json"
    return json.loads(path.read_text())


def run_detached(cd: Containerd, *args: str) -> None:
    cd.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME, *args, timeout=60)


def audit_lines(cd: Containerd, cid: str) -> list[str]:
    return [ln for ln in cd.log_text().splitlines() if "AUDIT" in ln and f"container={cid} " in ln]


def mknod(path: Path, major: int, minor: int) -> Path:
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    return path


def test_env_only_gpu_request_runs_as_a_cpu_container(containerd, container_id):
    cd = containerd
    assert cd.which("nvidia-container-runtime") is None, "this test is about a node without the NVIDIA runtime"
    out = cd.ctr("run", "--rm", "--runtime", KYBERNATE_RUNTIME, "--env", "NVIDIA_VISIBLE_DEVICES=all", BUSYBOX_REF,
                 container_id, "sh", "-c", "echo env=$NVIDIA_VISIBLE_DEVICES; ls /dev/nvidia* 2>&1 || echo no-gpu",
                 timeout=60).stdout
    assert "env=all" in out and "no-gpu" in out, out
    log = cd.log_text()
    assert f"container {container_id}: OCI runtime {cd.which('runc')} (runc: a CPU container; " \
           f"NVIDIA_VISIBLE_DEVICES=all ignored" in log, cd.log_tail()
    [line] = audit_lines(cd, container_id)
    assert (f"AUDIT ignored container={container_id} namespace={cd.namespace} key=NVIDIA_VISIBLE_DEVICES "
            f"value='all' why=node config") in line
    assert "accept_visible_devices_env = false" in line and "runs without GPUs" in line


def test_env_void_is_no_request_and_no_audit(containerd, container_id):
    cd = containerd
    cd.ctr("run", "--rm", "--runtime", KYBERNATE_RUNTIME, "--env", "NVIDIA_VISIBLE_DEVICES=void", BUSYBOX_REF,
           container_id, "true", timeout=60)
    assert f"container {container_id}: OCI runtime {cd.which('runc')} (default: runc" in cd.log_text()
    assert audit_lines(cd, container_id) == []


def test_plain_device_in_the_spec_still_runs(containerd, container_id, tmp_path):
    cd = containerd
    plain = mknod(tmp_path / "plain-null", 1, 3)  # what /dev/null is
    out = cd.ctr("run", "--rm", "--runtime", KYBERNATE_RUNTIME, "--device", str(plain), BUSYBOX_REF, container_id,
                 "sh", "-c", f"test -c {plain} && echo ok > {plain} && echo done", timeout=60).stdout
    assert out.strip() == "done", out
    assert f"container {container_id}: OCI runtime {cd.which('runc')} (default: runc" in cd.log_text()


def test_gpu_device_nodes_in_the_spec_run_with_plain_runc(containerd, container_id, tmp_path):
    cd = containerd
    assert cd.which("nvidia-container-runtime") is None
    gpu = mknod(tmp_path / "nvidia0", 195, 0)
    ctl = mknod(tmp_path / "nvidiactl", 195, 255)
    try:
        run_detached(cd, "--device", str(gpu), "--device", str(ctl),
                     "--env", "NVIDIA_VISIBLE_DEVICES=all", BUSYBOX_REF, container_id,
                     "sh", "-c", f"test -c {gpu} && test -c {ctl} && sleep 30")
        state = bundle_state(cd, container_id)
        assert state["binary"] == cd.which("runc"), state
        assert "GPU device nodes are already in the spec" in state["reason"] and str(gpu) in state["reason"], state
        status = [ln.split() for ln in cd.ctr("tasks", "ls").stdout.splitlines()[1:]]
        assert [p[-1] for p in status if p and p[0] == container_id] == ["RUNNING"], status
        # the image's NVIDIA_VISIBLE_DEVICES beside devices in the spec asks nothing: no audit line
        assert audit_lines(cd, container_id) == []
    finally:
        cd.ctr("tasks", "kill", "-s", "SIGKILL", container_id, check=False, timeout=15)


ACCEPTING_CONFIG = """\
[gpu]
accept_visible_devices_env = true
nvidia_runtime = "{runtime}"
"""


@pytest.fixture
def accepting_containerd(tmp_path):
    """A containerd (the first selected version) whose shims read a node config that accepts
    NVIDIA_VISIBLE_DEVICES and names a stand-in NVIDIA runtime: a script that records its argv and
    runs runc."""
    from .conftest import _selected_versions

    version = _selected_versions()[0]
    reason = unavailable_reason(version)
    if reason:
        pytest.skip(reason)
    cd = Containerd(version, tmp_path / "cd")
    calls = tmp_path / "runtime-calls"
    runtime = tmp_path / "bin" / "fake-nvidia-container-runtime"
    runtime.parent.mkdir()
    runtime.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\nexec {cd.runc_path} \"$@\"\n")
    runtime.chmod(0o755)
    config = tmp_path / "kybernate.toml"
    config.write_text(ACCEPTING_CONFIG.format(runtime=runtime))
    config.chmod(0o644)
    cd.env["KYBERNATE_CONFIG"] = str(config)
    try:
        cd.start()
        cd.import_busybox()
        yield cd, runtime, calls
    finally:
        cd.stop()
        assert not cd.leftovers(), cd.leftovers()


def test_env_request_accepted_by_the_node_goes_to_its_nvidia_runtime(accepting_containerd):
    cd, runtime, calls = accepting_containerd
    cid = f"accepted-{secrets.token_hex(3)}"
    out = cd.ctr("run", "--rm", "--runtime", KYBERNATE_RUNTIME, "--env", "NVIDIA_VISIBLE_DEVICES=0", BUSYBOX_REF,
                 cid, "echo", "through-the-named-runtime", timeout=60).stdout
    assert out.strip() == "through-the-named-runtime"
    assert f"container {cid}: OCI runtime {runtime} ([gpu] nvidia_runtime={runtime} injects the devices of " \
           f"NVIDIA_VISIBLE_DEVICES=0)" in cd.log_text(), cd.log_tail()
    assert any(line.startswith("--root") and " create " in f" {line} " and cid in line
               for line in calls.read_text().splitlines()), calls.read_text()
    assert audit_lines(cd, cid) == []
