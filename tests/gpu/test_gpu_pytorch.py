"""PyTorch training in a GPU container: checkpointed and restored, paused and resumed, its losses equal to
an uninterrupted run's bit for bit (issue 15).

The machine's PyTorch (KYB_TORCH_PYTHON, default /opt/torch/.venv/bin/python3) runs in a container of
the kybernate runtime whose rootfs is our busybox workload image: what that interpreter needs (itself,
its loader and glibc, the stdlib, the venv, every library it loaded, libcuda's directory) is bind-mounted
read-only at the paths it names them by, worked out by running it once on the host
(tests/gpu/host_python.py, torch_train.py --probe); tests/gpu is bound at /kyb-tests for the script; the
container's own /tmp stays its own and writable. Devices, host network and containerd (KYB_GPU_CONTAINERD)
are tests/gpu/test_gpu_containers.py's.

The job (tests/gpu/torch_train.py): fixed seed, deterministic algorithms, CUBLAS_WORKSPACE_CONFIG=:4096:8,
a residual MLP whose weights, gradients and Adam state take --gib GiB (KYB_TORCH_GIB, default "2 8": a
2 GiB-class and an 8 GiB-class container), STEPS steps paced PACE_MS apart, each step's loss appended to
/tmp/losses in the container as "STEP repr(loss)". The reference: the same script, seed and size,
uninterrupted and unpaced, on the host with the container's LD_LIBRARY_PATH.

(a) After CHECKPOINT_AFTER steps: Tasks.Checkpoint with exit (CheckpointOptions.image_path in SCRATCH),
    then a new container restored through kybernate.io/restore-from. The original's losses (read through
    a descriptor of its root kept across the checkpoint) end at step k; the restored process's own
    /tmp/losses (a fresh rootfs) must start at step k + 1 (a process started afresh writes step 0: the
    test fails) and run to the last step; together they equal the reference exactly.
(b) After CHECKPOINT_AFTER steps: `ctr task pause` (the shim suspends CUDA: nvidia-smi shows the VRAM
    released; no step meanwhile), `ctr task resume` (the VRAM back); all the losses equal the reference.
Checkpoint, restore, pause and resume times are recorded (KYB_GPU_OUT: gpu_pytorch.json / .md), not
asserted: the targets are measured by benchmarks, side by side.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest

from shim.gpu.records import RECORD_NAME
from tests.gpu import host_python
from tests.gpu.test_gpu_containers import (  # noqa: F401 - env is a fixture, used by name
    _CURRENT_CONTAINERD, CONTAINERD_VERSION, GiB, OUT, RESTORE_ANNOTATION, SCRATCH, SKIP, WORKLOAD_REF,
    GpuContainer, env, grpc_checkpoint, require_grpc_api, save_shim_log, timed, vram_mib, wait_for)
from tests.integration.harness import KYBERNATE_RUNTIME

TORCH_PYTHON = os.environ.get("KYB_TORCH_PYTHON", "/opt/torch/.venv/bin/python3")
SIZES_GIB = [int(g) for g in os.environ.get("KYB_TORCH_GIB", "2 8").split()]
TESTS_DIR = Path(__file__).resolve().parent
SCRIPT = TESTS_DIR / "torch_train.py"
TESTS_IN_CONTAINER = "/kyb-tests"
STEPS = 40
CHECKPOINT_AFTER = 10   # steps logged before the checkpoint or the pause
SEED = 1234
PACE_MS = 100
LOSSES = "/tmp/losses"  # in the container's own rootfs; DONE and INFO beside it (torch_train.py)
DONE = LOSSES + ".done"
INFO = LOSSES + ".json"
CUBLAS = "CUBLAS_WORKSPACE_CONFIG=:4096:8"
RESULTS: dict = {}


def _why_skip() -> Optional[str]:
    if SKIP:
        return SKIP
    if not os.access(TORCH_PYTHON, os.X_OK):
        return f"no PyTorch interpreter at {TORCH_PYTHON} ($KYB_TORCH_PYTHON)"
    return None


SKIP_TORCH = _why_skip()
pytestmark = pytest.mark.skipif(SKIP_TORCH is not None, reason=SKIP_TORCH or "")


# ---- the report ----------------------------------------------------------------------------------------
def save_results() -> None:
    if OUT:
        Path(OUT).mkdir(parents=True, exist_ok=True)
        (Path(OUT) / "gpu_pytorch.json").write_text(json.dumps(RESULTS, indent=1, default=str))
        (Path(OUT) / "gpu_pytorch.md").write_text(render_markdown(RESULTS))


@pytest.fixture(scope="module")
def results():
    """This module's numbers (the env fixture adds its "setup" here too)."""
    yield RESULTS
    save_results()


@pytest.fixture(autouse=True)
def _save_after_each_test():
    yield
    save_results()
    if _CURRENT_CONTAINERD:
        save_shim_log(_CURRENT_CONTAINERD[0])


# ---- the host's PyTorch, planned into the container -------------------------------------------------------
@pytest.fixture(scope="module")
def torch_plan(env, results) -> host_python.Plan:
    """What to bind-mount: from one run of torch_train.py --probe with the host's interpreter."""
    facts = host_python.probe(TORCH_PYTHON, str(SCRIPT))
    if "torch_error" in facts:
        pytest.skip(f"{TORCH_PYTHON} has no PyTorch: {facts['torch_error']}")
    assert facts.get("cuda_available"), f"{TORCH_PYTHON}: torch {facts.get('torch')} sees no CUDA device here"
    plan = host_python.plan(facts, extra_library_dirs=[os.path.dirname(env.libcuda)])
    results["torch_setup"] = {
        "python": TORCH_PYTHON, "real_executable": facts["real_executable"], "interpreter": facts.get("interpreter"),
        "torch": facts.get("torch"), "cuda": facts.get("cuda"), "device": facts.get("device"),
        "binds": [f"{b.source} -> {b.destination}" for b in plan.binds], "ld_library_path": plan.ld_library_path,
        "libraries_loaded": len(facts.get("libraries") or [])}
    return plan


REFERENCES: dict = {}


def reference(plan: host_python.Plan, gib: int, workdir: Path) -> list:
    """The uninterrupted run's (step, loss repr) list: same script, seed and size, on the host, unpaced."""
    if gib in REFERENCES:
        return REFERENCES[gib]
    losses = workdir / f"reference-{gib}g.losses"
    losses.unlink(missing_ok=True)
    run_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LD_LIBRARY_PATH": ":".join(plan.ld_library_path),
               CUBLAS.split("=", 1)[0]: CUBLAS.split("=", 1)[1]}
    cmd = [TORCH_PYTHON, "-I", str(SCRIPT), "--gib", str(gib), "--steps", str(STEPS), "--seed", str(SEED),
           "--losses", str(losses), "--pace-ms", "0", "--exit-when-done"]
    out, seconds = timed(subprocess.run, cmd, capture_output=True, text=True, timeout=600, env=run_env)
    assert out.returncode == 0, f"the reference run failed ({out.returncode}): {out.stderr[-3000:]}"
    steps = parse_losses(losses.read_text())
    assert [s for s, _ in steps] == list(range(STEPS)), f"the reference run logged steps {[s for s, _ in steps]}"
    assert all(math.isfinite(float(v)) for _, v in steps), f"the reference run's losses are not finite: {steps}"
    RESULTS.setdefault("reference", {})[f"{gib}GiB"] = {
        "seconds": seconds, "first_losses": steps[:3], "last_loss": steps[-1],
        "info": json.loads(Path(str(losses) + ".json").read_text())}
    REFERENCES[gib] = steps
    return steps


# ---- the losses file ----------------------------------------------------------------------------------------
def parse_losses(text: str) -> list:
    """(step, loss repr) of each whole line."""
    steps = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # a line still being written
        step, value = line.split()
        steps.append((int(step), value))
    return steps


def read_in_root(root_fd: int, path: str) -> Optional[str]:
    """A file of a container's rootfs through a descriptor of its root (kept across the process's exit)."""
    try:
        fd = os.open(path.lstrip("/"), os.O_RDONLY, dir_fd=root_fd)
    except FileNotFoundError:
        return None
    with os.fdopen(fd) as f:
        return f.read()


def first_difference(got: list, want: list) -> str:
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            return f"first difference at entry {i}: got {g}, the uninterrupted run {w}"
    return f"{len(got)} entries, the uninterrupted run {len(want)}"


# ---- one training container ---------------------------------------------------------------------------------
class TorchContainer(GpuContainer):
    """torch_train.py under the host's interpreter in the busybox rootfs, with the planned binds."""

    def __init__(self, env, plan: host_python.Plan, cid: str, gib: int, annotations: Optional[dict] = None):
        super().__init__(env, cid, gib * GiB, annotations=annotations)
        self.plan = plan
        self.gib = gib

    def argv(self) -> list:
        return [self.plan.executable, "-I", f"{TESTS_IN_CONTAINER}/{SCRIPT.name}", "--gib", str(self.gib),
                "--steps", str(STEPS), "--seed", str(SEED), "--losses", LOSSES, "--pace-ms", str(PACE_MS)]

    def run_args(self, annotations: Optional[dict] = None) -> list:
        args = ["run", "-d", "--runtime", KYBERNATE_RUNTIME, "--net-host", "--log-uri", f"file://{self.log}"]
        for d in self.env.devices:
            args += ["--device", d]
        args += self.plan.ctr_args()
        args += ["--mount", host_python.Bind(str(TESTS_DIR), TESTS_IN_CONTAINER).ctr_mount(), "--env", CUBLAS]
        for k, v in {**self.annotations, **(annotations or {})}.items():
            args += ["--annotation", f"{k}={v}"]
        return args + [WORKLOAD_REF, self.id] + self.argv()

    def start(self) -> "TorchContainer":
        self.ctr(*self.run_args(), timeout=120)
        self.env.containers.append(self)
        self.wait_steps(1, timeout=240)  # torch's import, CUDA's start, the model's first step
        return self

    def read(self, path: str) -> Optional[str]:
        try:
            return Path(f"/proc/{self.pid}/root{path}").read_text()
        except OSError:
            return None

    def losses(self) -> list:
        return parse_losses(self.read(LOSSES) or "")

    def wait_steps(self, count: int, timeout: float = 120.0) -> list:
        return wait_for(lambda: (lambda s: s if len(s) >= count else None)(self.losses()), timeout,
                        what=f"{self.id}: {count} steps logged; output: {self.output_tail()}")

    def wait_done(self, timeout: float = 180.0) -> list:
        wait_for(lambda: self.read(DONE), timeout, what=f"{self.id}: the last step; output: {self.output_tail()}")
        return self.losses()

    def output_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
        except OSError:
            return ""


def _vram_of(pid: int) -> int:
    return vram_mib().get(pid, 0)


@pytest.fixture(params=SIZES_GIB, ids=lambda g: f"{g}GiB")
def gib(request) -> int:
    return request.param


# ---- (a) checkpoint with exit, restore through the annotation ---------------------------------------------------
def test_a_checkpoint_restore_continues_training_bit_for_bit(env, torch_plan, results, gib):
    require_grpc_api()
    want = reference(torch_plan, gib, env.workdir)
    out: dict = {}
    results.setdefault("checkpoint_restore", {})[f"{gib}GiB"] = out
    images = SCRATCH / f"kyb-torch-{gib}g"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    try:
        c = TorchContainer(env, torch_plan, f"torch-ckpt-{gib}g", gib).start()
        pid = c.pid
        root_fd = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY)
        try:
            c.wait_steps(CHECKPOINT_AFTER)
            out["info"] = json.loads(c.read(INFO) or "{}")
            out["vram_before_mib"] = _vram_of(pid)
            out["checkpoint_s"] = grpc_checkpoint(env, c.id, images, exit=True, timeout=600)
            before = parse_losses(read_in_root(root_fd, LOSSES) or "")  # all the original logged, to its end
        finally:
            os.close(root_fd)
        assert c.task()[1] in ("STOPPED", "NONE"), f"still {c.task()} after a checkpoint with exit"
        assert before, "the original container's /tmp/losses is empty after the checkpoint"
        last = before[-1][0]
        assert [s for s, _ in before] == list(range(last + 1)), f"the original logged steps {[s for s, _ in before]}"
        assert CHECKPOINT_AFTER - 1 <= last < STEPS - 1, f"checkpointed after step {last}: not mid-run"
        record = json.loads((images / RECORD_NAME).read_text())
        out.update(checkpointed_after_step=last, shim_timings=record.get("timings"),
                   shim_suspend_s=record.get("suspend_seconds"),
                   image_bytes=sum(f.stat().st_size for f in images.rglob("*") if f.is_file()))
        c.remove()

        r = TorchContainer(env, torch_plan, f"torch-restored-{gib}g", gib)
        t0 = time.perf_counter()
        _, out["restore_s"] = timed(r.ctr, *r.run_args({RESTORE_ANNOTATION: str(images)}), timeout=600)
        env.containers.append(r)
        rpid = r.pid
        first = wait_for(lambda: r.losses()[:1], 120, interval=0.02,
                         what=f"a step of the restored {r.id}; output: {r.output_tail()}")[0]
        out["first_step_after_restore_s"] = round(time.perf_counter() - t0, 4)
        out["first_step_after_restore"] = first[0]
        assert first[0] == last + 1, (
            f"the restored process logged step {first[0]} first; the checkpoint was taken after step {last}: "
            + ("it started afresh" if first[0] == 0 else "steps were lost or repeated")
            + f"; output: {r.output_tail()}")
        out["vram_after_restore_mib"] = _vram_of(rpid)
        after = r.wait_done()
        got = before + after
        assert [s for s, _ in got] == list(range(STEPS)), f"steps logged: {[s for s, _ in got]}"
        assert got == want, f"the losses differ from the uninterrupted run's: {first_difference(got, want)}"
        out["losses_equal_reference"] = True
        r.remove()
    finally:
        shutil.rmtree(images, ignore_errors=True)


# ---- (b) pause releases the VRAM, resume brings it back, training goes on as if never paused ---------------------
def test_b_pause_resume_releases_vram_and_training_goes_on_bit_for_bit(env, torch_plan, results, gib):
    want = reference(torch_plan, gib, env.workdir)
    out: dict = {}
    results.setdefault("pause_resume", {})[f"{gib}GiB"] = out
    c = TorchContainer(env, torch_plan, f"torch-pause-{gib}g", gib).start()
    pid = c.pid
    c.wait_steps(CHECKPOINT_AFTER)
    held = out["vram_before_mib"] = _vram_of(pid)
    assert held >= gib * 1024, f"pid {pid} holds {held} MiB, less than its {gib} GiB of model and Adam state"
    _, out["pause_s"] = timed(c.ctr, "tasks", "pause", c.id, timeout=300)
    assert c.task()[1] == "PAUSED"
    freed = out["vram_paused_mib"] = _vram_of(pid)
    assert freed < 64, f"paused: pid {pid} still holds {freed} MiB of VRAM"
    logged = len(c.losses())
    out["paused_after_step"] = logged - 1
    time.sleep(0.5)
    assert len(c.losses()) == logged, "a step was logged while the container was paused"
    _, out["resume_s"] = timed(c.ctr, "tasks", "resume", c.id, timeout=300)
    assert c.task()[1] == "RUNNING"
    back = out["vram_after_resume_mib"] = _vram_of(pid)
    assert back >= held - 64, f"resumed: pid {pid} holds {back} MiB, {held} MiB before the pause"
    got = c.wait_done()
    assert [s for s, _ in got] == list(range(STEPS)), f"steps logged: {[s for s, _ in got]}"
    assert got == want, f"the losses differ from the uninterrupted run's: {first_difference(got, want)}"
    out["losses_equal_reference"] = True
    assert out["paused_after_step"] < STEPS - 1, "the pause came after the last step"
    c.remove()


# ---- the report ---------------------------------------------------------------------------------------------------
def render_markdown(r: dict) -> str:
    s = r.get("setup", {})
    t = r.get("torch_setup", {})
    lines = [f"# PyTorch training in a GPU container under containerd {s.get('containerd', CONTAINERD_VERSION)} + "
             "kybernate (tests/gpu/test_gpu_pytorch.py)", "",
             f"torch {t.get('torch')} (CUDA {t.get('cuda')}) on {t.get('device')}, from {t.get('python')} "
             f"({t.get('real_executable')}, loader {t.get('interpreter')}); {len(t.get('binds') or [])} read-only "
             f"binds; {STEPS} steps, {PACE_MS} ms apart, seed {SEED}", ""]
    for size, x in (r.get("reference") or {}).items():
        info = x.get("info") or {}
        lines.append(f"- reference {size}: {info.get('layers')} blocks, {info.get('params')} parameters, "
                     f"{round((info.get('reserved') or 0) / GiB, 2)} GiB reserved by torch; uninterrupted run "
                     f"{x.get('seconds')} s; last {x.get('last_loss')}")
    lines += ["", "| container | checkpoint (exit) s | image GiB | restore s | first step after restore s | "
              "VRAM MiB before -> after | losses = reference |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for size, x in (r.get("checkpoint_restore") or {}).items():
        lines.append(f"| {size} | {x.get('checkpoint_s')} | {round((x.get('image_bytes') or 0) / GiB, 2)} | "
                     f"{x.get('restore_s')} | {x.get('first_step_after_restore_s')} | {x.get('vram_before_mib')} -> "
                     f"{x.get('vram_after_restore_mib')} | {x.get('losses_equal_reference', False)} |")
    lines += ["", "| container | pause s | resume s | VRAM MiB before -> paused -> resumed | losses = reference |",
              "| --- | --- | --- | --- | --- |"]
    for size, x in (r.get("pause_resume") or {}).items():
        lines.append(f"| {size} | {x.get('pause_s')} | {x.get('resume_s')} | {x.get('vram_before_mib')} -> "
                     f"{x.get('vram_paused_mib')} -> {x.get('vram_after_resume_mib')} | "
                     f"{x.get('losses_equal_reference', False)} |")
    phases = {size: x.get("shim_timings") for size, x in (r.get("checkpoint_restore") or {}).items()}
    if any(phases.values()):
        lines += ["", f"shim's own checkpoint phases (kybernate-gpu.json): {phases}"]
    if t.get("binds"):
        lines += ["", "binds: " + "; ".join(t["binds"]), "", "LD_LIBRARY_PATH: " + ":".join(t.get("ld_library_path") or [])]
    return "\n".join(lines) + "\n"

