"""cuda_bindings on a real GPU: the workload's VRAM leaves and comes back intact, the count goes on.

Every byte of the workload's buffer is incremented and checked each tick, so bad=0 after a resume
means all VRAM came back, and ticks numbered one after another mean the process was suspended, not
restarted.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cuda_bindings import (CudaError, NotACudaProcess, ProcessState, cgroup_dir_of, cgroup_pids,
                           discover, procfs, resume_all, suspend_all)
from gpu_workload import GIB, MIB, wait_vram

pytestmark = pytest.mark.gpu
TIMEOUT_MS = 10000
REPO = Path(__file__).resolve().parents[2]


def _wait_evidence(pid: int, predicate, timeout: float = 5.0) -> procfs.ProcEvidence:
    deadline = time.monotonic() + timeout
    while True:
        ev = procfs.evidence(pid)
        if predicate(ev) or time.monotonic() > deadline:
            return ev
        time.sleep(0.1)


def _assert_frozen(w, seconds: float = 1.0) -> None:
    """No tick while suspended: the process is blocked in its CUDA call, not running on."""
    before = w.last
    time.sleep(seconds)
    assert w.last == before, f"workload {w.pid} ticked while suspended"


def test_suspend_resume_2gib(driver, spawn, report):
    w = spawn(2 * GIB)
    w.wait_ready(3)
    (proc,) = discover([w.pid], driver)
    assert proc.state is ProcessState.RUNNING and proc.evidence_agrees, proc
    held = wait_vram(w.pid, lambda mib: mib >= 2048)
    assert held >= 2048, f"nvidia-smi shows {held} MiB for the workload"

    t_suspend = driver.suspend(w.pid, TIMEOUT_MS)
    assert t_suspend.steps == ("lock", "checkpoint")
    assert driver.state(w.pid) is ProcessState.CHECKPOINTED
    freed = wait_vram(w.pid, lambda mib: mib == 0)
    assert freed == 0, f"{freed} MiB still held after checkpoint"
    ev = _wait_evidence(w.pid, lambda e: e.nvidia_fds == 0)
    assert ev.maps_libcuda and ev.nvidia_fds == 0, ev
    assert discover([w.pid], driver)[0].evidence_agrees
    _assert_frozen(w)
    stopped_at = w.last

    t_resume = driver.resume(w.pid)
    assert t_resume.steps == ("restore", "unlock")
    assert driver.state(w.pid) is ProcessState.RUNNING
    w.wait_tick(stopped_at + 3)
    w.verify()
    back = wait_vram(w.pid, lambda mib: mib >= 2048)
    assert back >= 2048
    report(bytes=w.nbytes, suspend_s=t_suspend.seconds, resume_s=t_resume.seconds,
           vram_mib_before=held, vram_mib_suspended=freed, vram_mib_after=back,
           nvidia_fds_suspended=ev.nvidia_fds, ticks=w.last)


def test_retry_from_any_state(driver, spawn, report):
    w = spawn(256 * MIB)
    w.wait_ready(2)
    driver.lock(w.pid, TIMEOUT_MS)
    assert driver.suspend(w.pid, TIMEOUT_MS).steps == ("checkpoint",)
    assert driver.suspend(w.pid, TIMEOUT_MS).steps == ()
    driver.restore(w.pid)
    assert driver.state(w.pid) is ProcessState.LOCKED
    assert driver.resume(w.pid).steps == ("unlock",)
    assert driver.resume(w.pid).steps == ()
    w.wait_tick(w.last + 2)
    w.verify()
    report(ok=True)


def test_restore_with_identity_gpu_map(driver, spawn, report):
    """Passes CUcheckpointRestoreArgs with gpuPairs to the real driver: our struct layout is taken."""
    uuid = driver.device_uuid(0)
    w = spawn(256 * MIB)
    w.wait_ready(2)
    driver.suspend(w.pid, TIMEOUT_MS)
    try:
        t = driver.resume(w.pid, gpu_map={uuid: uuid})
    except CudaError as exc:
        report(error=exc.to_dict())
        driver.resume(w.pid)  # leave it running for the teardown
        raise
    assert t.steps == ("restore", "unlock")
    w.wait_tick(w.last + 2)
    w.verify()
    report(uuid=uuid, resume_s=t.seconds)


def test_device_uuids_match_nvidia_smi(driver, report):
    smi = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True).stdout.split()
    ours = driver.device_uuids()
    report(ours=ours, smi=smi, driver_version=driver.driver_version())
    assert sorted(ours) == sorted(smi)


def test_restore_thread_id_is_a_thread_of_the_process(driver, spawn, report):
    w = spawn(64 * MIB)
    w.wait_ready(1)
    tid = driver.restore_thread_id(w.pid)
    report(pid=w.pid, restore_tid=tid)
    assert tid > 0 and Path(f"/proc/{w.pid}/task/{tid}").exists()


@pytest.mark.parametrize("count", [2, 4])
def test_parallel_suspend_resume(driver, spawn, report, count):
    ws = [spawn(2 * GIB) for _ in range(count)]
    for w in ws:
        w.wait_ready(2)
    pids = [w.pid for w in ws]
    suspended = suspend_all(driver, pids, TIMEOUT_MS)
    assert suspended.ok, suspended.to_dict()
    assert all(driver.state(p) is ProcessState.CHECKPOINTED for p in pids)
    freed = {p: wait_vram(p, lambda mib: mib == 0) for p in pids}
    assert all(m == 0 for m in freed.values()), freed
    stopped = {w.pid: w.last for w in ws}
    resumed = resume_all(driver, pids)
    assert resumed.ok, resumed.to_dict()
    for w in ws:
        w.wait_tick(stopped[w.pid] + 2)
        w.verify()
    # The calls ran at the same time: the last to start began before the first to end finished.
    for result in (suspended, resumed):
        starts = [o.started for o in result.outcomes]
        ends = [o.started + o.seconds for o in result.outcomes]
        assert max(starts) < min(ends), result.to_dict()
    report(count=count, bytes_each=2 * GIB,
           suspend_wall_s=suspended.seconds, suspend_serial_s=suspended.serial_seconds,
           resume_wall_s=resumed.seconds, resume_serial_s=resumed.serial_seconds,
           suspend_GBps=count * 2 * GIB / suspended.seconds / 1e9,
           resume_GBps=count * 2 * GIB / resumed.seconds / 1e9)


def test_discovery_through_the_cgroup(driver, spawn, report):
    w = spawn(64 * MIB)
    w.wait_ready(1)
    try:
        directory = cgroup_dir_of(w.pid)
        pids = cgroup_pids(directory, recursive=False)
    except OSError as exc:
        pytest.skip(f"no readable cgroup for the workload on this machine: {exc}")
    assert w.pid in pids
    found = {p.pid: p for p in discover(pids, driver)}
    report(cgroup=str(directory), pids=len(pids),
           found={p: f.to_dict() for p, f in found.items()})
    assert found[w.pid].state is ProcessState.RUNNING and found[w.pid].evidence_agrees
    assert os.getpid() in found  # this test process has CUDA too (the driver binding ran cuInit)


# ---- error cases ----------------------------------------------------------------------------------
def test_dead_pid(driver, report):
    child = subprocess.Popen(["true"])
    child.wait()
    with pytest.raises(NotACudaProcess) as info:
        driver.state(child.pid)
    report(error=info.value.to_dict())
    with pytest.raises(NotACudaProcess):
        driver.suspend(child.pid, TIMEOUT_MS)


def test_process_without_cuda(driver, report):
    child = subprocess.Popen(["sleep", "60"])
    try:
        for call in (driver.state, lambda p: driver.lock(p, 100), driver.resume):
            with pytest.raises(NotACudaProcess) as info:
                call(child.pid)
            report(call=getattr(call, "__name__", "?"), error=info.value.to_dict())
    finally:
        child.kill()
        child.wait()


def test_illegal_transitions_are_cuda_errors(driver, spawn, report):
    w = spawn(64 * MIB)
    w.wait_ready(1)
    answers = {}
    for name, call in (("unlock", driver.unlock), ("checkpoint", driver.checkpoint),
                       ("restore", driver.restore)):
        with pytest.raises(CudaError) as info:
            call(w.pid)
        assert not isinstance(info.value, NotACudaProcess)
        answers[name] = info.value.to_dict()
    report(answers=answers)
    assert driver.state(w.pid) is ProcessState.RUNNING
    w.wait_tick(w.last + 2)
    w.verify()


def test_lock_timeout(driver, spawn, report):
    """A process inside a 3 s kernel cannot be locked within 100 ms (if the driver waits for it)."""
    w = spawn(64 * MIB, WORKLOAD_SPIN_MS="3000", WORKLOAD_TICK_MS="0")
    w.wait_ready(1, timeout=30)
    time.sleep(0.5)  # well inside the next tick's spin
    start = time.perf_counter()
    try:
        driver.lock(w.pid, 100)
    except CudaError as exc:
        elapsed = time.perf_counter() - start
        report(error=exc.to_dict(), elapsed_s=elapsed, state_after=driver.state(w.pid).label)
        assert driver.state(w.pid) is ProcessState.RUNNING
        w.wait_tick(w.last + 1, timeout=30)
        w.verify()
        return
    elapsed = time.perf_counter() - start
    driver.unlock(w.pid)
    report(locked_anyway=True, elapsed_s=elapsed)
    pytest.skip(f"could not provoke a lock timeout: lock succeeded in {elapsed:.3f}s")


def test_cli_on_a_real_process(driver, spawn, report):
    w = spawn(256 * MIB)
    w.wait_ready(1)
    run = lambda *a: subprocess.run([sys.executable, "-m", "cuda_bindings", *a, "--json"],
                                    cwd=REPO, capture_output=True, text=True, timeout=120)
    out = run("suspend", str(w.pid))
    assert out.returncode == 0, out.stdout + out.stderr
    state = json.loads(run("state", str(w.pid)).stdout)["processes"][0]
    assert state["state"] == "checkpointed" and state["evidence_agrees"], state
    out = run("resume", str(w.pid))
    assert out.returncode == 0, out.stdout + out.stderr
    w.wait_tick(w.last + 2)
    w.verify()
    report(state_while_suspended=state)
