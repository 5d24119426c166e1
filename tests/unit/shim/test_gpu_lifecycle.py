"""shim.gpu.lifecycle around checkpoint, restore, pause and resume, with the stand-in libcuda (fakecuda.c).

The stand-in keeps per-pid checkpoint state in files and logs every call with CLOCK_MONOTONIC
timestamps, so these tests see which process got which driver call, and in which order relative to
the (fake) OCI runtime's pause/resume/checkpoint. Live child processes stand for the container's
processes: "CUDA" ones map a file named libcuda.so.1 (the stand-in itself), CPU ones do not.
This proves the shim's orchestration only; tests/gpu proves it against the real driver.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ttrpc.codes import Code
from ttrpc.errors import TTRPCError

from shim.checkpoint.layer import PlainLayer
from shim.gpu import lifecycle as gpu
from shim.gpu import procfs as gpu_procfs
from shim.gpu import records as gpu_records
from shim.gpu import settings as gpu_settings
from shim.task.container import Container
from shim.task.io import StdioPaths
from shim.task.process import Created, CreatedFromCheckpoint, InitProcess, Paused, Running, State
from shim.runtime.runc import RuntimeCommandError

REPO = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("_fakecuda_support", REPO / "tests/unit/cuda/conftest.py")
support = sys.modules.setdefault("_fakecuda_support", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(support)

RUNNING, LOCKED, CHECKPOINTED, FAILED = 0, 1, 2, 3
CUDA_ERROR_UNKNOWN, CUDA_ERROR_TIMEOUT = 999, 909


# ---- fixtures: the stand-in driver and processes (the approach of tests/unit/cuda/conftest.py) ----
@pytest.fixture(scope="session")
def fake_libs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fakecuda")
    return support.FakeLibs(full=support._compile(root / "full" / "libcuda.so.1"),
                            old=support._compile(root / "old" / "libcuda.so.1", "-DFAKECUDA_NO_CHECKPOINT"))


@pytest.fixture
def fake(fake_libs, tmp_path, monkeypatch):
    directory = tmp_path / "fakecuda"
    directory.mkdir()
    monkeypatch.setenv("FAKECUDA_DIR", str(directory))
    for name in ("FAKECUDA_VERSION", "FAKECUDA_DEVICES", "FAKECUDA_INIT", "KYBERNATE_LIBCUDA"):
        monkeypatch.delenv(name, raising=False)
    return support.FakeCuda(directory, fake_libs)


@pytest.fixture
def procs(tmp_path):
    processes = support.Processes(tmp_path)
    yield processes
    processes.close()


class Clock:
    """Events of the fake runtime on the same clock as the stand-in driver's log."""

    def __init__(self):
        self.events: list[tuple[int, str]] = []

    def mark(self, what: str) -> None:
        self.events.append((time.monotonic_ns(), what))


class FakeRuntime:
    """The OCI runtime's CLI as shim.task.container uses it; records calls, fails on demand."""

    def __init__(self, clock: Clock):
        self.root = "/nonexistent/kybernate-test-runc-root"  # runc's state root (nothing there)
        self.clock = clock
        self.calls: list[str] = []
        self.fail: dict[str, str] = {}  # op -> runtime error message
        self.on_checkpoint = None  # callable run inside `checkpoint` (to look at states mid-way)

    async def _op(self, op: str) -> None:
        self.calls.append(op)
        self.clock.mark(op)
        if op in self.fail:
            raise RuntimeCommandError(f"runc {op}", 1, self.fail[op])

    async def pause(self, cid):
        await self._op("pause")

    async def resume(self, cid):
        await self._op("resume")

    async def kill(self, cid, sig, all=False):
        await self._op(f"kill {sig}{' all' if all else ''}")

    async def run_args(self, op, args, stdio=None, capture=True):
        if self.on_checkpoint is not None and op == "checkpoint":
            self.on_checkpoint(list(args))
        await self._op(op)


def in_state(init: InitProcess, state: State, image_dir: str = ""):
    """The state object a test starts `init` in (production reaches it through the operations)."""
    if state is State.CREATED_CHECKPOINT:
        return CreatedFromCheckpoint(init, image_dir)
    return {State.CREATED: Created, State.RUNNING: Running, State.PAUSED: Paused}[state](init)


def make_container(tmp_path: Path, runtime: FakeRuntime, pids, driver_loader, annotations=None,
                   state: State = State.RUNNING, cid: str = "gpu1", image: str = "") -> Container:
    """A real shim.task.container.Container with a fake runtime; its GPU view lists `pids`."""
    from proto.containerd.runc.v1 import options_pb2

    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    spec = {"ociVersion": "1.0.2", "annotations": dict(annotations or {})}
    c = Container(cid, str(bundle), "default", runtime, None, spec, "", options_pb2.Options(), None)
    init = InitProcess(cid, cid, StdioPaths())
    init.current = in_state(init, state, image)
    init.pid = os.getpid()
    c.init = init
    c.layer = gpu.GpuLayer(PlainLayer(), c.id, c.spec, gpu=gpu.ContainerGpu(cid, spec, lambda: list(pids), driver_loader=driver_loader))
    return c


def loader(fake):
    calls = []

    def load(hint_pids=()):
        calls.append(list(hint_pids))
        return fake.driver()

    load.calls = calls
    return load


def refusing_loader(hint_pids=()):
    raise AssertionError("the CUDA driver must not be loaded for this container")


def checkpoint_request(image_dir: Path, exit: bool = False):
    from proto.anyutil import pack
    from proto.containerd.runc.v1 import options_pb2
    from proto.containerd.task.v2 import shim_pb2

    opts = options_pb2.CheckpointOptions(exit=exit, image_path=str(image_dir))
    return shim_pb2.CheckpointTaskRequest(id="gpu1", path=str(image_dir), options=pack(opts))


def run(coro_fn, *args):
    """asyncio.run a coroutine function (Process objects need a running loop to be made)."""
    return asyncio.run(coro_fn(*args))


def first_call_ns(fake, call: str, pid: int | None = None) -> int:
    return min(l.t0_ns for l in fake.log(call) if pid is None or l.pid == pid)


def last_call_ns(fake, call: str) -> int:
    return max(l.t1_ns for l in fake.log(call))


# ---- checkpoint ------------------------------------------------------------------------------------
def test_checkpoint_leave_running_suspends_all_then_resumes_all(fake, procs, tmp_path):
    pids = [procs.cuda_like(fake.path, None) for _ in range(3)]
    cpu = procs.sleeper()
    fake.set_states({p: RUNNING for p in pids})
    fake.script(*(f"sleep checkpoint {p} 200" for p in pids))
    clock = Clock()
    runtime = FakeRuntime(clock)
    seen_during = {}
    runtime.on_checkpoint = lambda args: seen_during.update(fake.states())
    image = tmp_path / "image"

    async def go():
        c = make_container(tmp_path, runtime, pids + [cpu], loader(fake),
                           {gpu_settings.LOCK_TIMEOUT_ANNOTATION: "2500"})
        await c.checkpoint(checkpoint_request(image))

    run(go)
    # during runc checkpoint every CUDA process was checkpointed; afterwards all run again
    assert {p: seen_during[p] for p in pids} == {p: CHECKPOINTED for p in pids}
    assert fake.states() == {p: RUNNING for p in pids}
    for p in pids:
        assert fake.calls(p) == ["lock", "checkpoint", "restore", "unlock"]
    assert fake.calls(cpu) == []  # the CPU process was never even asked about
    # the lock timeout came from the annotation; the three checkpoints overlapped (parallel threads)
    assert {l.detail for l in fake.log("lock")} == {"timeout=2500"}
    ckpts = fake.log("checkpoint")
    assert max(l.t0_ns for l in ckpts) < min(l.t1_ns for l in ckpts), "checkpoints did not overlap"
    # order: every checkpoint done before runc checkpoint, every restore after it
    ckpt_ns = next(t for t, what in clock.events if what == "checkpoint")
    assert last_call_ns(fake, "checkpoint") <= ckpt_ns <= first_call_ns(fake, "restore")
    record = json.loads((image / gpu_records.RECORD_NAME).read_text())
    assert sorted(p["pid"] for p in record["processes"]) == sorted(pids)
    uuids = fake.driver().device_uuids()
    assert record["visible_gpus"] == uuids and record["gpus"] == sorted(uuids)
    assert {p["gpus_source"] for p in record["processes"]} == {"all-visible"}
    assert record["keeps_running"] is True and record["lock_timeout_ms"] == 2500


def test_checkpoint_with_exit_leaves_processes_checkpointed(fake, procs, tmp_path):
    pids = [procs.cuda_like(fake.path, None) for _ in range(2)]
    fake.set_states({p: RUNNING for p in pids})
    runtime = FakeRuntime(Clock())

    async def go():
        c = make_container(tmp_path, runtime, pids, loader(fake))
        await c.checkpoint(checkpoint_request(tmp_path / "image", exit=True))
        return c

    c = run(go)
    # with exit the dump ends the task: nothing is resumed (runc kills the processes)
    assert fake.states() == {p: CHECKPOINTED for p in pids}
    for p in pids:
        assert fake.calls(p) == ["lock", "checkpoint"]
    assert runtime.calls == ["checkpoint"]
    assert c.layer.gpu.paused is None
    assert json.loads((tmp_path / "image" / gpu_records.RECORD_NAME).read_text())["keeps_running"] is False


def test_checkpoint_rolls_back_when_one_process_fails_to_checkpoint(fake, procs, tmp_path):
    pids = [procs.cuda_like(fake.path, None) for _ in range(3)]
    bad = pids[1]
    fake.set_states({p: RUNNING for p in pids})
    fake.script(f"fail checkpoint {bad} {CUDA_ERROR_UNKNOWN}")
    runtime = FakeRuntime(Clock())

    async def go():
        c = make_container(tmp_path, runtime, pids, loader(fake))
        await c.checkpoint(checkpoint_request(tmp_path / "image"))

    with pytest.raises(TTRPCError) as info:
        run(go)
    err = info.value
    assert err.code is Code.FAILED_PRECONDITION
    assert "container gpu1" in err.message and f"pid {bad}" in err.message
    assert "CUDA_ERROR_UNKNOWN" in err.message and "cuCheckpointProcessCheckpoint" in err.message
    assert runtime.calls == []  # runc checkpoint never ran
    assert fake.states() == {p: RUNNING for p in pids}  # nothing left locked or checkpointed
    for p in pids:
        calls = fake.calls(p)
        if calls and p != bad:
            assert calls in (["lock", "checkpoint", "restore", "unlock"], ["lock", "unlock"]), calls
    assert fake.calls(bad)[-1] == "unlock"
    assert not (tmp_path / "image" / gpu_records.RECORD_NAME).exists()


def test_checkpoint_lock_timeout_is_reported_and_nothing_stays_locked(fake, procs, tmp_path):
    pids = [procs.cuda_like(fake.path, None) for _ in range(2)]
    fake.set_states({p: RUNNING for p in pids})
    fake.script(f"fail lock {pids[0]} {CUDA_ERROR_TIMEOUT}")
    runtime = FakeRuntime(Clock())

    async def go():
        c = make_container(tmp_path, runtime, pids, loader(fake), {gpu_settings.LOCK_TIMEOUT_ANNOTATION: "50"})
        await c.checkpoint(checkpoint_request(tmp_path / "image"))

    with pytest.raises(TTRPCError) as info:
        run(go)
    assert "CUDA_ERROR_TIMEOUT" in info.value.message and "lock timeout 50 ms" in info.value.message
    assert fake.states() == {p: RUNNING for p in pids}


def test_runc_checkpoint_failure_thaws_then_resumes_everything(fake, procs, tmp_path, monkeypatch):
    pids = [procs.cuda_like(fake.path, None) for _ in range(2)]
    fake.set_states({p: RUNNING for p in pids})
    clock = Clock()
    runtime = FakeRuntime(clock)
    runtime.fail["checkpoint"] = "criu failed: type NOTIFY errno 0"
    monkeypatch.setattr(gpu, "frozen", lambda task: True)  # CRIU left the cgroup frozen

    async def go():
        c = make_container(tmp_path, runtime, pids, loader(fake))
        await c.checkpoint(checkpoint_request(tmp_path / "image"))

    with pytest.raises(TTRPCError) as info:
        run(go)
    assert info.value.code is Code.UNKNOWN and "criu failed" in info.value.message  # runc's error, unchanged
    assert runtime.calls == ["checkpoint", "resume"]
    assert fake.states() == {p: RUNNING for p in pids}
    for p in pids:
        assert fake.calls(p) == ["lock", "checkpoint", "restore", "unlock"]
    thaw_ns = next(t for t, what in clock.events if what == "resume")
    assert thaw_ns <= first_call_ns(fake, "restore")  # thawed before the driver's restore
    assert not (tmp_path / "image" / gpu_records.RECORD_NAME).exists()


def test_runc_checkpoint_failure_with_failing_rollback_says_both(fake, procs, tmp_path):
    pids = [procs.cuda_like(fake.path, None) for _ in range(2)]
    fake.set_states({p: RUNNING for p in pids})
    fake.script(f"fail restore {pids[0]} {CUDA_ERROR_UNKNOWN}")
    runtime = FakeRuntime(Clock())
    runtime.fail["checkpoint"] = "criu failed"

    async def go():
        c = make_container(tmp_path, runtime, pids, loader(fake))
        await c.checkpoint(checkpoint_request(tmp_path / "image"))

    with pytest.raises(TTRPCError) as info:
        run(go)
    msg = info.value.message
    assert info.value.code is Code.INTERNAL
    assert "criu failed" in msg and f"pid {pids[0]}" in msg and "CUDA_ERROR_UNKNOWN" in msg
    assert fake.states()[pids[1]] == RUNNING  # the other one was still resumed


def test_checkpoint_of_a_task_paused_by_us_does_no_cuda_work(fake, procs, tmp_path):
    """containerd's client pauses around Checkpoint: Pause released the VRAM, Checkpoint dumps,
    Resume brings it back. Checkpoint itself must neither suspend again nor resume."""
    pids = [procs.cuda_like(fake.path, None) for _ in range(2)]
    fake.set_states({p: RUNNING for p in pids})
    runtime = FakeRuntime(Clock())
    states_in_dump = {}
    runtime.on_checkpoint = lambda args: states_in_dump.update(fake.states())

    async def go():
        c = make_container(tmp_path, runtime, pids, loader(fake))
        await c.pause()
        assert c.init.state is State.PAUSED
        after_pause = len(fake.log())
        await c.checkpoint(checkpoint_request(tmp_path / "image"))
        assert [l.call for l in fake.log()[after_pause:] if l.call != "state"] == []
        assert c.init.state is State.PAUSED
        await c.resume()
        return c

    c = run(go)
    assert states_in_dump == {p: CHECKPOINTED for p in pids}
    assert runtime.calls == ["pause", "checkpoint", "resume"]
    assert fake.states() == {p: RUNNING for p in pids}
    assert c.init.state is State.RUNNING
    assert json.loads((tmp_path / "image" / gpu_records.RECORD_NAME).read_text())["suspended_by"] == "pause"


def test_checkpoint_of_a_paused_task_that_keeps_vram_thaws_for_the_driver(fake, procs, tmp_path):
    pids = [procs.cuda_like(fake.path, None)]
    fake.set_states({p: RUNNING for p in pids})
    clock = Clock()
    runtime = FakeRuntime(clock)

    async def go():
        c = make_container(tmp_path, runtime, pids, loader(fake), {gpu_settings.PAUSE_ANNOTATION: "keep"})
        await c.pause()
        assert fake.log("lock") == []  # keep: the freeze alone
        await c.checkpoint(checkpoint_request(tmp_path / "image"))
        return c

    c = run(go)
    assert runtime.calls == ["pause", "resume", "pause", "checkpoint", "resume", "pause"]
    assert fake.calls(pids[0]) == ["lock", "checkpoint", "restore", "unlock"]
    t = dict((what + str(i), ns) for i, (ns, what) in enumerate(clock.events))
    assert t["resume1"] <= first_call_ns(fake, "lock") and last_call_ns(fake, "checkpoint") <= t["pause2"]
    assert t["resume4"] <= first_call_ns(fake, "restore") and last_call_ns(fake, "unlock") <= t["pause5"]
    assert c.init.state is State.PAUSED


# ---- pause / resume --------------------------------------------------------------------------------
def test_pause_suspends_before_freeze_and_resume_thaws_before_resume(fake, procs, tmp_path):
    pids = [procs.cuda_like(fake.path, None) for _ in range(2)]
    fake.set_states({p: RUNNING for p in pids})
    clock = Clock()
    runtime = FakeRuntime(clock)

    async def go():
        c = make_container(tmp_path, runtime, pids, loader(fake))
        await c.pause()
        paused_states = fake.states()
        assert c.init.state is State.PAUSED
        await c.resume()
        return c, paused_states

    c, paused_states = run(go)
    assert paused_states == {p: CHECKPOINTED for p in pids}  # VRAM released while paused
    assert fake.states() == {p: RUNNING for p in pids}
    assert c.init.state is State.RUNNING
    freeze_ns = next(t for t, what in clock.events if what == "pause")
    thaw_ns = next(t for t, what in clock.events if what == "resume")
    assert last_call_ns(fake, "checkpoint") <= freeze_ns  # suspend all, then freeze
    assert thaw_ns <= first_call_ns(fake, "restore")  # thaw, then resume all
    assert c.layer.gpu.paused is None


def test_pause_with_keep_annotation_only_freezes(fake, procs, tmp_path):
    pids = [procs.cuda_like(fake.path, None)]
    fake.set_states({p: RUNNING for p in pids})
    runtime = FakeRuntime(Clock())
    load = loader(fake)

    async def go():
        c = make_container(tmp_path, runtime, pids, load, {gpu_settings.PAUSE_ANNOTATION: "keep"})
        await c.pause()
        await c.resume()

    run(go)
    assert runtime.calls == ["pause", "resume"]
    assert fake.calls(pids[0]) == [] and load.calls == []


def test_pause_resumes_cuda_when_the_freeze_fails(fake, procs, tmp_path):
    pids = [procs.cuda_like(fake.path, None) for _ in range(2)]
    fake.set_states({p: RUNNING for p in pids})
    runtime = FakeRuntime(Clock())
    runtime.fail["pause"] = "cannot freeze"

    async def go():
        c = make_container(tmp_path, runtime, pids, loader(fake))
        with pytest.raises(TTRPCError) as info:
            await c.pause()
        assert "cannot freeze" in info.value.message
        return c

    c = run(go)
    assert c.init.state is State.RUNNING
    assert fake.states() == {p: RUNNING for p in pids}
    assert c.layer.gpu.paused is None


def test_resume_failure_freezes_again_and_a_retry_finishes(fake, procs, tmp_path):
    pids = [procs.cuda_like(fake.path, None) for _ in range(2)]
    fake.set_states({p: RUNNING for p in pids})
    runtime = FakeRuntime(Clock())

    async def go():
        c = make_container(tmp_path, runtime, pids, loader(fake))
        await c.pause()
        fake.script(f"fail restore {pids[0]} {CUDA_ERROR_UNKNOWN} 1")
        with pytest.raises(TTRPCError) as info:
            await c.resume()
        err = info.value
        assert err.code is Code.INTERNAL and f"pid {pids[0]}" in err.message
        assert "CUDA_ERROR_UNKNOWN" in err.message and "stays paused" in err.message
        assert c.init.state is State.PAUSED  # truthful: frozen again
        assert runtime.calls == ["pause", "resume", "pause"]
        await c.resume()  # the scripted failure was one-shot
        return c

    c = run(go)
    assert c.init.state is State.RUNNING
    assert fake.states() == {p: RUNNING for p in pids}


def test_state_and_pids_are_served_while_the_driver_works(fake, procs, tmp_path):
    """Driver calls run in threads: the event loop (State, Pids, other containers) keeps going."""
    pids = [procs.cuda_like(fake.path, None)]
    fake.set_states({p: RUNNING for p in pids})
    fake.script(f"sleep checkpoint {pids[0]} 400")
    runtime = FakeRuntime(Clock())

    async def go():
        c = make_container(tmp_path, runtime, pids, loader(fake))
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        t = asyncio.ensure_future(ticker())
        await c.pause()
        t.cancel()
        return ticks

    assert run(go) >= 5  # a loop blocked by the driver call would manage 0 or 1


# ---- restore -----------------------------------------------------------------------------------------
def test_restore_resumes_only_what_the_driver_reports_not_running(fake, procs, tmp_path):
    running, checkpointed, locked = (procs.cuda_like(fake.path, None) for _ in range(3))
    fake.set_states({running: RUNNING, checkpointed: CHECKPOINTED, locked: LOCKED})
    runtime = FakeRuntime(Clock())

    async def go():
        c = make_container(tmp_path, runtime, [running, checkpointed, locked], loader(fake),
                           state=State.CREATED_CHECKPOINT, image=str(tmp_path / "image"))
        await c.layer.after_restore(c.handle, c.init.current.image_dir)

    run(go)
    assert fake.calls(running) == []  # CRIU's plugin already resumed it
    assert fake.calls(checkpointed) == ["restore", "unlock"]
    assert fake.calls(locked) == ["unlock"]
    assert fake.states() == {running: RUNNING, checkpointed: RUNNING, locked: RUNNING}
    assert runtime.calls == []


def test_restore_passes_the_gpu_map_through(fake, procs, tmp_path):
    pid = procs.cuda_like(fake.path, None)
    fake.set_states({pid: CHECKPOINTED})
    uuids = fake.driver().device_uuids()

    async def go():
        c = make_container(tmp_path, FakeRuntime(Clock()), [pid], loader(fake), state=State.CREATED_CHECKPOINT,
                           annotations={gpu_settings.GPU_MAP_ANNOTATION: f"{uuids[0]}={uuids[1]}"})
        await c.layer.after_restore(c.handle, c.init.current.image_dir)

    run(go)
    (restore,) = fake.log("restore")
    assert restore.detail.startswith("pairs=1 ")
    assert fake.states() == {pid: RUNNING}


def test_restore_failure_kills_the_task_and_names_pid_and_error(fake, procs, tmp_path):
    ok, bad = procs.cuda_like(fake.path, None), procs.cuda_like(fake.path, None)
    fake.set_states({ok: CHECKPOINTED, bad: CHECKPOINTED})
    fake.script(f"fail restore {bad} {CUDA_ERROR_UNKNOWN}")
    runtime = FakeRuntime(Clock())

    async def go():
        c = make_container(tmp_path, runtime, [ok, bad], loader(fake), state=State.CREATED_CHECKPOINT)
        await c.layer.after_restore(c.handle, c.init.current.image_dir)

    with pytest.raises(TTRPCError) as info:
        run(go)
    err = info.value
    assert err.code is Code.INTERNAL and "container gpu1" in err.message
    assert f"pid {bad}" in err.message and "CUDA_ERROR_UNKNOWN" in err.message
    assert runtime.calls == ["kill 9 all"]


def test_restore_of_a_failed_process_is_refused(fake, procs, tmp_path):
    pid = procs.cuda_like(fake.path, None)
    fake.set_states({pid: FAILED})
    runtime = FakeRuntime(Clock())

    async def go():
        c = make_container(tmp_path, runtime, [pid], loader(fake), state=State.CREATED_CHECKPOINT)
        await c.layer.after_restore(c.handle, c.init.current.image_dir)

    with pytest.raises(TTRPCError) as info:
        run(go)
    assert "FAILED" in info.value.message and str(pid) in info.value.message
    assert runtime.calls == ["kill 9 all"]


# ---- CPU-only containers ------------------------------------------------------------------------------
def test_cpu_only_container_never_loads_the_driver(procs, tmp_path):
    pids = [procs.sleeper(), procs.sleeper()]
    runtime = FakeRuntime(Clock())
    image = tmp_path / "image"

    async def go():
        c = make_container(tmp_path, runtime, pids, refusing_loader)
        await c.checkpoint(checkpoint_request(image))
        await c.pause()
        await c.resume()
        c.init.current = CreatedFromCheckpoint(c.init, "")
        await c.layer.after_restore(c.handle, c.init.current.image_dir)

    run(go)
    assert runtime.calls == ["checkpoint", "pause", "resume"]
    assert not (image / gpu_records.RECORD_NAME).exists()


def test_cpu_only_path_imports_neither_cuda_bindings_nor_cffi(tmp_path):
    """In a fresh interpreter: the default driver loader and discovery stay unimported."""
    code = f"""
import asyncio, os, subprocess, sys
sys.path.insert(0, {str(REPO)!r})
from shim.checkpoint.layer import PlainLayer
from shim.gpu import lifecycle as gpu
from shim.gpu import procfs as gpu_procfs
from shim.gpu import records as gpu_records
from shim.gpu import settings as gpu_settings
child = subprocess.Popen(["sleep", "30"])
g = gpu.ContainerGpu("cpu1", {{}}, lambda: [os.getpid(), child.pid])
async def go():
    assert await g.suspend("checkpoint", "checkpoint") is None
    assert await g.resume_restored() == []
asyncio.run(go())
child.kill()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("cuda_bindings", "cffi", "_cffi_backend"))
print("LOADED", loaded)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout


def test_process_mapping_libcuda_without_cuda_state_is_skipped(fake, procs, tmp_path):
    """A process that maps libcuda but never initialised CUDA: the driver says so, CPU path."""
    pid = procs.cuda_like(fake.path, None)  # not in the stand-in's state file: NOT_FOUND
    runtime = FakeRuntime(Clock())

    async def go():
        c = make_container(tmp_path, runtime, [pid], loader(fake))
        await c.checkpoint(checkpoint_request(tmp_path / "image"))

    run(go)
    assert runtime.calls == ["checkpoint"]
    assert fake.calls(pid) == []


# ---- settings and /proc helpers ---------------------------------------------------------------------
@pytest.mark.parametrize("annotations, error", [
    ({gpu_settings.LOCK_TIMEOUT_ANNOTATION: "ten"}, "not an integer"),
    ({gpu_settings.LOCK_TIMEOUT_ANNOTATION: "0"}, "wait forever"),
    ({gpu_settings.PAUSE_ANNOTATION: "maybe"}, "'keep' or 'release'"),
    ({gpu_settings.GPU_MAP_ANNOTATION: "GPU-a"}, "OLD_UUID=NEW_UUID"),
])
def test_bad_annotations_are_refused_with_their_name(annotations, error):
    with pytest.raises(TTRPCError) as info:
        gpu_settings.GpuSettings.from_spec({"annotations": annotations}, "c9")
    assert info.value.code is Code.INVALID_ARGUMENT
    assert error in info.value.message and next(iter(annotations)) in info.value.message
    assert "container c9" in info.value.message


def test_a_bad_gpu_annotation_refuses_the_create_with_an_audit_line(caplog):
    """The layer parses its annotations when it is made (at Create), not at the first checkpoint."""
    spec = {"annotations": {gpu_settings.LOCK_TIMEOUT_ANNOTATION: "ten"}}
    with caplog.at_level("WARNING", logger="kybernate.audit"):
        with pytest.raises(TTRPCError) as info:
            gpu.stack(PlainLayer(), "c9", spec, has_gpus=True)
    assert info.value.code is Code.INVALID_ARGUMENT
    assert any("AUDIT refused container=c9" in r.getMessage() and gpu_settings.LOCK_TIMEOUT_ANNOTATION in r.getMessage()
               for r in caplog.records)


def test_the_layer_stack_is_chosen_once_from_what_the_container_has(tmp_path):
    assert isinstance(gpu.stack(PlainLayer(), "c", {}, has_gpus=False, node_has_driver=False), PlainLayer)
    assert isinstance(gpu.stack(PlainLayer(), "c", {}, has_gpus=True, node_has_driver=False), gpu.GpuLayer)
    assert isinstance(gpu.stack(PlainLayer(), "c", {}, has_gpus=False, node_has_driver=True), gpu.GpuLayer)
    image = tmp_path / "image"
    image.mkdir()
    assert isinstance(gpu.stack(PlainLayer(), "c", {}, has_gpus=False, restore_image=str(image),
                                node_has_driver=False), PlainLayer)
    (image / gpu_records.RECORD_NAME).write_text("{}")
    assert isinstance(gpu.stack(PlainLayer(), "c", {}, has_gpus=False, restore_image=str(image),
                                node_has_driver=False), gpu.GpuLayer)


def test_default_settings():
    s = gpu_settings.GpuSettings.from_spec({}, "c9")
    assert (s.lock_timeout_ms, s.release_on_pause, s.gpu_map) == (10_000, True, None)
    s = gpu_settings.GpuSettings.from_spec({"annotations": {gpu_settings.PAUSE_ANNOTATION: "keep",
                                                   gpu_settings.GPU_MAP_ANNOTATION: "GPU-a=GPU-b, GPU-c=GPU-d"}}, "c9")
    assert s.release_on_pause is False and s.gpu_map == {"GPU-a": "GPU-b", "GPU-c": "GPU-d"}


def test_gpus_of_a_process_come_from_its_device_files(tmp_path):
    """/dev/nvidiaN held open -> minor N -> the UUID in /proc/driver/nvidia/gpus/*/information."""
    dev = tmp_path / "dev"
    dev.mkdir()
    try:
        os.mknod(dev / "nvidia1", 0o600 | 0o020000, os.makedev(195, 1))
        os.mknod(dev / "nvidiactl", 0o600 | 0o020000, os.makedev(195, 255))
    except PermissionError:
        pytest.skip("mknod needs root")
    proc = tmp_path / "proc"
    fd = proc / "4242" / "fd"
    fd.mkdir(parents=True)
    (fd / "3").symlink_to(dev / "nvidia1")
    (fd / "4").symlink_to(dev / "nvidiactl")
    (fd / "5").symlink_to("/dev/null")
    gpus = tmp_path / "gpus"
    for minor, bus, uuid in ((0, "0000:01:00.0", "GPU-aaaa"), (1, "0000:02:00.0", "GPU-bbbb")):
        (gpus / bus).mkdir(parents=True)
        (gpus / bus / "information").write_text(
            f"Model: \t\t NVIDIA H100\nGPU UUID: \t {uuid}\nBus Location: \t {bus}\nDevice Minor: \t {minor}\n")
    assert gpu_procfs.gpu_minors(4242, proc) == {1}
    assert gpu_procfs.gpu_uuids_by_minor(gpus) == {0: "GPU-aaaa", 1: "GPU-bbbb"}
    g = gpu.ContainerGpu("c", {}, lambda: [], proc=proc, gpus_dir=gpus)
    assert g._gpus_of(4242, ["GPU-aaaa", "GPU-bbbb"], gpu_procfs.gpu_uuids_by_minor(gpus)) == (["GPU-bbbb"], "device-files")
    assert g._gpus_of(9999, ["GPU-aaaa", "GPU-bbbb"], {}) == (["GPU-aaaa", "GPU-bbbb"], "all-visible")


def test_the_driver_is_never_loaded_from_a_container(fake, procs, monkeypatch, tmp_path):
    """A CUDA process maps a libcuda the host loader does not know: the shim does not load that one
    (nor through /proc/PID/root): code a container controls never runs in the root shim."""
    from shim.gpu import driver as gpu_driver
    from cuda_bindings import DriverMissing

    monkeypatch.setattr(gpu_driver, "WELL_KNOWN_DIRS", (str(tmp_path / "none"),))
    monkeypatch.delenv("KYBERNATE_LIBCUDA", raising=False)
    procs.cuda_like(fake.path, None)  # maps the stand-in, which the loader cannot find by name
    loader = gpu_driver.DriverLoader()
    try:
        driver = loader()
    except DriverMissing:  # no driver on this host: nothing loaded at all
        assert not loader.loaded
    else:  # a GPU host: the host's own driver, never the library the container maps
        assert driver.path != fake.path and "fakecuda" not in driver.path


def test_the_node_names_the_driver_and_only_root_owned_well_known_dirs_count(fake, monkeypatch, tmp_path):
    from shim.gpu import driver as gpu_driver

    loader = gpu_driver.DriverLoader(libcuda=fake.path)
    drv = loader()
    assert drv.path == fake.path and loader() is drv  # cached
    # a well-known dir that others may write is not trusted
    d = tmp_path / "lib"
    d.mkdir()
    lib = d / "libcuda.so.1"
    lib.write_bytes(Path(fake.path).read_bytes())
    os.chmod(d, 0o777)
    assert not gpu_driver.root_owned(str(lib))
    os.chmod(d, 0o755)
    os.chmod(lib, 0o644)
    assert gpu_driver.root_owned(str(lib)) == (os.getuid() == 0)


def test_resume_after_a_suspended_process_was_killed_resumes_the_rest(fake, procs, tmp_path):
    pids = [procs.cuda_like(fake.path, None) for _ in range(2)]
    fake.set_states({p: RUNNING for p in pids})
    runtime = FakeRuntime(Clock())

    async def go():
        c = make_container(tmp_path, runtime, pids, loader(fake))
        await c.pause()
        victim = procs.children[0]
        victim.kill()
        victim.wait()
        fake.script(f"fail state {pids[0]} 500", f"fail restore {pids[0]} 500")  # the driver knows it no more
        await c.resume()
        return c

    c = run(go)
    assert c.init.state is State.RUNNING
    assert fake.states()[pids[1]] == RUNNING
    assert runtime.calls == ["pause", "resume"]


def test_prepare_loads_the_driver_ahead_only_for_gpu_containers(fake, monkeypatch, tmp_path):
    from shim.checkpoint.layer import TaskHandle
    from shim.gpu import driver as gpu_driver

    loader = gpu_driver.DriverLoader(libcuda=fake.path)
    monkeypatch.setattr(gpu_driver, "_loaders", {"": loader})
    task = TaskHandle("cpu", "default", str(tmp_path), {}, None, lambda: 0)
    plain = gpu.stack(PlainLayer(), "cpu", {}, has_gpus=False, node_has_driver=False)
    plain.prepare(task)
    time.sleep(0.3)
    assert not loader.loaded
    layer = gpu.stack(PlainLayer(), "gpu", {}, has_gpus=True, node_has_driver=False)
    layer.prepare(task)
    deadline = time.monotonic() + 5
    while not loader.loaded and time.monotonic() < deadline:
        time.sleep(0.02)
    assert loader.loaded and loader().path == fake.path
