"""CudaDriver against the stand-in libcuda: calls, arguments, errors, retry from any state."""
from __future__ import annotations

import pytest

from cuda_bindings import (CudaDriver, CudaError, DriverMissing, DriverTooOld, NotACudaProcess,
                           ProcessFailed, ProcessState, format_uuid, parse_uuid)

R, L, C, F = 0, 1, 2, 3  # the stand-in's state numbers, as cuda.h's CUprocessState


def test_state_and_full_cycle_by_primitives(fake, procs):
    pid = procs.sleeper()
    fake.set_states({pid: R})
    drv = fake.driver()
    assert drv.state(pid) is ProcessState.RUNNING
    drv.lock(pid, 1234)
    assert drv.state(pid) is ProcessState.LOCKED
    drv.checkpoint(pid)
    assert drv.state(pid) is ProcessState.CHECKPOINTED
    drv.restore(pid)
    assert drv.state(pid) is ProcessState.LOCKED
    drv.unlock(pid)
    assert drv.state(pid) is ProcessState.RUNNING
    # The lock's timeout reached the driver in CUcheckpointLockArgs.timeoutMs, reserved fields zero
    # (the stand-in answers INVALID_VALUE otherwise); the other calls pass NULL, as the H100 probe did.
    assert [l.detail for l in fake.log("lock")] == ["timeout=1234"]
    assert [l.detail for l in fake.log("restore")] == ["args=null"]
    assert fake.calls(pid) == ["lock", "checkpoint", "restore", "unlock"]


def test_driver_version_and_devices(fake, monkeypatch):
    monkeypatch.setenv("FAKECUDA_VERSION", "12090")
    monkeypatch.setenv("FAKECUDA_DEVICES", "3")
    drv = fake.driver()
    assert drv.driver_version() == 12090
    uuids = drv.device_uuids()
    assert len(uuids) == 3 and len(set(uuids)) == 3
    assert uuids[1] == format_uuid(b"fakegpu-uuid-001")
    assert uuids[1].startswith("GPU-") and parse_uuid(uuids[1]) == b"fakegpu-uuid-001"


def test_parse_uuid_forms():
    raw = bytes(range(16))
    text = format_uuid(raw)
    assert text == "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert parse_uuid(text) == parse_uuid(text[4:]) == parse_uuid(raw) == raw
    with pytest.raises(ValueError):
        parse_uuid("GPU-nothex")
    with pytest.raises(ValueError):
        parse_uuid(b"short")


@pytest.mark.parametrize("call", ["checkpoint", "restore", "unlock"])
def test_illegal_transition_is_a_cuda_error_with_driver_words(fake, procs, call):
    pid = procs.sleeper()
    fake.set_states({pid: R})
    drv = fake.driver()
    with pytest.raises(CudaError) as info:
        getattr(drv, call)(pid)
    err = info.value
    assert (err.result, err.name) == (401, "CUDA_ERROR_ILLEGAL_STATE")
    assert err.text == "the operation cannot be performed in the present state"
    assert err.pid == pid and err.call.startswith("cuCheckpointProcess")
    assert f"pid {pid}" in str(err) and "CUDA_ERROR_ILLEGAL_STATE (401)" in str(err)
    assert drv.state(pid) is ProcessState.RUNNING


def test_unrecognised_result_still_reported(fake, procs):
    pid = procs.sleeper()
    fake.set_states({pid: R})
    fake.script(f"fail lock {pid} 12345")
    with pytest.raises(CudaError) as info:
        fake.driver().lock(pid, 10)
    assert info.value.result == 12345 and info.value.name == "CUresult 12345"


def test_lock_timeout_leaves_process_running(fake, procs):
    pid = procs.sleeper()
    fake.set_states({pid: R})
    fake.script(f"fail lock {pid} 909")
    drv = fake.driver()
    with pytest.raises(CudaError) as info:
        drv.lock(pid, 50)
    assert info.value.name == "CUDA_ERROR_TIMEOUT"
    assert drv.state(pid) is ProcessState.RUNNING


def test_lock_timeout_range_checked(fake, procs):
    drv = fake.driver()
    with pytest.raises(ValueError):
        drv.lock(procs.sleeper(), -1)
    with pytest.raises(ValueError):
        drv.lock(procs.sleeper(), 1 << 32)


# ---- not a CUDA process -------------------------------------------------------------------------
@pytest.mark.parametrize("answer,name", [(500, "CUDA_ERROR_NOT_FOUND"),
                                         (3, "CUDA_ERROR_NOT_INITIALIZED")])
def test_live_process_without_cuda(fake, procs, answer, name):
    pid = procs.sleeper()  # not in the stand-in's state: the driver does not know it
    fake.script(f"noproc {answer}")
    drv = fake.driver()
    for call in (drv.state, drv.checkpoint, drv.unlock, drv.restore_thread_id,
                 lambda p: drv.lock(p, 10), drv.suspend, drv.resume):
        with pytest.raises(NotACudaProcess) as info:
            call(pid)
        assert info.value.pid == pid and info.value.cuda_error.name == name
        assert name in str(info.value)


def test_no_such_pid_whatever_the_driver_says(fake, dead_pid):
    fake.script("noproc 401")  # even an answer that would otherwise be a CudaError
    with pytest.raises(NotACudaProcess) as info:
        fake.driver().state(dead_pid)
    assert info.value.reason == "no such process"
    assert info.value.cuda_error.result == 401


@pytest.mark.parametrize("pid", [0, -5])
def test_invalid_pid_never_reaches_driver(fake, pid):
    with pytest.raises(NotACudaProcess):
        fake.driver().state(pid)
    assert fake.log("state") == []


def test_invalid_value_splits_on_libcuda_mapping(fake, procs, tmp_path):
    """INVALID_VALUE is ambiguous: for a process without libcuda it means 'not CUDA'; for one that
    maps libcuda it is a real error to report."""
    fake.script("noproc 1")
    plain = procs.sleeper()
    cuda_like = procs.cuda_like(fake.path, None)
    drv = fake.driver()
    with pytest.raises(NotACudaProcess):
        drv.state(plain)
    with pytest.raises(CudaError) as info:
        drv.state(cuda_like)
    assert not isinstance(info.value, NotACudaProcess)
    assert info.value.name == "CUDA_ERROR_INVALID_VALUE"


# ---- driver missing / too old / unusable -------------------------------------------------------
def test_driver_missing_by_argument(tmp_path):
    path = str(tmp_path / "nothere" / "libcuda.so.1")
    with pytest.raises(DriverMissing) as info:
        CudaDriver(path)
    assert info.value.path == path and "KYBERNATE_LIBCUDA" in str(info.value)


def test_library_from_environment(fake, monkeypatch, tmp_path):
    monkeypatch.setenv("KYBERNATE_LIBCUDA", fake.path)
    assert CudaDriver().path == fake.path
    monkeypatch.setenv("KYBERNATE_LIBCUDA", str(tmp_path / "missing.so"))
    with pytest.raises(DriverMissing) as info:
        CudaDriver()
    assert info.value.path == str(tmp_path / "missing.so")


def test_driver_without_checkpoint_symbols(fake, procs, monkeypatch):
    monkeypatch.setenv("FAKECUDA_VERSION", "12040")
    drv = fake.driver(str(fake.libs.old))
    assert drv.driver_version() == 12040 and not drv.checkpoint_supported
    assert len(drv.device_uuids()) == 2  # the rest of the driver still works
    pid = procs.sleeper()
    for call in (drv.require_checkpoint_api, lambda: drv.state(pid), lambda: drv.lock(pid, 1),
                 lambda: drv.suspend(pid)):
        with pytest.raises(DriverTooOld) as info:
            call()
        assert info.value.needed == 12080 and info.value.found == 12040
        assert "cuCheckpointProcessLock" in info.value.missing
        assert "12.8" in str(info.value) and "12.4" in str(info.value)


def test_driver_reporting_too_old_version(fake, procs, monkeypatch):
    monkeypatch.setenv("FAKECUDA_VERSION", "12060")
    drv = fake.driver()
    with pytest.raises(DriverTooOld) as info:
        drv.state(procs.sleeper())
    assert info.value.missing == () and "needs CUDA driver API 12.8" in str(info.value)


def test_cuinit_failure_is_reported_at_load(fake, monkeypatch):
    monkeypatch.setenv("FAKECUDA_INIT", "100")
    with pytest.raises(CudaError) as info:
        fake.driver()
    assert info.value.call == "cuInit" and info.value.name == "CUDA_ERROR_NO_DEVICE"


# ---- GPU remapping ------------------------------------------------------------------------------
def test_restore_passes_gpu_pairs(fake, procs):
    pid = procs.sleeper()
    fake.set_states({pid: C})
    drv = fake.driver()
    old, new = drv.device_uuids()
    drv.restore(pid, {old: new, new: parse_uuid(old)})
    assert drv.state(pid) is ProcessState.LOCKED
    hex_ = lambda u: parse_uuid(u).hex()
    assert fake.log("restore")[-1].detail == (f"pairs=2 {hex_(old)}>{hex_(new)},"
                                              f"{hex_(new)}>{hex_(old)}")


def test_restore_remap_refused_before_cuda_13(fake, procs, monkeypatch):
    monkeypatch.setenv("FAKECUDA_VERSION", "12080")
    pid = procs.sleeper()
    fake.set_states({pid: C})
    drv = fake.driver()
    old, new = drv.device_uuids()
    with pytest.raises(DriverTooOld) as info:
        drv.restore(pid, {old: new})
    assert info.value.needed == 13000 and "GPU remapping" in str(info.value)
    assert fake.log("restore") == [] and drv.state(pid) is ProcessState.CHECKPOINTED
    drv.restore(pid)  # without a map, 12.8 restores
    assert drv.state(pid) is ProcessState.LOCKED


def test_restore_with_unknown_gpu_is_the_drivers_error(fake, procs):
    pid = procs.cuda_like(fake.path, None)
    fake.set_states({pid: C})
    drv = fake.driver()
    with pytest.raises(CudaError) as info:
        drv.restore(pid, {"GPU-00000000-0000-0000-0000-000000000000": drv.device_uuid(0)})
    assert info.value.name == "CUDA_ERROR_INVALID_VALUE"
    assert drv.state(pid) is ProcessState.CHECKPOINTED


def test_restore_thread_id(fake, procs):
    pid = procs.sleeper()
    fake.set_states({pid: R})
    assert fake.driver().restore_thread_id(pid) == pid + 1


# ---- suspend / resume from any state ------------------------------------------------------------
@pytest.mark.parametrize("start,expected_steps", [
    (R, ("lock", "checkpoint")), (L, ("checkpoint",)), (C, ())])
def test_suspend_does_only_missing_steps(fake, procs, start, expected_steps):
    pid = procs.sleeper()
    fake.set_states({pid: start})
    t = fake.driver().suspend(pid, 500)
    assert t.before == ProcessState(start) and t.after is ProcessState.CHECKPOINTED
    assert t.steps == expected_steps and fake.calls(pid) == list(expected_steps)
    assert fake.states()[pid] == C


@pytest.mark.parametrize("start,expected_steps", [
    (C, ("restore", "unlock")), (L, ("unlock",)), (R, ())])
def test_resume_does_only_missing_steps(fake, procs, start, expected_steps):
    pid = procs.sleeper()
    fake.set_states({pid: start})
    t = fake.driver().resume(pid)
    assert t.before == ProcessState(start) and t.after is ProcessState.RUNNING
    assert t.steps == expected_steps and fake.calls(pid) == list(expected_steps)
    assert fake.states()[pid] == R


def test_suspend_retry_after_failed_checkpoint(fake, procs):
    pid = procs.sleeper()
    fake.set_states({pid: R})
    fake.script(f"fail checkpoint {pid} 999 1")  # the first checkpoint fails, later ones work
    drv = fake.driver()
    progress: list[str] = []
    with pytest.raises(CudaError):
        drv.settle(pid, ProcessState.CHECKPOINTED, progress=progress)
    assert progress == ["lock"] and drv.state(pid) is ProcessState.LOCKED
    assert drv.suspend(pid).steps == ("checkpoint",)
    assert drv.state(pid) is ProcessState.CHECKPOINTED


def test_resume_retry_after_failed_unlock(fake, procs):
    pid = procs.sleeper()
    fake.set_states({pid: C})
    fake.script(f"fail unlock {pid} 999 1")
    drv = fake.driver()
    with pytest.raises(CudaError):
        drv.resume(pid)
    assert drv.state(pid) is ProcessState.LOCKED
    assert drv.resume(pid).steps == ("unlock",)


def test_failed_process_is_its_own_condition(fake, procs):
    pid = procs.sleeper()
    fake.set_states({pid: F})
    drv = fake.driver()
    assert drv.state(pid) is ProcessState.FAILED
    for call in (drv.suspend, drv.resume):
        with pytest.raises(ProcessFailed):
            call(pid)
    assert fake.calls(pid) == []


def test_unknown_state_number_is_an_error_not_a_crash(fake, procs):
    from cuda_bindings import CudaBindingsError
    pid = procs.sleeper()
    fake.set_states({pid: 7})
    with pytest.raises(CudaBindingsError, match="unknown state 7"):
        fake.driver().state(pid)
