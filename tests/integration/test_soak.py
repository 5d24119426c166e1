"""Soak: many containers and many execs through both shims on one containerd, then nothing left.

Per runtime (io.containerd.runc.v2 and io.containerd.kybernate.v1, interleaved so both see the same
load): 500 containers through `ctr run --rm`, then 200 execs whose shell leaves a child in the
background with stdout open (`echo; sleep 10 & exit 5`, what exec probes often do). Afterwards, for
every container the soak made: no zombie whose parent is containerd or a shim, no shim daemon, no
mount under containerd's state dir, no bundle or runc state dir, no cgroup, no shim socket, nothing
in containerd's lists. The timings (wall time, median, p99, max per `ctr` call) are asserted both
absolutely and against runc-v2's, and are shown in the terminal summary ("timings").

Runs on containerd 1.6 only: 1.7 and 2.1 as well would triple its time.
Deselect with `-m "not soak"`. KYB_SOAK_SCALE scales the counts (default 1.0: 500 and 200).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import secrets
import statistics
import time
from dataclasses import dataclass

import pytest

from .harness import (BUSYBOX_REF, KYBERNATE_RUNTIME, RUNC_RUNTIME, SHIM_BINARY, Containerd, _all_pids,
                      _cgroup_mounts, _cmdline, _ppid, mounts_under, shim_socket_path)

pytestmark = [pytest.mark.soak, pytest.mark.slow]

SOAK_VERSION = "1.6"
RUNTIMES = (RUNC_RUNTIME, KYBERNATE_RUNTIME)
SCALE = float(os.environ.get("KYB_SOAK_SCALE", "1.0"))
RUNS = max(2, round(500 * SCALE))            # `ctr run --rm` per runtime
EXECS = max(2, round(200 * SCALE))           # execs with a background child per runtime
RUN_WORKERS = 4                              # ctr run --rm in flight (both runtimes together)
EXEC_HOSTS = 4                               # long-running containers per runtime the execs go into
EXEC_WORKERS = 16                            # execs in flight (both runtimes together)
BACKGROUND_SECONDS = 10                      # how long the exec's background child keeps stdout open
EXEC_RETURN_BOUND = 5.0                      # an exec with a background child returns within this
PHASE_BUDGET = 120.0 + 480.0 * SCALE         # a phase starts no new call after this: a shim that
                                             # hangs fails the soak instead of stalling CI for hours
CTR_TIMEOUT = 60.0
SETTLE = 20.0                                # how long leftovers may take to go after the last call


@dataclass(frozen=True)
class Call:
    runtime: str
    index: int
    seconds: float
    rc: int | None          # None: not started (phase budget spent) or ctr timed out
    stdout: str
    stderr: str


NOT_STARTED = "not started: the phase's time budget was spent"


def short(runtime: str) -> str:
    return runtime.split(".")[2]


@pytest.fixture
def soak_cd(containerd) -> Containerd:
    if containerd.version != SOAK_VERSION:
        pytest.skip(f"the soak runs on containerd {SOAK_VERSION} only (time); this is {containerd.version}")
    if not os.access(SHIM_BINARY, os.X_OK):
        pytest.fail(f"{SHIM_BINARY} is not installed (scripts/setup.sh)")
    return containerd


def _ctr_timed(cd: Containerd, runtime: str, index: int, deadline: float, *args) -> Call:
    if time.monotonic() > deadline:
        return Call(runtime, index, 0.0, None, "", NOT_STARTED)
    t0 = time.monotonic()
    try:
        r = cd.ctr(*args, check=False, timeout=CTR_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - subprocess.TimeoutExpired and the like: recorded, asserted
        return Call(runtime, index, time.monotonic() - t0, None, "", f"{type(exc).__name__}: {exc}")
    return Call(runtime, index, time.monotonic() - t0, r.returncode, r.stdout, r.stderr)


def _interleaved(count: int) -> list[tuple[str, int]]:
    return [(rt, i) for i in range(count) for rt in RUNTIMES]


def _stats(calls: list[Call], wall: float) -> dict[str, float]:
    """count, wall_s, median_s, p99_s and max_s of the calls that ran."""
    seconds = sorted(c.seconds for c in calls if c.rc is not None)
    if not seconds:
        return {"count": 0, "wall_s": round(wall, 1)}
    p99 = seconds[min(len(seconds) - 1, max(0, round(0.99 * len(seconds)) - 1))]
    return {"count": len(seconds), "wall_s": round(wall, 1), "median_s": round(statistics.median(seconds), 3),
            "p99_s": round(p99, 3), "max_s": round(seconds[-1], 3)}


def _wall(calls: list[Call], starts: dict[tuple[str, int], float], ends: dict[tuple[str, int], float]) -> float:
    keys = [(c.runtime, c.index) for c in calls if (c.runtime, c.index) in ends]
    if not keys:
        return 0.0
    return max(ends[k] for k in keys) - min(starts[k] for k in keys)


def _run_phase(jobs, workers: int, do) -> tuple[dict[str, list[Call]], dict[str, float], float]:
    """Runs do(runtime, index, deadline) over jobs with `workers` threads; the calls per runtime, each
    runtime's wall time (its first call's start to its last call's end) and the phase's wall time."""
    deadline = time.monotonic() + PHASE_BUDGET
    starts: dict[tuple[str, int], float] = {}
    ends: dict[tuple[str, int], float] = {}

    def job(rt_index):
        rt, i = rt_index
        starts[rt_index] = time.monotonic()
        call = do(rt, i, deadline)
        ends[rt_index] = time.monotonic()
        return call

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        calls = list(pool.map(job, jobs))
    phase_wall = time.monotonic() - t0
    per_runtime = {rt: [c for c in calls if c.runtime == rt] for rt in RUNTIMES}
    walls = {rt: _wall([c for c in per_runtime[rt] if c.rc is not None], starts, ends) for rt in RUNTIMES}
    return per_runtime, walls, phase_wall


# ---- what must be gone --------------------------------------------------------------------------------

def _process_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _is_warm_template(pid: int) -> bool:
    """The kybernate warm template (private action `warm`) stays for the next container; it is no
    shim of any container."""
    args = _cmdline(pid)
    return bool(args) and args[-1] == "warm"


def _is_warm_spare(pid: int) -> bool:
    """The template's spare daemon (``... warm-spare``), forked ahead for the next container."""
    args = _cmdline(pid)
    return bool(args) and args[-1] == "warm-spare"


def _leftovers(cd: Containerd, ids: list[str], shims_before: set[int]) -> list[str]:
    found: list[str] = []
    shims = set(cd.shim_pids())
    templates = {p for p in shims if _is_warm_template(p)}
    spares = {p for p in shims if _is_warm_spare(p)}
    if len(spares) > 1:
        found.append(f"{len(spares)} spare daemons for one containerd: {sorted(spares)}")
    daemons = shims - templates - spares - shims_before
    found += [f"shim pid {p} still running: {' '.join(_cmdline(p))}" for p in sorted(daemons)]
    if len(templates) > 1:
        found.append(f"{len(templates)} warm templates for one containerd: {sorted(templates)}")
    parents = (shims - shims_before) | ({cd.pid} if cd.pid else set())  # zombies of older shims: not ours
    for pid in _all_pids():
        if _process_state(pid) == "Z" and _ppid(pid) in parents:
            found.append(f"zombie pid {pid} (parent {_ppid(pid)}: {' '.join(_cmdline(_ppid(pid)))[:120]})")
    wanted = set(ids)
    tasks = set(cd.ctr("tasks", "ls", "-q", check=False, timeout=30).stdout.split()) & wanted
    containers = set(cd.ctr("containers", "ls", "-q", check=False, timeout=30).stdout.split()) & wanted
    snapshots = {line.split()[0] for line in
                 cd.ctr("snapshots", "ls", check=False, timeout=30).stdout.splitlines()[1:] if line.strip()}
    found += [f"task {t} still listed by containerd" for t in sorted(tasks)]
    found += [f"container {c} still listed by containerd" for c in sorted(containers)]
    found += [f"snapshot {s} still listed by containerd" for s in sorted(snapshots & wanted)]
    bundles = cd.state / "io.containerd.runtime.v2.task" / cd.namespace
    found += [f"mount {m}" for m in mounts_under(*(bundles / cid for cid in ids))]
    for cid in ids:
        for path in (bundles / cid, cd.runc_root / cid):
            if path.exists():
                found.append(f"state dir {path}")
        for debug in (False, True):
            sock = shim_socket_path(cd.address, cd.namespace, cid, debug)
            if sock.exists():
                found.append(f"shim socket {sock} of {cid}")
    for mnt in _cgroup_mounts():
        top = mnt / cd.namespace
        if top.is_dir():
            found += [f"cgroup {d}" for d in sorted(top.iterdir()) if d.is_dir() and d.name in wanted]
    return found


def _assert_nothing_left(cd: Containerd, ids: list[str], shims_before: set[int]) -> None:
    """Polls until nothing is left (shims exit and are reaped a moment after the last Delete)."""
    deadline = time.monotonic() + SETTLE
    left = _leftovers(cd, ids, shims_before)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _leftovers(cd, ids, shims_before)
    assert not left, f"{len(left)} leftovers {SETTLE:.0f}s after the soak:\n" + "\n".join(left[:40])


def _report(record_property, name: str, per_runtime: dict[str, list[Call]], walls: dict[str, float],
            phase_wall: float, expected) -> dict[str, dict[str, float]]:
    stats = {short(rt): _stats(per_runtime[rt], walls[rt]) for rt in RUNTIMES}
    for rt in RUNTIMES:
        stats[short(rt)]["lost_output"] = sum(1 for c in per_runtime[rt]
                                              if c.rc == expected(c.index)[0] and c.stdout != expected(c.index)[1])
    line = f"soak {name} (containerd {SOAK_VERSION}, phase {phase_wall:.1f}s): " + "; ".join(
        f"{rt} " + " ".join(f"{k}={v}" for k, v in s.items()) for rt, s in stats.items())
    record_property("timings", line)
    return stats


def _failures(calls: list[Call], expected, output: bool = True) -> list[str]:
    """What went wrong with the calls: expected(index) -> (exit code, stdout); output=False checks
    the exit code alone."""
    bad = []
    not_started = [c for c in calls if c.stderr == NOT_STARTED]
    if not_started:
        bad.append(f"{short(not_started[0].runtime)}: {len(not_started)} calls not started, the phase "
                   f"ran past its budget of {PHASE_BUDGET:.0f}s")
    for c in calls:
        if c.stderr == NOT_STARTED:
            continue
        want = expected(c.index)
        if ((c.rc, c.stdout) != want) if output else (c.rc != want[0]):
            bad.append(f"{short(c.runtime)} #{c.index}: rc={c.rc} stdout={c.stdout!r} (want {want}) "
                       f"stderr={c.stderr.strip()[-300:]!r} after {c.seconds:.1f}s")
    return bad


# ---- the soak ------------------------------------------------------------------------------------------

def test_soak_run_rm(soak_cd, record_property):
    """RUNS containers per runtime through `ctr run --rm`, each printing its index and exiting with
    its own code; then every one is gone without a trace, and kybernate's median stays within twice
    runc-v2's."""
    cd = soak_cd
    token = secrets.token_hex(2)
    shims_before = set(cd.shim_pids())

    def cid(rt: str, i: int) -> str:
        return f"soak-{token}-{short(rt)}-{i}"

    def expected(i: int) -> tuple[int, str]:
        return i % 4, f"soak {i}\n"

    def do(rt: str, i: int, deadline: float) -> Call:
        return _ctr_timed(cd, rt, i, deadline, "run", "--rm", "--runtime", rt, BUSYBOX_REF, cid(rt, i),
                          "sh", "-c", 'echo "soak $0"; exit $(($0 % 4))', str(i))

    per_runtime, walls, phase_wall = _run_phase(_interleaved(RUNS), RUN_WORKERS, do)
    stats = _report(record_property, f"ctr run --rm x{RUNS}", per_runtime, walls, phase_wall, expected)
    ids = [cid(rt, i) for rt in RUNTIMES for i in range(RUNS)]
    try:
        # runc-v2 is the reference for speed; its exit codes are checked, while its output of such a
        # short process is now and then lost (1 or 2 in 500 here: ctr and runc-v2, no shim of ours,
        # counted as lost_output in the timings); kybernate must lose none.
        bad = (_failures(per_runtime[KYBERNATE_RUNTIME], expected)
               + _failures(per_runtime[RUNC_RUNTIME], expected, output=False))
        assert not bad, f"{len(bad)} of {2 * RUNS} runs went wrong:\n" + "\n".join(bad[:20])
        kyb, runc = stats["kybernate"], stats["runc"]
        # sequentially `ctr run --rm` is ~1.4x runc-v2 (bench/results/shim_bench.md); four at once on two
        # cores the Python shim's CPU shows more (1.7-1.85x measured): this bound catches a regression
        assert kyb["median_s"] <= 2.5 * runc["median_s"], stats
        assert kyb["p99_s"] <= max(3 * runc["p99_s"], 5.0), stats
    finally:
        _assert_nothing_left(cd, ids, shims_before)


def test_soak_execs_with_background_children(soak_cd, record_property):
    """EXECS execs per runtime, EXEC_HOSTS containers each, every exec's shell leaving a child that
    holds its stdout for BACKGROUND_SECONDS: each returns its exit code and output within
    EXEC_RETURN_BOUND seconds (runc-v2 on containerd 1.x: about 2 s); afterwards the containers are
    killed and removed and nothing of them, their execs or the background children is left."""
    cd = soak_cd
    token = secrets.token_hex(2)
    shims_before = set(cd.shim_pids())
    hosts = {rt: [f"soakx-{token}-{short(rt)}-{h}" for h in range(EXEC_HOSTS)] for rt in RUNTIMES}
    ids = [h for rt in RUNTIMES for h in hosts[rt]]
    try:
        for rt in RUNTIMES:
            for host in hosts[rt]:
                cd.ctr("run", "-d", "--runtime", rt, BUSYBOX_REF, host, "sleep", "3600", timeout=CTR_TIMEOUT)

        def expected(i: int) -> tuple[int, str]:
            return 5, f"exec {i}\n"

        def do(rt: str, i: int, deadline: float) -> Call:
            return _ctr_timed(cd, rt, i, deadline, "tasks", "exec", "--exec-id", f"bg{i}",
                              hosts[rt][i % EXEC_HOSTS], "sh", "-c",
                              f'echo "exec $0"; sleep {BACKGROUND_SECONDS} & exit 5', str(i))

        per_runtime, walls, phase_wall = _run_phase(_interleaved(EXECS), EXEC_WORKERS, do)
        stats = _report(record_property, f"exec with a background child x{EXECS}", per_runtime, walls,
                        phase_wall, expected)
        bad = (_failures(per_runtime[KYBERNATE_RUNTIME], expected)
               + _failures(per_runtime[RUNC_RUNTIME], expected, output=False))
        assert not bad, f"{len(bad)} of {2 * EXECS} execs went wrong:\n" + "\n".join(bad[:20])
        slow = [(c.index, round(c.seconds, 1)) for c in per_runtime[KYBERNATE_RUNTIME]
                if c.seconds > EXEC_RETURN_BOUND]
        assert not len(slow), f"{len(slow)} kybernate execs took over {EXEC_RETURN_BOUND}s: {slow[:10]}; {stats}"
        kyb, runc = stats["kybernate"], stats["runc"]
        assert kyb["median_s"] <= max(2 * runc["median_s"], 1.0), stats
        statuses = _task_statuses(cd)
        assert {h: statuses.get(h) for h in ids} == {h: "RUNNING" for h in ids}, "an exec took its container down"
    finally:
        for host in ids:
            cd.ctr("tasks", "kill", "-a", "-s", "SIGKILL", host, check=False, timeout=30)
        for host in ids:
            with contextlib.suppress(Exception):
                _wait_stopped(cd, host)
            cd.ctr("tasks", "delete", "-f", host, check=False, timeout=CTR_TIMEOUT)
            cd.ctr("containers", "delete", host, check=False, timeout=CTR_TIMEOUT)
        _assert_nothing_left(cd, ids, shims_before)


def _task_statuses(cd: Containerd) -> dict[str, str]:
    out = {}
    for line in cd.ctr("tasks", "ls", check=False, timeout=30).stdout.splitlines()[1:]:
        parts = line.split()
        if parts:
            out[parts[0]] = parts[-1]
    return out


def _wait_stopped(cd: Containerd, cid: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while _task_statuses(cd).get(cid, "STOPPED") != "STOPPED" and time.monotonic() < deadline:
        time.sleep(0.2)
