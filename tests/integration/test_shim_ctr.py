"""Our shim under real containerd (1.6, 1.7, 2.1), driven by ctr, side by side with runc-v2.

Every scenario runs with io.containerd.runc.v2 and io.containerd.kybernate.v1 on the same containerd
and compares what a user sees (output, exit codes, states); each also asserts the expected values
themselves, so two shims that are wrong the same way still fail.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import pty
import secrets
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .harness import BUSYBOX_REF, KYBERNATE_RUNTIME, RUNC_RUNTIME, Containerd

RUNTIMES = (RUNC_RUNTIME, KYBERNATE_RUNTIME)


def uid(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def short(runtime: str) -> str:
    return runtime.split(".")[2]


def run(cd: Containerd, *args, input: str | None = None, timeout: float = 60):
    r = cd.ctr(*args, check=False, input=input, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def cleanup(cd: Containerd, *ids: str) -> None:
    for cid in ids:
        cd.ctr("tasks", "kill", "-a", "-s", "SIGKILL", cid, check=False, timeout=15)
    for cid in ids:
        cd.ctr("tasks", "delete", "-f", cid, check=False, timeout=30)
        cd.ctr("containers", "delete", cid, check=False, timeout=30)


def task_status(cd: Containerd, cid: str) -> str | None:
    for line in cd.ctr("tasks", "ls", check=False).stdout.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == cid:
            return parts[-1]
    return None


def wait_status(cd: Containerd, cid: str, want: set[str | None], timeout: float = 15) -> str | None:
    deadline = time.monotonic() + timeout
    status = task_status(cd, cid)
    while status not in want and time.monotonic() < deadline:
        time.sleep(0.1)
        status = task_status(cd, cid)
    return status


def bundle_dir(cd: Containerd, cid: str) -> Path:
    return cd.state / "io.containerd.runtime.v2.task" / cd.namespace / cid


def shim_pid_of(cd: Containerd, cid: str) -> int:
    """The shim serving `cid`: the one listening on the address recorded for its bundle."""
    b = bundle_dir(cd, cid)
    for name in ("shim.pid",):
        if (b / name).exists():
            return int((b / name).read_text())
    address = shim_address(cd, cid).removeprefix("unix://")
    inode = None
    with open("/proc/net/unix") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[-1] == address:
                inode = parts[6]
    assert inode, f"no listener for {address}"
    for pid in cd.shim_pids():
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                pass
    raise AssertionError(f"no shim process holds {address}")


def shim_address(cd: Containerd, cid: str) -> str:
    return shim_endpoint(cd, cid)[0]


def shim_endpoint(cd: Containerd, cid: str) -> tuple[str, str]:
    """(address, task service name) containerd uses for `cid`'s shim."""
    b = bundle_dir(cd, cid)
    if (b / "bootstrap.json").exists():
        params = json.loads((b / "bootstrap.json").read_text())
        return params["address"], f"containerd.task.v{params.get('version', 2)}.Task"
    return (b / "address").read_text().strip(), "containerd.task.v2.Task"


def run_in_pty(cmd: list[str], env: dict, timeout: float = 30) -> tuple[int, str]:
    """Run `cmd` with a terminal as its stdio (what `ctr run -t` needs); its exit code and output."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
                            start_new_session=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([master], [], [], 0.1)
        if r:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    try:
        rc = proc.wait(timeout=max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    os.close(master)
    return rc, out.decode(errors="replace")


def side_by_side(observe, reference_tries: int = 3) -> dict:
    """observe(runtime) for both runtimes; asserts they saw the same and returns kybernate's view.

    The reference (runc-v2) now and then loses the output of a short-lived `ctr run --rm` (its stdout or
    stderr lines missing, exit code right: seen on 1.6 and 1.7, and counted in test_soak.py): where the
    two differ, runc-v2 alone is observed again, up to `reference_tries` times in all. Kybernate is
    observed once and must match; its own view is also checked against fixed values by the callers."""
    seen = {rt: observe(rt) for rt in RUNTIMES}
    for _ in range(reference_tries - 1):
        if seen[KYBERNATE_RUNTIME] == seen[RUNC_RUNTIME]:
            break
        seen[RUNC_RUNTIME] = observe(RUNC_RUNTIME)
    assert seen[KYBERNATE_RUNTIME] == seen[RUNC_RUNTIME], seen
    return seen[KYBERNATE_RUNTIME]


def test_run_rm_output_and_exit_codes(containerd):
    def observe(rt):
        out = {}
        for name, args in (("echo", ["echo", "hi"]),
                           ("exit1", ["sh", "-c", "echo out; echo err >&2; exit 1"]),
                           ("exit0", ["sh", "-c", "exit 0"]),
                           ("big", ["sh", "-c", "seq 1 30000; echo done"])):
            cid = uid(f"{name}-{short(rt)}")
            rc, stdout, stderr = run(containerd, "run", "--rm", "--runtime", rt, BUSYBOX_REF, cid, *args)
            out[name] = (rc, stdout if name != "big" else (len(stdout.splitlines()), stdout[-10:]),
                         "err" in stderr)
            assert containerd.ctr("containers", "ls", "-q").stdout.split().count(cid) == 0
        return out

    seen = side_by_side(observe)
    assert seen["echo"] == (0, "hi\n", False)
    assert seen["exit1"] == (1, "out\n", True)
    assert seen["exit0"] == (0, "", False)
    assert seen["big"] == (0, (30001, "0000\ndone\n"), False)


def test_exit_137_when_killed(containerd):
    def observe(rt):
        cid = uid(f"k9-{short(rt)}")
        proc = subprocess.Popen([str(containerd.install.ctr), "--address", containerd.address, "--namespace",
                                 containerd.namespace, "run", "--rm", "--runtime", rt, BUSYBOX_REF, cid,
                                 "sleep", "1000"], env=containerd.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert wait_status(containerd, cid, {"RUNNING"}) == "RUNNING"
            run(containerd, "tasks", "kill", "-s", "SIGKILL", cid)
            rc = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            cleanup(containerd, cid)
        return rc

    assert side_by_side(observe) == 137


def test_tty(containerd):
    def observe(rt):
        cid = uid(f"tty-{short(rt)}")
        cmd = [str(containerd.install.ctr), "--address", containerd.address, "--namespace", containerd.namespace,
               "run", "--rm", "-t", "--runtime", rt, BUSYBOX_REF, cid, "sh", "-c", "tty; echo done; exit 2"]
        try:
            rc, out = run_in_pty(cmd, containerd.env)
        finally:
            cleanup(containerd, cid)
        return rc, "/dev/pts/0" in out, "done" in out

    assert side_by_side(observe) == (2, True, True)


def test_stdin_piped_through(containerd):
    def observe(rt):
        cid = uid(f"in-{short(rt)}")
        # ctr run never sends CloseIO (with either shim), so the process reads what it needs and exits
        rc, stdout, _ = run(containerd, "run", "--rm", "--runtime", rt, BUSYBOX_REF, cid, "sh", "-c",
                            "read a; read b; echo \"got:$a:$b\"", input="line one\nline two\n", timeout=30)
        cleanup(containerd, cid)
        return rc, stdout

    assert side_by_side(observe) == (0, "got:line one:line two\n")


def test_detached_exec_ps_pause_metrics_kill_delete(containerd):
    def observe(rt):
        cid = uid(f"det-{short(rt)}")
        seen = {}
        try:
            seen["run"] = run(containerd, "run", "-d", "--runtime", rt, BUSYBOX_REF, cid, "sleep", "1000")[0]
            seen["status"] = task_status(containerd, cid)
            rc, out, _ = run(containerd, "tasks", "exec", "--exec-id", "e1", cid, "sh", "-c", "echo from-exec; exit 4")
            seen["exec"] = (rc, out)
            rc, out, _ = run(containerd, "tasks", "exec", "--exec-id", "e2", cid, "cat", input="exec stdin\n")
            seen["exec-stdin"] = (rc, out)
            rc, out, _ = run(containerd, "tasks", "exec", "--exec-id", "e1", cid, "true")
            seen["exec-id-reused-after-exit"] = rc
            bg = subprocess.Popen([str(containerd.install.ctr), "--address", containerd.address, "--namespace",
                                   containerd.namespace, "tasks", "exec", "--exec-id", "bg", cid, "sleep", "500"],
                                  env=containerd.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            rc, out, _ = run(containerd, "tasks", "exec", "--exec-id", "bg", cid, "true")
            seen["exec-id-in-use"] = rc != 0
            rc, out, _ = run(containerd, "tasks", "ps", cid)
            seen["ps"] = (rc, len(out.splitlines()) - 1, "bg" in out)
            seen["pause"] = run(containerd, "tasks", "pause", cid)[0], task_status(containerd, cid)
            seen["pause-again"] = run(containerd, "tasks", "pause", cid)[0] != 0
            seen["resume"] = run(containerd, "tasks", "resume", cid)[0], task_status(containerd, cid)
            rc, out, _ = run(containerd, "tasks", "metrics", cid)
            seen["metrics"] = rc, sorted({line.split()[0] for line in out.splitlines()[2:] if line.strip()
                                          and not line.startswith("METRIC")} & {
                "memory.usage_in_bytes", "memory.limit_in_bytes", "cpuacct.usage", "pids.current",
                "memory.usage", "cpu.usage_usec"})
            seen["kill"] = run(containerd, "tasks", "kill", "-s", "SIGKILL", cid)[0]
            bg.wait(timeout=30)
            seen["bg-exec-rc"] = bg.returncode
            seen["stopped"] = wait_status(containerd, cid, {"STOPPED"})
            seen["kill-gone"] = run(containerd, "tasks", "kill", "-s", "SIGKILL", cid)[0] != 0
            seen["delete"] = run(containerd, "tasks", "delete", cid)[0]
            seen["gone"] = task_status(containerd, cid)
            seen["cdelete"] = run(containerd, "containers", "delete", cid)[0]
        finally:
            cleanup(containerd, cid)
        return seen

    seen = side_by_side(observe)
    assert seen["run"] == 0 and seen["status"] == "RUNNING"
    assert seen["exec"] == (4, "from-exec\n")
    assert seen["exec-stdin"] == (0, "exec stdin\n")
    assert seen["exec-id-in-use"] is True
    assert seen["ps"][0] == 0 and seen["ps"][1] == 2 and seen["ps"][2] is True
    assert seen["pause"] == (0, "PAUSED") and seen["pause-again"] is True
    assert seen["resume"] == (0, "RUNNING")
    assert seen["metrics"][0] == 0 and len(seen["metrics"][1]) >= 2
    assert seen["kill"] == 0 and seen["stopped"] == "STOPPED" and seen["kill-gone"] is True
    assert seen["bg-exec-rc"] == 137
    # ctr tasks delete reports the exit status in its own exit code only in some versions
    assert seen["delete"] in (0, 137) and seen["gone"] is None and seen["cdelete"] == 0


def test_execs_with_background_children_stall_nothing(containerd):
    """An exec that leaves a child in the background with its stdout open (`sleep 20 & exit 5`, what
    many exec probes do): its exit is reported when it exits, and while five of them are waiting for
    their output to close, a plain exec of the same container answers as quickly as under runc-v2.
    Kubernetes exec probes would time out otherwise."""
    timings: dict[str, dict[str, float]] = {}
    for rt in RUNTIMES:
        cid = uid(f"bgexec-{short(rt)}")
        seen: dict[str, float] = {}
        try:
            assert run(containerd, "run", "-d", "--runtime", rt, BUSYBOX_REF, cid, "sleep", "600")[0] == 0
            t0 = time.monotonic()
            rc, out, err = run(containerd, "tasks", "exec", "--exec-id", "z0", cid, "sh", "-c",
                               "echo started; sleep 20 & exit 5")
            seen["one"] = time.monotonic() - t0
            assert (rc, out) == (5, "started\n"), (rt, rc, out, err)

            def background_exec(i: int):
                return run(containerd, "tasks", "exec", "--exec-id", f"z{i}", cid, "sh", "-c", "sleep 20 & exit 5")

            with concurrent.futures.ThreadPoolExecutor(5) as pool:
                started = time.monotonic()
                pending = [pool.submit(background_exec, i) for i in range(1, 6)]
                # plain execs, one after the other, for as long as the five are in any stage of
                # exiting and being deleted (and 4 s at least): the slowest is what a probe would see
                plain: list[float] = []
                while not all(f.done() for f in pending) or time.monotonic() - started < 4:
                    t0 = time.monotonic()
                    rc, out, err = run(containerd, "tasks", "exec", "--exec-id", f"plain{len(plain)}", cid,
                                       "echo", "plain")
                    plain.append(time.monotonic() - t0)
                    assert (rc, out) == (0, "plain\n"), (rt, rc, out, err)
                    time.sleep(0.2)
                assert [f.result()[0] for f in pending] == [5] * 5
                seen["five"] = time.monotonic() - started
                seen["plain"] = max(plain)
            assert task_status(containerd, cid) == "RUNNING"
        finally:
            cleanup(containerd, cid)
        timings[short(rt)] = seen
    kyb, runc = timings["kybernate"], timings["runc"]
    # runc-v2 waits 2 s (containerd 1.x) or 10 s (2.x) for such an exec's output, holding nothing else
    assert kyb["plain"] < 2.0 and kyb["plain"] < runc["plain"] + 1.0, timings
    assert kyb["one"] < max(runc["one"], 2.0) + 1.5, timings


def test_update_resources_over_the_shim_socket(containerd):
    """ctr has no `task update`: call the shim's Update as containerd would, for both shims."""
    from google.protobuf import any_pb2, empty_pb2
    from proto.containerd.task.v2 import shim_pb2 as api
    from ttrpc import BlockingClient

    def observe(rt):
        cid = uid(f"upd-{short(rt)}")
        try:
            assert run(containerd, "run", "-d", "--runtime", rt, BUSYBOX_REF, cid, "sleep", "1000")[0] == 0
            limit = 48 * 1024 * 1024
            res = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
                              value=json.dumps({"memory": {"limit": limit}, "cpu": {"shares": 512}}).encode())
            address, service = shim_endpoint(containerd, cid)
            with BlockingClient(address, timeout=10) as client:
                client.call(service, "Update", api.UpdateTaskRequest(id=cid, resources=res),
                            empty_pb2.Empty, timeout=30)
            pid = int(containerd.ctr("tasks", "ls").stdout.split(cid)[1].split()[0])
            cg = dict(line.split(":", 2)[1:] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines())
            mem = Path("/sys/fs/cgroup/memory") / cg["memory"].lstrip("/") / "memory.limit_in_bytes"
            shares = Path("/sys/fs/cgroup/cpu") / cg["cpu,cpuacct" if "cpu,cpuacct" in cg else "cpu"].lstrip("/") / "cpu.shares"
            return int(mem.read_text()), int(shares.read_text()) if shares.exists() else None
        finally:
            cleanup(containerd, cid)

    if not Path("/sys/fs/cgroup/memory").is_dir():
        pytest.skip("cgroup v1 memory controller not mounted")
    limit, shares = side_by_side(observe)
    assert limit == 48 * 1024 * 1024
    assert shares in (512, None)


def test_twenty_containers_at_once(containerd):
    def observe(rt):
        ids = [uid(f"many{i}-{short(rt)}") for i in range(20)]
        try:
            with concurrent.futures.ThreadPoolExecutor(20) as pool:
                rcs = list(pool.map(lambda cid: run(containerd, "run", "-d", "--runtime", rt, BUSYBOX_REF, cid,
                                                    "sleep", "1000", timeout=120)[0], ids))
            statuses = [task_status(containerd, cid) for cid in ids]
            with concurrent.futures.ThreadPoolExecutor(20) as pool:
                kills = list(pool.map(lambda cid: run(containerd, "tasks", "kill", "-s", "SIGKILL", cid)[0], ids))
            stopped = [wait_status(containerd, cid, {"STOPPED"}) for cid in ids]
            with concurrent.futures.ThreadPoolExecutor(20) as pool:
                deletes = list(pool.map(lambda cid: run(containerd, "tasks", "delete", cid, timeout=120)[0], ids))
            return rcs, statuses, kills, stopped, deletes
        finally:
            cleanup(containerd, *ids)

    rcs, statuses, kills, stopped, deletes = side_by_side(observe)
    assert rcs == [0] * 20 and statuses == ["RUNNING"] * 20 and kills == [0] * 20
    assert stopped == ["STOPPED"] * 20 and len(set(deletes)) == 1 and deletes[0] in (0, 137)


def test_containerd_restart_keeps_tasks_controllable(containerd):
    ids = {rt: uid(f"rs-{short(rt)}") for rt in RUNTIMES}
    try:
        for rt, cid in ids.items():
            assert run(containerd, "run", "-d", "--runtime", rt, BUSYBOX_REF, cid, "sleep", "1000")[0] == 0
        containerd.restart()
        seen = {}
        for rt, cid in ids.items():
            obs = [task_status(containerd, cid)]
            rc, out, _ = run(containerd, "tasks", "exec", "--exec-id", "after", cid, "echo", "still here")
            if rt == RUNC_RUNTIME and rc == 0 and not out:
                # the reference lost a short exec's output after the restart (seen once on 2.1): observe
                # it again; kybernate is observed once and must match
                rc, out, _ = run(containerd, "tasks", "exec", "--exec-id", "after2", cid, "echo", "still here")
            obs.append((rc, out))
            obs.append(run(containerd, "tasks", "pause", cid)[0])
            obs.append(task_status(containerd, cid))
            obs.append(run(containerd, "tasks", "resume", cid)[0])
            obs.append(run(containerd, "tasks", "kill", "-s", "SIGKILL", cid)[0])
            obs.append(wait_status(containerd, cid, {"STOPPED"}))
            obs.append(run(containerd, "tasks", "delete", cid)[0])
            seen[rt] = obs
        assert seen[KYBERNATE_RUNTIME] == seen[RUNC_RUNTIME]
        assert seen[KYBERNATE_RUNTIME][:7] == ["RUNNING", (0, "still here\n"), 0, "PAUSED", 0, 0, "STOPPED"]
        assert seen[KYBERNATE_RUNTIME][7] in (0, 137)
    finally:
        cleanup(containerd, *ids.values())


def test_shim_killed_containerd_cleans_up(containerd):
    sockets = {}

    def observe(rt):
        cid = uid(f"sk-{short(rt)}")
        try:
            assert run(containerd, "run", "-d", "--runtime", rt, BUSYBOX_REF, cid, "sleep", "1000")[0] == 0
            task_pid = int(containerd.ctr("tasks", "ls").stdout.split(cid)[1].split()[0])
            sockets[rt] = Path(shim_address(containerd, cid).removeprefix("unix://"))
            os.kill(shim_pid_of(containerd, cid), signal.SIGKILL)
            status = wait_status(containerd, cid, {"STOPPED", None})
            deadline = time.monotonic() + 15
            while Path(f"/proc/{task_pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            task_alive = Path(f"/proc/{task_pid}").exists()
            delete_rc = run(containerd, "tasks", "delete", cid)[0]
            cdelete = run(containerd, "containers", "delete", cid)[0]
            with open("/proc/self/mountinfo") as f:
                mounted = str(bundle_dir(containerd, cid)) in f.read()
            return status, task_alive, cdelete, mounted, delete_rc in (0, 1, 137)
        finally:
            cleanup(containerd, cid)

    status, task_alive, cdelete, mounted, delete_ok = side_by_side(observe)
    assert status in ("STOPPED", None) and task_alive is False
    assert cdelete == 0 and mounted is False and delete_ok
    # our `delete` removes the dead shim's socket (runc-v2 leaves it in /run/containerd/s)
    assert not sockets[KYBERNATE_RUNTIME].exists()


def test_tty_window_size_is_passed_on(containerd):
    """ctr resizes the console to its own terminal's size (ResizePty)."""
    import fcntl
    import struct
    import termios

    def observe(rt):
        cid = uid(f"ws-{short(rt)}")
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 37, 101, 0, 0))
        cmd = [str(containerd.install.ctr), "--address", containerd.address, "--namespace", containerd.namespace,
               "run", "--rm", "-t", "--runtime", rt, BUSYBOX_REF, cid, "sh", "-c", "sleep 0.5; stty size"]
        proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=containerd.env,
                                start_new_session=True)
        os.close(slave)
        out = b""
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                r, _, _ = select.select([master], [], [], 0.1)
                if r:
                    try:
                        chunk = os.read(master, 4096)
                    except OSError:
                        break
                    if not chunk:
                        break
                    out += chunk
                elif proc.poll() is not None:
                    break
            rc = proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(master)
            cleanup(containerd, cid)
        return rc, "37 101" in out.decode(errors="replace")

    assert side_by_side(observe) == (0, True)


def test_log_uri_file_and_binary(containerd, tmp_path):
    """--log-uri file:// (appended) and binary:// (a logging program on fds 3, 4 and 5)."""
    logger = tmp_path / "logger.sh"
    logger.write_text("#!/bin/sh\n"
                      "out=\"$1\"\n"
                      "echo \"id=$CONTAINER_ID ns=$CONTAINER_NAMESPACE\" >> \"$out\"\n"
                      "exec 5>&-\n"  # ready (before the readers start, or they would hold fd 5 open)
                      "cat <&3 >> \"$out\" &\n"
                      "cat <&4 >> \"$out\" &\n"
                      "wait\n")
    logger.chmod(0o755)

    def observe(rt):
        out = {}
        cid = uid(f"lf-{short(rt)}")
        file_log = tmp_path / f"{cid}.log"  # each observation its own files (side_by_side may observe again)
        file_log.write_text("before\n")
        rc = run(containerd, "run", "--rm", "--log-uri", f"file://{file_log}", "--runtime", rt, BUSYBOX_REF, cid,
                 "sh", "-c", "echo to-file; echo err-to-file >&2")[0]
        out["file"] = rc, sorted(file_log.read_text().splitlines())
        cid = uid(f"lb-{short(rt)}")
        bin_log = tmp_path / f"{cid}-bin.log"
        rc = run(containerd, "run", "--rm", "--log-uri", f"binary://{logger}?{bin_log}", "--runtime", rt,
                 BUSYBOX_REF, cid, "sh", "-c", "echo to-binary; echo err-to-binary >&2")[0]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the logger is its own process: it may lag behind ctr
            text = bin_log.read_text() if bin_log.exists() else ""
            if "err-to-binary" in text and "\nto-binary" in text:
                break
            time.sleep(0.1)
        lines = bin_log.read_text().splitlines()
        out["binary"] = rc, sorted(lines[1:]), lines[0] == f"id={cid} ns={containerd.namespace}"
        return out

    seen = side_by_side(observe)
    assert seen["file"] == (0, ["before", "err-to-file", "to-file"])
    assert seen["binary"] == (0, ["err-to-binary", "to-binary"], True)


def test_oom_event(containerd):
    """A container killed by the OOM killer: exit 137 and a /tasks/oom event, as with runc-v2."""
    if not Path("/sys/fs/cgroup/memory").is_dir() and not Path("/sys/fs/cgroup/cgroup.controllers").exists():
        pytest.skip("no memory cgroup")

    def observe(rt):
        cid = uid(f"oom-{short(rt)}")
        events = subprocess.Popen([str(containerd.install.ctr), "--address", containerd.address, "events"],
                                  env=containerd.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            time.sleep(0.3)
            rc = run(containerd, "run", "--rm", "--memory-limit", str(16 * 1024 * 1024), "--runtime", rt,
                     BUSYBOX_REF, cid, "tail", "/dev/zero")[0]
            # ctr run --rm returns when the task is deleted; the /tasks/delete event may reach the
            # events stream a little later on a busy machine: give it time, then stop reading
            time.sleep(1.5)
        finally:
            events.terminate()
            text = events.communicate(timeout=10)[0]
            cleanup(containerd, cid)
        topics = [next(t for t in line.split() if t.startswith("/")) for line in text.splitlines()
                  if cid in line and " /tasks/" in line]
        return rc, "/tasks/oom" in topics, topics.index("/tasks/exit") < topics.index("/tasks/delete")

    assert side_by_side(observe) == (137, True, True)


def _criu_works() -> bool:
    try:
        from criu.binary import criu_check, find_criu

        return criu_check(find_criu())[0]
    except Exception:
        return False


@pytest.mark.skipif(not _criu_works(), reason="CRIU missing or `criu check` fails here")
def test_checkpoint_with_ctr(containerd):
    """`ctr tasks checkpoint` (a checkpoint image in containerd's content store); the task goes on."""
    def observe(rt):
        cid = uid(f"ck-{short(rt)}")
        try:
            assert run(containerd, "run", "-d", "--runtime", rt, BUSYBOX_REF, cid, "sh", "-c",
                       "while true; do sleep 0.1; done")[0] == 0
            rc, out, err = run(containerd, "tasks", "checkpoint", cid, timeout=120)
            return rc, out.strip().startswith(f"containerd.io/checkpoint/{cid}:"), task_status(containerd, cid), err
        finally:
            cleanup(containerd, cid)

    rc, named, status, err = side_by_side(observe)
    assert (rc, named, status) == (0, True, "RUNNING"), err


def test_exec_with_tty(containerd):
    def observe(rt):
        cid = uid(f"xt-{short(rt)}")
        try:
            assert run(containerd, "run", "-d", "--runtime", rt, BUSYBOX_REF, cid, "sleep", "1000")[0] == 0
            cmd = [str(containerd.install.ctr), "--address", containerd.address, "--namespace", containerd.namespace,
                   "tasks", "exec", "-t", "--exec-id", "t1", cid, "sh", "-c", "tty; exit 6"]
            rc, out = run_in_pty(cmd, containerd.env)
            return rc, "/dev/pts/" in out
        finally:
            cleanup(containerd, cid)

    assert side_by_side(observe) == (6, True)


def test_bad_input_through_ctr(containerd):
    """What a ctr user gets wrong, the same answers from both shims (and the shim keeps serving)."""
    def observe(rt):
        cid = uid(f"bad-{short(rt)}")
        seen = {}
        try:
            assert run(containerd, "run", "-d", "--runtime", rt, BUSYBOX_REF, cid, "sleep", "1000")[0] == 0
            seen["dup-run"] = run(containerd, "run", "-d", "--runtime", rt, BUSYBOX_REF, cid, "true")[0] != 0
            seen["path-id"] = run(containerd, "run", "-d", "--runtime", rt, BUSYBOX_REF, "../x", "true")[0] != 0
            seen["delete-running"] = run(containerd, "tasks", "delete", cid)[0] != 0
            seen["resume-running"] = run(containerd, "tasks", "resume", cid)[0] != 0
            seen["kill-unknown"] = run(containerd, "tasks", "kill", "nosuch-" + cid)[0] != 0
            seen["exec-unknown"] = run(containerd, "tasks", "exec", "--exec-id", "x", "nosuch-" + cid, "true")[0] != 0
            seen["exec-missing-binary"] = run(containerd, "tasks", "exec", "--exec-id", "nb", cid, "/no/such")[0] != 0
            seen["still-running"] = task_status(containerd, cid)
        finally:
            cleanup(containerd, cid)
        return seen

    seen = side_by_side(observe)
    assert all(v is True for k, v in seen.items() if k != "still-running"), seen
    assert seen["still-running"] == "RUNNING"
