"""The harness itself, with containerd's own runc shim on containerd 1.6, 1.7 and 2.1: images import and
run, detached tasks can be killed and deleted, restart keeps tasks, each version runs its own runc,
and stop() leaves no process, mount, cgroup, socket or directory behind."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from .harness import (BUSYBOX_REF, RUNC_RUNTIME, VERSIONS, Containerd, listening_unix_sockets, mounts_under,
                      process_alive, shim_socket_path,
                      unavailable_reason)


def task_status(cd: Containerd, cid: str) -> tuple[int, str] | None:
    """(pid, status) of the task from `ctr tasks ls`, None when there is none."""
    for line in cd.ctr("tasks", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return int(fields[1]), fields[2]
    return None


def wait_status(cd: Containerd, cid: str, want: str, timeout: float = 10.0) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        st = task_status(cd, cid)
        if st and st[1] == want:
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"task {cid} is {st}, not {want}, after {timeout}s")
        time.sleep(0.05)


def proc_cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


def test_run_rm_prints_output_and_leaves_no_container(containerd, container_id):
    r = containerd.ctr("run", "--rm", "--runtime", RUNC_RUNTIME, BUSYBOX_REF, container_id,
                       "sh", "-c", "echo hello-$((6*7)); seq 3; echo to-stderr >&2")
    assert r.stdout == "hello-42\n1\n2\n3\n"
    assert "to-stderr" in r.stderr
    assert container_id not in containerd.ctr("containers", "ls", "-q").stdout.split()
    assert task_status(containerd, container_id) is None


def test_run_rm_exit_code_is_passed_through(containerd, container_id):
    r = containerd.ctr("run", "--rm", BUSYBOX_REF, container_id, "sh", "-c", "exit 3", check=False)
    assert r.returncode == 3, (r.stdout, r.stderr)


def test_detached_run_kill_delete(containerd, container_id):
    script = 'trap "exit 7" TERM; echo started; while true; do sleep 0.1; done'
    containerd.ctr("run", "-d", "--runtime", RUNC_RUNTIME, BUSYBOX_REF, container_id, "sh", "-c", script)
    pid, status = wait_status(containerd, container_id, "RUNNING")
    assert proc_cmdline(pid)[:2] == ["sh", "-c"]
    assert len(containerd.shim_pids()) >= 1
    socket = shim_socket_path(containerd.address, containerd.namespace, container_id)
    assert socket.exists(), f"shim socket {socket} missing"

    containerd.ctr("tasks", "kill", container_id)              # SIGTERM, trapped: exit 7
    wait_status(containerd, container_id, "STOPPED")
    r = containerd.ctr("tasks", "delete", container_id)
    assert "exit code 7" in r.stderr, r.stderr                   # ctr reports the task's status
    assert task_status(containerd, container_id) is None
    assert not process_alive(pid)
    containerd.ctr("containers", "delete", container_id)
    assert container_id not in containerd.ctr("containers", "ls", "-q").stdout.split()
    assert not (containerd.runc_root / container_id).exists()
    deadline = time.monotonic() + 5
    while socket.exists() and time.monotonic() < deadline:   # the shim exits after its last task
        time.sleep(0.05)
    assert not socket.exists()


def test_each_version_runs_its_own_runc_shim_and_criu(containerd, container_id):
    inst = containerd.install
    assert containerd.which("runc") == str(inst.runc)
    assert containerd.which("containerd-shim-runc-v2") == str(inst.bin_dir / "containerd-shim-runc-v2")
    if os.access("/usr/local/sbin/criu", os.X_OK):
        assert containerd.which("criu") == "/usr/local/sbin/criu"
    containerd.ctr("run", "-d", BUSYBOX_REF, container_id, "sleep", "1000")
    state = json.loads((containerd.runc_root / container_id / "state.json").read_text())
    # runc >= 1.2 records the time namespace; bookworm's 1.1.5 does not know it.
    assert ("NEWTIME" in state["namespace_paths"]) == (containerd.version == "2.1")


def test_image_holds_busybox_applets_and_extra_files(containerd, container_id):
    ref = containerd.import_busybox("docker.io/kybernate/busybox:extra",
                                    extra_files={"/opt/kyb/hello.txt": "hello from an extra file\n",
                                                 "/usr/local/bin/greet": "#!/bin/sh\necho greet $1\n"})
    r = containerd.ctr("run", "--rm", ref, container_id, "sh", "-c",
                       "cat /opt/kyb/hello.txt; greet x; date +%Y >/dev/null && ls /bin/sleep /bin/cat /bin/seq")
    assert r.stdout.splitlines() == ["hello from an extra file", "greet x", "/bin/cat", "/bin/seq", "/bin/sleep"]


def test_restart_keeps_running_tasks(containerd, container_id):
    containerd.ctr("run", "-d", BUSYBOX_REF, container_id, "sleep", "1000")
    pid, _ = wait_status(containerd, container_id, "RUNNING")
    old = containerd.pid
    containerd.restart()
    assert containerd.pid != old
    assert task_status(containerd, container_id) == (pid, "RUNNING")
    containerd.ctr("tasks", "kill", "-s", "SIGKILL", container_id)
    wait_status(containerd, container_id, "STOPPED")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("containerd_alive", [True, False], ids=["graceful", "after-crash"])
def test_stop_leaves_nothing_behind(version, containerd_alive, runtime_name, tmp_path):
    reason = unavailable_reason(version)
    if reason:
        pytest.skip(reason)
    workdir = tmp_path / "cd"
    cd = Containerd(version, workdir)
    cd.start()
    try:
        cd.import_busybox()
        cd.ctr("run", "-d", "--runtime", runtime_name, BUSYBOX_REF, "left-running", "sleep", "1000")
        pid, _ = wait_status(cd, "left-running", "RUNNING")
        shims = cd.shim_pids()
        assert shims
        assert mounts_under(cd.state), "expected the task's rootfs mount under state"
        cgroups = [p for p in Path("/sys/fs/cgroup").glob(f"*/{cd.namespace}/left-running")]
        assert cgroups
        sockets = listening_unix_sockets(shims)
        if runtime_name == RUNC_RUNTIME:
            assert shim_socket_path(cd.address, cd.namespace, "left-running") in sockets
            if version == "2.1":                 # 2.x shims run with -debug open a second socket
                assert shim_socket_path(cd.address, cd.namespace, "left-running", debug=True) in sockets
        assert sockets
        if not containerd_alive:
            os.kill(cd.pid, signal.SIGKILL)      # stop() must clean up without containerd's help
            cd.proc.wait(10)
    finally:
        cd.stop()
    assert cd.leftovers() == []
    assert not process_alive(pid)
    assert not any(process_alive(s) for s in shims)
    assert not any(p.exists() for p in cgroups)
    assert [s for s in sockets if s.exists()] == []
    assert not cd.run_dir.exists()
    assert sorted(p.name for p in workdir.iterdir()) == ["containerd.log"]
