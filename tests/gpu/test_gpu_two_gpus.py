"""Two GPUs (issue 15; device kind nvidia-h200-x2): restore onto the other GPU, one container on both
GPUs, and kybernate.io/gpu-map with the GPUs swapped, each with every byte checked.

The environment, the container and the checks are tests/gpu/test_gpu_containers.py's (containerd 1.6,
the CUDA workload image, checkpoint with exit into SCRATCH through Tasks.Checkpoint's image_path,
restore through kybernate.io/restore-from); here a container's spec carries /dev/nvidiaN of the GPUs
it gets (with the control nodes), and its workers each pick a CUDA device by workload.cu's third
argument. Where each process's VRAM sits comes from nvidia-smi per process and GPU UUID.

Skipped, with the reason, where fewer than two GPUs are visible (nvidia-smi, then the driver's device
count) or where test_gpu_containers.py's environment is missing.

KYB_GPU_OUT: two_gpus.json / two_gpus.md (the numbers), shim-gpu.log and containerd-tail.log.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Sequence

import pytest

from shim.gpu.placement import canon_uuid, host_gpus
from shim.gpu.records import RECORD_NAME
from tests.gpu.test_gpu_containers import (  # noqa: F401 - env is a fixture, used by name
    _CURRENT_CONTAINERD, GiB, MiB, OUT, RESTORE_ANNOTATION, SCRATCH, SKIP, WORKLOAD_IN_IMAGE, GpuContainer,
    assert_count_continues, assert_running_intact, count_at_least, env, grpc_checkpoint, save_shim_log, timed)

NBYTES = 2 * GiB  # per process
GPU_MAP_ANNOTATION = "kybernate.io/gpu-map"
GPU_DEVICE = re.compile(r"^/dev/nvidia\d+$")
RESULTS: dict = {}


def _visible_gpus() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.strip().upper().startswith("GPU-"))


def _why_skip() -> Optional[str]:
    count = _visible_gpus() if shutil.which("nvidia-smi") else 0
    if count < 2:
        return f"needs two GPUs (device kind nvidia-h200-x2): nvidia-smi lists {count} here"
    if SKIP:
        return SKIP
    return None


SKIP_TWO = _why_skip()
pytestmark = pytest.mark.skipif(SKIP_TWO is not None, reason=SKIP_TWO or "")


# ---- the report ------------------------------------------------------------------------------------------
def save_results() -> None:
    if OUT:
        Path(OUT).mkdir(parents=True, exist_ok=True)
        (Path(OUT) / "two_gpus.json").write_text(json.dumps(RESULTS, indent=1, default=str))
        (Path(OUT) / "two_gpus.md").write_text(render_markdown(RESULTS))


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


def render_markdown(r: dict) -> str:
    lines = ["# Two GPUs under containerd 1.6 + kybernate (tests/gpu/test_gpu_two_gpus.py)", ""]
    s = r.get("setup", {})
    lines += [f"driver API {s.get('driver_version')}, GPUs {s.get('gpus')}, 2 GiB per process, images in "
              f"{s.get('scratch')}", ""]
    titles = {"1_restore_onto_other_gpu": "(1) restore onto the other GPU",
              "2_both_gpus": "(2) one container on both GPUs",
              "3_gpu_map_swapped": "(3) kybernate.io/gpu-map with the GPUs swapped"}
    lines += ["| scenario | checkpoint (exit) s | restore s | image bytes | count before -> first after | "
              "GPU per worker before -> after | placement |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, title in titles.items():
        x = r.get(key)
        if not x:
            continue
        lines.append(f"| {title} | {x.get('checkpoint_s')} | {x.get('restore_s')} | {x.get('image_bytes')} | "
                     f"{x.get('ticks_before')} -> {x.get('first_ticks_after')} | {x.get('gpus_before')} -> "
                     f"{x.get('gpus_after')} | {x.get('placement')} |")
    for key, title in titles.items():
        x = r.get(key) or {}
        if x.get("shim_timings"):
            lines.append(f"\n{title}: shim's phases (kybernate-gpu.json): {x['shim_timings']}")
    return "\n".join(lines) + "\n"


# ---- helpers ---------------------------------------------------------------------------------------------
class GpusContainer(GpuContainer):
    """A GpuContainer whose spec carries /dev/nvidiaN of `minors` (instead of the env's /dev/nvidia0),
    with one workload per entry of `cuda_devices` (worker i runs on CUDA device cuda_devices[i])."""

    def __init__(self, env, cid: str, nbytes: int, minors: Sequence[int], cuda_devices: Sequence[int],
                 annotations: Optional[dict] = None):
        super().__init__(env, cid, nbytes, workers=len(cuda_devices), annotations=annotations)
        self.minors = list(minors)
        self.cuda_devices = list(cuda_devices)

    def argv(self) -> list[str]:
        cmds = [f"{WORKLOAD_IN_IMAGE} {self.nbytes} /tmp/status{i} {d}" for i, d in enumerate(self.cuda_devices)]
        if len(cmds) == 1:
            return cmds[0].split()
        return ["sh", "-c", " & ".join(cmds) + " & wait"]

    def run_args(self, annotations: Optional[dict] = None) -> list[str]:
        args = super().run_args(annotations)
        kept: list[str] = []
        i = 0
        while i < len(args):  # drop the env's GPU device nodes, keep the control nodes and the rest
            if args[i] == "--device" and i + 1 < len(args) and GPU_DEVICE.match(args[i + 1]):
                i += 2
                continue
            kept.append(args[i])
            i += 1
        gpus = [a for m in self.minors for a in ("--device", f"/dev/nvidia{m}")]
        assert kept[:2] == ["run", "-d"], kept
        return kept[:2] + gpus + kept[2:]  # "run -d", the GPU nodes, the rest (control nodes, mount, image)

    def worker_pids(self) -> dict[int, int]:
        """worker index -> host pid, from each CUDA process's command line (/tmp/status<i>)."""
        out = {}
        for pid in self.cuda_pids():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            for i in range(self.workers):
                if f"/tmp/status{i}".encode() in argv:
                    out[i] = pid
        return out


def vram_by_gpu() -> dict[tuple[int, str], int]:
    """(pid, GPU UUID) -> MiB, from nvidia-smi's compute processes."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30).stdout
    found = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[0].isdigit() and parts[2].isdigit():
            found[(int(parts[0]), canon_uuid(parts[1]))] = int(parts[2])
    return found


def gpu_of_workers(c: GpusContainer, uuids: Sequence[str], nbytes: int) -> dict[int, str]:
    """worker -> the one GPU that holds its VRAM; asserts it holds the whole buffer there and nothing
    on the other GPUs."""
    pids = c.worker_pids()
    assert sorted(pids) == list(range(c.workers)), f"{c.id}: CUDA processes per worker: {pids}"
    vram = vram_by_gpu()
    placed = {}
    for i, pid in pids.items():
        held = {u: vram.get((pid, u), 0) for u in uuids}
        on = [u for u, mib in held.items() if mib >= nbytes // MiB]
        assert len(on) == 1, f"{c.id}: worker {i} (pid {pid}) VRAM per GPU: {held}"
        others = {u: mib for u, mib in held.items() if u != on[0] and (pid, u) in vram}
        assert not others, f"{c.id}: worker {i} (pid {pid}) also on {others} (VRAM per GPU: {held})"
        placed[i] = on[0]
    return placed


def two_gpus(env) -> tuple[str, str]:
    """UUIDs of /dev/nvidia0 and /dev/nvidia1; skips where the driver sees fewer than two GPUs or
    cannot restore onto other GPUs."""
    count = env.driver.device_count()
    if count < 2:
        pytest.skip(f"needs two GPUs (device kind nvidia-h200-x2): the CUDA driver counts {count}")
    api = env.driver.driver_version()
    if api < 13000:
        pytest.skip(f"the driver's CUDA API {api} has no GPU pairs for a restore (13.0 or newer): no remap here")
    host = host_gpus(env.driver)
    g0, g1 = host.by_minor(0), host.by_minor(1)
    assert g0 is not None and g1 is not None, f"/dev/nvidia0 and /dev/nvidia1 not resolved on this node: {host}"
    return g0.uuid, g1.uuid


def placement_line(env, cid: str) -> str:
    lines = [line for line in env.cd.log_text().splitlines() if f"container {cid}: GPU placement at restore: " in line]
    assert lines, f"no 'GPU placement at restore' line for {cid} in containerd's log"
    return lines[-1].split("GPU placement at restore: ", 1)[1].split('"')[0]  # logfmt's msg="..." ends at a quote


def checkpoint_exit(c: GpusContainer, images: Path, out: dict) -> dict:
    """Tasks.Checkpoint with exit into `images`; the numbers and the record into `out`; returns the
    tick count of each worker just before (each at least RESTORED_COUNT_FLOOR)."""
    before = count_at_least(c)
    out["checkpoint_s"] = grpc_checkpoint(c.env, c.id, images, exit=True)
    record = json.loads((images / RECORD_NAME).read_text())
    out["record"] = {k: record.get(k) for k in ("container_gpus", "container_gpus_source", "gpu_count", "gpu_models")}
    out["record_process_gpus"] = [p.get("gpus") for p in record.get("processes") or []]
    out["shim_timings"] = record.get("timings")
    out["image_bytes"] = sum(f.stat().st_size for f in images.rglob("*") if f.is_file())
    out["ticks_before"] = before
    c.remove()
    return before


def restore_from(env, images: Path, cid: str, minors: Sequence[int], cuda_devices: Sequence[int],
                 before: dict, out: dict, annotations: Optional[dict] = None) -> GpusContainer:
    """`ctr run` with kybernate.io/restore-from: every worker goes on counting (not from 1) with every
    byte right, running, its VRAM held."""
    r = GpusContainer(env, cid, NBYTES, minors, cuda_devices, annotations)
    _, out["restore_s"] = timed(r.ctr, *r.run_args({RESTORE_ANNOTATION: str(images)}), timeout=240)
    env.containers.append(r)
    firsts = assert_count_continues(r, before, f"{cid} restored through {RESTORE_ANNOTATION}")
    out["first_ticks_after"] = firsts
    out["ticks_later"] = assert_running_intact(r, firsts, f"{cid} after the restore", NBYTES // MiB)
    out["placement"] = placement_line(env, cid)
    return r


def scratch(name: str) -> Path:
    images = SCRATCH / name
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    return images


# ---- (1) restore onto the other GPU -------------------------------------------------------------------------
def test_1_restore_onto_the_other_gpu(env, results):
    """2 GiB on GPU 0 (/dev/nvidia0), checkpoint with exit, restore into a container given /dev/nvidia1:
    the count goes on with every byte right, all of its VRAM on GPU 1 and none on GPU 0; the shim
    decided a remap."""
    u0, u1 = two_gpus(env)
    out: dict = {}
    results["1_restore_onto_other_gpu"] = out
    images = scratch("kyb-2gpu-other")
    try:
        c = GpusContainer(env, "gpu0", NBYTES, [0], [0]).start()
        out["gpus_before"] = gpu_of_workers(c, (u0, u1), NBYTES)
        assert out["gpus_before"] == {0: u0}
        before = checkpoint_exit(c, images, out)
        assert out["record"]["container_gpus"] == [u0], out["record"]
        r = restore_from(env, images, "gpu0-on-gpu1", [1], [0], before, out)
        out["gpus_after"] = gpu_of_workers(r, (u0, u1), NBYTES)
        assert out["gpus_after"] == {0: u1}, f"restored onto {out['gpus_after']}, want GPU 1 ({u1})"
        pid = r.worker_pids()[0]
        assert (pid, u0) not in vram_by_gpu(), f"restored pid {pid} still on GPU 0 ({u0})"
        assert out["placement"].startswith(f"remap ({u0} -> {u1}; target from linux.devices"), out["placement"]
        r.remove()
    finally:
        shutil.rmtree(images, ignore_errors=True)


# ---- (2) one container on both GPUs ------------------------------------------------------------------------
def test_2_container_on_both_gpus_checkpoint_and_restore(env, results):
    """/dev/nvidia0 and /dev/nvidia1 in one spec, a workload on each (CUDA devices 0 and 1), checkpoint
    with exit, restore with the same two devices: both go on, bytes intact, each on its own GPU."""
    u0, u1 = two_gpus(env)
    out: dict = {}
    results["2_both_gpus"] = out
    images = scratch("kyb-2gpu-both")
    try:
        c = GpusContainer(env, "both", NBYTES, [0, 1], [0, 1]).start()
        before_gpus = out["gpus_before"] = gpu_of_workers(c, (u0, u1), NBYTES)
        assert set(before_gpus.values()) == {u0, u1}, f"the workers share a GPU: {before_gpus}"
        before = checkpoint_exit(c, images, out)
        assert sorted(out["record"]["container_gpus"]) == sorted([u0, u1]), out["record"]
        r = restore_from(env, images, "both-restored", [0, 1], [0, 1], before, out)
        out["gpus_after"] = gpu_of_workers(r, (u0, u1), NBYTES)
        assert out["gpus_after"] == before_gpus, f"moved: {before_gpus} -> {out['gpus_after']}"
        assert out["placement"].startswith("identity ("), out["placement"]
        r.remove()
    finally:
        shutil.rmtree(images, ignore_errors=True)


# ---- (3) kybernate.io/gpu-map with the GPUs swapped ----------------------------------------------------------
def test_3_gpu_map_swaps_the_two_gpus(env, results):
    """The container of (2), restored with kybernate.io/gpu-map: <uuid0>=<uuid1>,<uuid1>=<uuid0> and the
    same two devices: both go on with bytes intact, the worker that was on GPU 0 is on GPU 1 and the
    other way round, and the shim's placement line names it a remap with both pairs."""
    u0, u1 = two_gpus(env)
    out: dict = {}
    results["3_gpu_map_swapped"] = out
    images = scratch("kyb-2gpu-swap")
    try:
        c = GpusContainer(env, "swap", NBYTES, [0, 1], [0, 1]).start()
        before_gpus = out["gpus_before"] = gpu_of_workers(c, (u0, u1), NBYTES)
        assert set(before_gpus.values()) == {u0, u1}, f"the workers share a GPU: {before_gpus}"
        before = checkpoint_exit(c, images, out)
        swap = {GPU_MAP_ANNOTATION: f"{u0}={u1},{u1}={u0}"}
        out["annotation"] = swap[GPU_MAP_ANNOTATION]
        r = restore_from(env, images, "swap-restored", [0, 1], [0, 1], before, out, annotations=swap)
        out["gpus_after"] = gpu_of_workers(r, (u0, u1), NBYTES)
        other = {u0: u1, u1: u0}
        assert out["gpus_after"] == {i: other[u] for i, u in before_gpus.items()}, \
            f"not swapped: {before_gpus} -> {out['gpus_after']}"
        line = out["placement"]
        assert line.startswith("remap ("), f"a swapped gpu-map is not logged as a remap: {line}"
        assert f"{u0} -> {u1}" in line and f"{u1} -> {u0}" in line and "kybernate.io/gpu-map" in line, line
        r.remove()
    finally:
        shutil.rmtree(images, ignore_errors=True)
