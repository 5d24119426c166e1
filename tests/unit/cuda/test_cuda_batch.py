"""suspend_all / resume_all against the stand-in: parallelism, per-process results, rollback."""
from __future__ import annotations

import time

import pytest

from cuda_bindings import (BatchFailed, CudaError, NotACudaProcess, ProcessState, resume_all,
                           suspend_all)

R, L, C = 0, 1, 2


def _pids(fake, procs, n, state=R):
    pids = [procs.sleeper() for _ in range(n)]
    fake.set_states({p: state for p in pids})
    return pids


def test_suspend_all_runs_in_parallel(fake, procs):
    pids = _pids(fake, procs, 4)
    fake.script("sleep checkpoint * 300")
    drv = fake.driver()
    start = time.monotonic_ns()
    result = suspend_all(drv, pids, 1000)
    assert result.ok and result.rollback == []
    assert all(fake.states()[p] == C for p in pids)
    # Four checkpoints of 300 ms each: one after another would take 1.2 s.
    assert result.seconds < 0.9, result.seconds
    assert result.serial_seconds > 1.2
    spans = [(l.t0_ns, l.t1_ns) for l in fake.log("checkpoint")]
    assert len(spans) == 4 and all(t0 >= start for t0, _ in spans)
    assert max(t0 for t0, _ in spans) < min(t1 for _, t1 in spans), "the calls did not overlap"
    for outcome, pid in zip(result.outcomes, pids):
        assert outcome.pid == pid and outcome.ok
        assert (outcome.before, outcome.after) == (ProcessState.RUNNING, ProcessState.CHECKPOINTED)
        assert outcome.steps == ("lock", "checkpoint") and outcome.seconds >= 0.3


def test_resume_all_runs_in_parallel(fake, procs):
    pids = _pids(fake, procs, 3, C)
    fake.script("sleep restore * 300")
    result = resume_all(fake.driver(), pids)
    assert result.ok and result.seconds < 0.75 and result.serial_seconds > 0.9
    assert all(fake.states()[p] == R for p in pids)
    assert all(o.steps == ("restore", "unlock") for o in result.outcomes)


def test_failure_rolls_back_the_others_and_the_half_done_one(fake, procs):
    a, b, c = _pids(fake, procs, 3)
    fake.script(f"fail checkpoint {b} 999", "sleep checkpoint * 100")
    drv = fake.driver()
    result = suspend_all(drv, [a, b, c], 1000)
    assert not result.ok
    pid, error = result.first_failure
    assert pid == b and isinstance(error, CudaError) and error.name == "CUDA_ERROR_UNKNOWN"
    failed = result.outcomes[1]
    assert failed.steps == ("lock",) and failed.after is None
    # Everything is running again: a and c from checkpointed, b from locked.
    assert fake.states() == {a: R, b: R, c: R}
    rolled = {o.pid: o for o in result.rollback}
    assert set(rolled) == {a, b, c} and result.rollback_ok
    assert rolled[a].steps == ("restore", "unlock") and rolled[b].steps == ("unlock",)
    with pytest.raises(BatchFailed) as info:
        result.raise_for_failure()
    assert f"pid {b}" in str(info.value) and info.value.result is result


def test_rollback_returns_each_to_the_state_it_was_found_in(fake, procs):
    was_running, was_locked, was_checkpointed, failing = _pids(fake, procs, 4)
    fake.set_states({was_locked: L, was_checkpointed: C})
    fake.script(f"fail lock {failing} 909", "sleep checkpoint * 100")
    result = suspend_all(fake.driver(), [was_running, was_locked, was_checkpointed, failing], 50)
    assert result.first_failure[0] == failing
    assert result.first_failure[1].name == "CUDA_ERROR_TIMEOUT"
    assert fake.states() == {was_running: R, was_locked: L, was_checkpointed: C, failing: R}
    # Only processes the batch changed are touched by the rollback.
    assert {o.pid for o in result.rollback} == {was_running, was_locked}
    assert fake.calls(was_checkpointed) == []


def test_no_rollback_when_asked(fake, procs):
    a, b = _pids(fake, procs, 2)
    fake.script(f"fail checkpoint {b} 999", "sleep lock * 50")
    result = suspend_all(fake.driver(), [a, b], rollback=False)
    assert not result.ok and result.rollback == []
    assert fake.states() == {a: C, b: L}


def test_processes_not_started_are_skipped_after_a_failure(fake, procs):
    first, second, third = _pids(fake, procs, 3)
    fake.script(f"fail lock {first} 999")
    result = suspend_all(fake.driver(), [first, second, third], max_workers=1)
    assert [o.skipped for o in result.outcomes] == [False, True, True]
    assert result.rollback == [] and fake.states() == {first: R, second: R, third: R}
    assert fake.calls(second) == [] and fake.calls(third) == []


def test_not_a_cuda_process_in_a_batch(fake, procs, dead_pid):
    (a,) = _pids(fake, procs, 1)
    result = suspend_all(fake.driver(), [a, dead_pid])
    assert result.first_failure[0] == dead_pid
    assert isinstance(result.first_failure[1], NotACudaProcess)
    assert fake.states()[a] == R


def test_resume_all_attempts_every_process_and_reports_each(fake, procs):
    a, b, c = _pids(fake, procs, 3, C)
    fake.set_states({c: L})
    fake.script(f"fail restore {a} 999")
    result = resume_all(fake.driver(), [a, b, c, b])  # duplicates collapse
    assert [o.pid for o in result.outcomes] == [a, b, c]
    assert [o.ok for o in result.outcomes] == [False, True, True]
    assert fake.states() == {a: C, b: R, c: R}
    assert result.outcomes[2].steps == ("unlock",) and result.rollback == []


def test_resume_all_passes_the_gpu_map(fake, procs):
    a, b = _pids(fake, procs, 2, C)
    drv = fake.driver()
    old, new = drv.device_uuids()
    assert resume_all(drv, [a, b], {old: new}).ok
    assert sorted(l.pid for l in fake.log("restore") if l.detail.startswith("pairs=1 ")) == sorted([a, b])


def test_empty_batch():
    from cuda_bindings.batch import BatchResult
    result = suspend_all(None, [])
    assert isinstance(result, BatchResult) and result.ok and result.outcomes == []


def test_result_to_dict_is_json_ready(fake, procs):
    import json
    a, b = _pids(fake, procs, 2)
    fake.script(f"fail checkpoint {b} 999")
    doc = json.loads(json.dumps(suspend_all(fake.driver(), [a, b]).to_dict()))
    assert doc["ok"] is False and doc["failed_pid"] == b
    assert doc["error"]["name"] == "CUDA_ERROR_UNKNOWN" and doc["rollback_ok"] is True
    assert doc["outcomes"][0]["steps"] == ["lock", "checkpoint"]
