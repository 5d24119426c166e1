"""GPU placement at restore (shim.gpu.placement) and containers on two GPUs, with the stand-in libcuda.

- The new container's spec names its GPUs in three forms (linux.devices /dev/nvidiaN, a CDI annotation,
  NVIDIA_VISIBLE_DEVICES; parsed by shim.runtime.gpu_request, tested in test_gpu_request.py); they are
  resolved to UUIDs of this node, paired in order with the GPUs the checkpoint recorded, and the
  restore is identity, remap (a gpu_map for the driver) or refused with FailedPrecondition before
  ``runc restore``.
- Two GPUs x two CUDA processes: suspended and resumed in parallel, each process's GPUs recorded, the
  rollback as for one GPU; restored in place (identity) and onto two other GPUs (remap: the stand-in
  checks that every checkpointed GPU is in the pairs and moves the process).
This proves the shim's decisions and wiring only; tests/gpu runs the identity and refusal paths on
the real driver.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from ttrpc.codes import Code
from ttrpc.errors import TTRPCError

from shim.checkpoint.layer import PlainLayer
from shim.gpu import lifecycle as gpu
from shim.gpu import records as gpu_records
from shim.gpu import placement as gp
from shim.task.process import State

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_gpu_lifecycle_helpers", HERE / "test_gpu_lifecycle.py")
lc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lc)
fake_libs, fake, procs = lc.fake_libs, lc.fake, lc.procs  # fixtures: the stand-in driver, live processes
Clock, FakeRuntime, checkpoint_request, loader, run = lc.Clock, lc.FakeRuntime, lc.checkpoint_request, lc.loader, lc.run

RUNNING, LOCKED, CHECKPOINTED = 0, 1, 2
H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"
FAKE_MODEL = "Fake GPU 80GB"  # what the stand-in's cuDeviceGetName reports


def fake_uuid(i: int) -> str:
    from cuda_bindings import format_uuid
    return format_uuid(f"fakegpu-uuid-{i:03d}".encode())


def uuid(i: int) -> str:
    return f"GPU-{i:08x}-1111-2222-3333-444455556666"


def write_gpus(root: Path, gpus: list[tuple[str, int, str, str]]) -> Path:
    """A /proc/driver/nvidia/gpus stand-in: (bus, minor, uuid, model) per GPU."""
    root.mkdir(parents=True, exist_ok=True)
    for bus, minor, u, model in gpus:
        (root / bus).mkdir()
        (root / bus / "information").write_text(
            f"Model: \t\t {model}\nIRQ:   \t\t 42\nGPU UUID: \t {u}\nVideo BIOS: \t ??.??.??.??.??\n"
            f"Bus Type: \t PCIe\nBus Location: \t {bus}\nDevice Minor: \t {minor}\nGPU Excluded:\t No\n")
    return root


def write_version(path: Path, release: str, open_module: bool = False) -> Path:
    kind = "NVIDIA UNIX Open Kernel Module for x86_64" if open_module else "NVIDIA UNIX x86_64 Kernel Module"
    path.write_text(f"NVRM version: {kind}  {release}  Release Build  (dvs-builder@U16)  Thu Oct  2 2025\n"
                    "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    return path


def host(n: int = 2, model: str = H100, release: str | None = "580.159.04", api: int | None = 13000,
         offset: int = 0) -> gp.HostGpus:
    return gp.HostGpus([gp.HostGpu(i, uuid(i + offset), model, i, f"0000:{i + 1:02x}:00.0") for i in range(n)],
                       release, api, "test")


def record(gpus: list[str], model: str = H100, release: str | None = "580.159.04", api: int = 13000) -> dict:
    return {"format": 1, "driver_version": api, "driver_release": release, "container_gpus": list(gpus),
            "container_gpus_source": "linux.devices", "gpu_models": {g: model for g in gpus},
            "processes": [{"pid": 10, "gpus": list(gpus), "gpus_source": "device-files"}]}


def devices_spec(*minors: int) -> dict:
    devs = [{"path": f"/dev/nvidia{m}", "type": "c", "major": 195, "minor": m} for m in minors]
    devs += [{"path": "/dev/nvidiactl", "type": "c", "major": 195, "minor": 255},
             {"path": "/dev/nvidia-uvm", "type": "c", "major": 507, "minor": 0}]
    return {"linux": {"devices": devs}}


def env_spec(value: str) -> dict:
    return {"process": {"env": ["PATH=/bin", f"NVIDIA_VISIBLE_DEVICES={value}"]}}


# ---- the GPUs a spec names: tests/unit/shim/test_gpu_request.py (shim.runtime.gpu_request) -------------
def test_resolve_indices_are_pci_order_and_minors_come_from_proc(tmp_path):
    # PCI order 01 < 41 < 81 gives indices 0, 1, 2; the driver numbered the minors differently
    gpus = write_gpus(tmp_path / "gpus", [("0000:81:00.0", 0, uuid(0x81), H100), ("0000:01:00.0", 2, uuid(1), H100),
                                          ("0000:41:00.0", 1, uuid(0x41), H100)])
    h = gp.host_gpus(None, gpus, write_version(tmp_path / "version", "580.159.04"))
    assert [g.uuid for g in h.gpus] == [uuid(1), uuid(0x41), uuid(0x81)]
    assert h.release == "580.159.04" and h.api_version is None
    assert gp.resolve(gp.gpu_request(env_spec("2,0")), h) == [uuid(0x81), uuid(1)]
    assert gp.resolve(gp.gpu_request(devices_spec(0, 2)), h) == [uuid(0x81), uuid(1)]
    assert gp.resolve(gp.gpu_request(env_spec(uuid(0x41).upper().replace("GPU-", "gpu-"))), h) == [uuid(0x41)]
    assert gp.resolve(gp.gpu_request(env_spec("all")), h) == [uuid(1), uuid(0x41), uuid(0x81)]
    assert gp.resolve(gp.gpu_request(env_spec("1,1")), h) == [uuid(0x41)]  # each once
    for value, words in (("3", "GPU index 3 does not exist here (3 GPU(s))"), (uuid(7), f"{uuid(7)} is no GPU"),
                         ("MIG-1", "MIG")):
        with pytest.raises(gp.PlacementError, match=words.replace("(", r"\(").replace(")", r"\)")):
            gp.resolve(gp.gpu_request(env_spec(value)), h)
    with pytest.raises(gp.PlacementError, match="minor 9"):
        gp.resolve(gp.gpu_request(devices_spec(9)), h)


def test_host_gpus_from_the_driver_where_proc_is_missing(fake, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKECUDA_DEVICES", "3")
    monkeypatch.setenv("FAKECUDA_MODEL", H100)
    h = gp.host_gpus(fake.driver(), tmp_path / "no-gpus", tmp_path / "no-version")
    assert [g.uuid for g in h.gpus] == [fake_uuid(i) for i in range(3)]
    assert {g.model for g in h.gpus} == {H100} and h.api_version == 13000 and h.release is None
    # without /proc, minor N is taken as the driver's device N
    assert gp.resolve(gp.gpu_request(devices_spec(2)), h) == [fake_uuid(2)]


def test_driver_release_of_both_kernel_modules(tmp_path):
    assert gp.driver_release(write_version(tmp_path / "a", "580.159.04")) == "580.159.04"
    assert gp.driver_release(write_version(tmp_path / "b", "570.86.10", open_module=True)) == "570.86.10"
    assert gp.driver_release(tmp_path / "missing") is None


# ---- the decision -------------------------------------------------------------------------------------
def test_identity_same_gpus_no_map_also_in_another_order():
    h = host(2)
    p = gp.decide("c1", record([uuid(0), uuid(1)]), gp.gpu_request(devices_spec(0, 1)), h)
    assert (p.decision, p.gpu_map, p.new) == ("identity", None, [uuid(0), uuid(1)])
    p = gp.decide("c1", record([uuid(0), uuid(1)]), gp.gpu_request(env_spec("1,0")), h)
    assert p.decision == "identity" and p.gpu_map is None  # the same GPUs: nothing to move


def test_remap_pairs_in_order_and_names_every_checkpointed_gpu():
    h = host(4)
    p = gp.decide("c1", record([uuid(0), uuid(1)]), gp.gpu_request(env_spec(f"{uuid(3)},2")), h)
    assert p.decision == "remap"
    assert p.gpu_map == {uuid(0): uuid(3), uuid(1): uuid(2)}
    # a partial overlap still maps every checkpointed GPU, the unchanged one included
    p = gp.decide("c1", record([uuid(0), uuid(1)]), gp.gpu_request(env_spec("0,2")), h)
    assert p.gpu_map == {uuid(0): uuid(0), uuid(1): uuid(2)}
    assert "remap" in p.summary() and f"{uuid(1)} -> {uuid(2)}" in p.summary()


def test_explicit_gpu_map_annotation_replaces_the_pairing_and_is_checked():
    h = host(4)
    req = gp.gpu_request(env_spec("2,3"))
    p = gp.decide("c1", record([uuid(0), uuid(1)]), req, h, {uuid(0): uuid(2), uuid(1): uuid(3)})
    assert p.gpu_map == {uuid(0): uuid(2), uuid(1): uuid(3)} and "kybernate.io/gpu-map" in p.notes[0]
    with pytest.raises(TTRPCError, match="names no target for checkpointed GPU"):
        gp.decide("c1", record([uuid(0), uuid(1)]), req, h, {uuid(0): uuid(2)})
    with pytest.raises(TTRPCError, match="maps onto .* which this container does not get"):
        gp.decide("c1", record([uuid(0), uuid(1)]), req, h, {uuid(0): uuid(2), uuid(1): uuid(0)})


def test_gpu_map_swapping_the_same_gpus_is_a_remap_with_the_pairs():
    """The same two GPUs, swapped by kybernate.io/gpu-map: a remap (the driver needs the pairs, else
    nothing moves), logged as one; a map onto themselves stays identity, and a swap on a driver without
    GPU pairs is refused like any remap."""
    req = gp.gpu_request(devices_spec(0, 1))
    swap = {uuid(0): uuid(1), uuid(1): uuid(0)}
    p = gp.decide("c1", record([uuid(0), uuid(1)]), req, host(2), swap)
    assert (p.decision, p.gpu_map, p.new) == ("remap", swap, [uuid(1), uuid(0)])
    assert p.summary().startswith(f"remap ({uuid(0)} -> {uuid(1)}, {uuid(1)} -> {uuid(0)}; target from linux.devices")
    assert "pairs from annotation kybernate.io/gpu-map" in p.summary()
    p = gp.decide("c1", record([uuid(0), uuid(1)]), req, host(2), {uuid(0): uuid(0), uuid(1): uuid(1)})
    assert (p.decision, p.gpu_map) == ("identity", None) and p.summary().startswith("identity (")
    with pytest.raises(TTRPCError, match="remapping them needs CUDA driver API 13.0"):
        gp.decide("c1", record([uuid(0), uuid(1)], api=12080), req, host(2, api=12080), swap)


def refusal(rec, request, h, explicit=None) -> str:
    with pytest.raises(TTRPCError) as info:
        gp.decide("c7", rec, request, h, explicit)
    assert info.value.code is Code.FAILED_PRECONDITION
    msg = info.value.message
    assert msg.startswith("restore container c7: GPU placement refused: ")
    for u in rec["container_gpus"]:  # both GPU sets, with models, and both driver versions are named
        assert u in msg
    assert "checkpointed on" in msg and "this container gets" in msg
    return msg


def test_refused_different_count():
    h = host(2)
    msg = refusal(record([uuid(0)]), gp.gpu_request(env_spec("0,1")), h)
    assert "1 GPU(s) at checkpoint, 2 now: the GPU count must be the same" in msg
    assert f"[{uuid(0)} ({H100}), {uuid(1)} ({H100})]" in msg and "env NVIDIA_VISIBLE_DEVICES=0,1" in msg
    assert "driver 580.159.04 (CUDA 13.0)" in msg


def test_refused_different_model():
    msg = refusal(record([uuid(0)], model=A100), gp.gpu_request(env_spec("1")), host(2, H100))
    assert f"GPU model {A100!r} at checkpoint, {H100!r} for {uuid(1)}" in msg
    assert f"{uuid(0)} ({A100})" in msg and f"{uuid(1)} ({H100})" in msg


@pytest.mark.parametrize("old, new, words", [
    ("580.159.04", "580.159.05", "a patch-level difference: still refused"),
    ("580.126.09", "580.159.04", "driver 580.126.09 at checkpoint, 580.159.04 here"),
    ("570.86.10", "580.159.04", "driver 570.86.10 at checkpoint, 580.159.04 here"),
])
def test_refused_other_driver_version_patch_level_included(old, new, words):
    msg = refusal(record([uuid(0)], release=old), gp.gpu_request(env_spec("0")), host(1, release=new))
    assert words in msg and f"driver {old} (CUDA 13.0)" in msg and f"driver {new} (CUDA 13.0)" in msg


def test_driver_api_versions_compared_where_the_kernel_module_version_is_unknown():
    msg = refusal(record([uuid(0)], release=None, api=12080), gp.gpu_request(env_spec("0")),
                  host(1, release=None, api=13000))
    assert "CUDA driver API 12.8 at checkpoint, 13.0 here" in msg
    p = gp.decide("c7", record([uuid(0)], release=None), gp.gpu_request(env_spec("0")), host(1, release=None))
    assert p.decision == "identity" and "compared the CUDA API versions only" in p.notes[0]


def test_refused_remap_on_a_driver_without_gpu_pairs():
    msg = refusal(record([uuid(0)], api=12080), gp.gpu_request(env_spec("1")), host(2, api=12080))
    assert "remapping them needs CUDA driver API 13.0 or newer" in msg and "this driver reports 12.8" in msg
    # the same old driver restores in place
    assert gp.decide("c7", record([uuid(0)], api=12080), gp.gpu_request(env_spec("0")), host(2, api=12080)).decision \
        == "identity"


def test_spec_naming_no_gpu_restores_in_place_or_is_refused():
    p = gp.decide("c7", record([uuid(1)]), None, host(2))
    assert p.decision == "identity" and p.target_source.startswith("the checkpoint")
    msg = refusal(record([uuid(5)]), None, host(2))
    assert "spec names no GPU and the checkpointed GPUs are not all on this node" in msg
    msg = refusal(record([uuid(0)]), gp.gpu_request(env_spec("void")), host(2))
    assert "1 GPU(s) at checkpoint, 0 now" in msg


def test_refused_gpu_not_on_this_node():
    msg = refusal(record([uuid(0)]), gp.gpu_request(env_spec(uuid(9))), host(2))
    assert f"cannot be resolved: {uuid(9)} is no GPU of this node" in msg


def test_old_records_fall_back_to_the_gpus_the_processes_held():
    old = {"driver_version": 13000, "visible_gpus": [uuid(0), uuid(1), uuid(2)],
           "processes": [{"gpus": [uuid(2)]}, {"gpus": [uuid(0), uuid(2)]}]}
    ck = gp.checkpointed(old)
    assert ck.gpus == [uuid(0), uuid(2)] and ck.models == {} and ck.release is None
    p = gp.decide("c1", old, gp.gpu_request(env_spec("1,0")), host(3))
    assert p.decision == "remap" and p.gpu_map == {uuid(0): uuid(1), uuid(2): uuid(0)}
    assert any("unknown: not compared" in n for n in p.notes)


def test_remap_constant_matches_cuda_bindings():
    from cuda_bindings.errors import GPU_REMAP_API_VERSION
    assert gp.GPU_REMAP_API_VERSION == GPU_REMAP_API_VERSION


# ---- two GPUs x two CUDA processes, with the stand-in driver ---------------------------------------------------
@pytest.fixture
def nodes(tmp_path):
    """/dev/nvidia0..3 stand-ins (character devices 195:N) for the processes to hold open."""
    dev = tmp_path / "dev"
    dev.mkdir()
    try:
        for m in range(4):
            os.mknod(dev / f"nvidia{m}", 0o666 | 0o020000, os.makedev(195, m))
    except PermissionError:
        pytest.skip("mknod needs root")
    return dev


@pytest.fixture
def node(tmp_path, monkeypatch):
    """This node as the shim sees it: 4 stand-in GPUs in /proc/driver/nvidia, driver 580.159.04."""
    monkeypatch.setenv("FAKECUDA_DEVICES", "4")
    gpus = write_gpus(tmp_path / "gpus", [(f"0000:{m + 1:02x}:00.0", m, fake_uuid(m), FAKE_MODEL) for m in range(4)])
    return gpus, write_version(tmp_path / "version", "580.159.04")


class Runtime(FakeRuntime):
    async def delete(self, cid, force=False):
        await self._op("delete")


def gpu_container(tmp_path, runtime, pids, fake, spec, node, cid="gpu2", state=State.RUNNING, image="",
                  proc: Path = Path("/proc")):
    from proto.containerd.runc.v1 import options_pb2
    from shim.task.container import Container
    from shim.task.io import StdioPaths
    from shim.task.process import InitProcess

    bundle = tmp_path / f"bundle-{cid}"
    bundle.mkdir(exist_ok=True)
    spec = {"ociVersion": "1.0.2", "annotations": {}, **spec}
    c = Container(cid, str(bundle), "default", runtime, None, spec, "", options_pb2.Options(), None)
    init = InitProcess(cid, cid, StdioPaths())
    init.current = lc.in_state(init, state, image)
    init.pid = os.getpid()
    c.init = init
    c.layer = gpu.GpuLayer(PlainLayer(), c.id, c.spec, gpu=gpu.ContainerGpu(cid, spec, lambda: list(pids), driver_loader=loader(fake), proc=proc,
                                        gpus_dir=node[0], version_file=node[1]))
    return c


def two_by_two(procs, fake, nodes, tmp_path) -> tuple[list[int], Path]:
    """Four CUDA processes: two on GPU 0, two on GPU 1; and a /proc in which each holds its
    /dev/nvidiaN open (a stand-in node cannot be opened without NVIDIA's kernel module, so fd/3 of
    the mirror links to it; maps, comm and cgroup are the real ones)."""
    pids = [procs.cuda_like(fake.path, None) for _ in range(4)]
    fake.set_states({p: RUNNING for p in pids}, devices={p: [i // 2] for i, p in enumerate(pids)})
    proc = tmp_path / "proc"
    for i, pid in enumerate(pids):
        (proc / str(pid) / "fd").mkdir(parents=True)
        for name in ("maps", "comm", "cgroup", "status"):
            (proc / str(pid) / name).symlink_to(f"/proc/{pid}/{name}")
        (proc / str(pid) / "fd" / "3").symlink_to(nodes / f"nvidia{i // 2}")
    return pids, proc


def test_two_gpus_two_processes_each_suspended_in_parallel_and_recorded(fake, procs, nodes, node, tmp_path):
    pids, proc = two_by_two(procs, fake, nodes, tmp_path)
    fake.script(*(f"sleep checkpoint {p} 150" for p in pids))
    runtime = FakeRuntime(Clock())
    during = {}
    runtime.on_checkpoint = lambda args: during.update(fake.states())
    image = tmp_path / "image"

    async def go():
        c = gpu_container(tmp_path, runtime, pids, fake, devices_spec(0, 1), node, proc=proc)
        await c.checkpoint(checkpoint_request(image))

    run(go)
    assert {p: during[p] for p in pids} == {p: CHECKPOINTED for p in pids}
    assert fake.states() == {p: RUNNING for p in pids}
    ckpts = fake.log("checkpoint")
    assert len(ckpts) == 4 and max(l.t0_ns for l in ckpts) < min(l.t1_ns for l in ckpts), "not in parallel"
    rec = json.loads((image / gpu_records.RECORD_NAME).read_text())
    assert rec["container_gpus"] == [fake_uuid(0), fake_uuid(1)] and rec["container_gpus_source"] == "linux.devices"
    assert rec["gpu_count"] == 2 and rec["driver_release"] == "580.159.04" and rec["driver_version"] == 13000
    assert rec["gpu_models"] == {fake_uuid(0): FAKE_MODEL, fake_uuid(1): FAKE_MODEL}
    by_pid = {p["pid"]: p for p in rec["processes"]}
    for i, p in enumerate(pids):
        assert by_pid[p]["gpus"] == [fake_uuid(i // 2)] and by_pid[p]["gpus_source"] == "device-files"
    assert rec["gpus"] == [fake_uuid(0), fake_uuid(1)]
    assert rec["libcuda"] == fake.path


def test_two_gpus_one_failure_puts_all_four_back(fake, procs, nodes, node, tmp_path):
    pids, proc = two_by_two(procs, fake, nodes, tmp_path)
    fake.script(f"fail checkpoint {pids[3]} 999", *(f"sleep checkpoint {p} 50" for p in pids[:3]))
    runtime = FakeRuntime(Clock())

    async def go():
        c = gpu_container(tmp_path, runtime, pids, fake, devices_spec(0, 1), node, proc=proc)
        await c.checkpoint(checkpoint_request(tmp_path / "image"))

    with pytest.raises(TTRPCError) as info:
        run(go)
    assert info.value.code is Code.FAILED_PRECONDITION and f"pid {pids[3]}" in info.value.message
    assert runtime.calls == [] and fake.states() == {p: RUNNING for p in pids}
    assert all(fake.calls(p)[-1] == "unlock" for p in pids if fake.calls(p))
    assert not (tmp_path / "image" / gpu_records.RECORD_NAME).exists()


def checkpoint_with_exit(fake, procs, nodes, node, tmp_path) -> tuple[list[int], Path]:
    """Two GPUs x two processes checkpointed with exit: they stay CHECKPOINTED, the image records them."""
    pids, proc = two_by_two(procs, fake, nodes, tmp_path)
    image = tmp_path / "image"

    async def go():
        c = gpu_container(tmp_path, FakeRuntime(Clock()), pids, fake, devices_spec(0, 1), node, cid="old", proc=proc)
        await c.checkpoint(checkpoint_request(image, exit=True))

    run(go)
    assert fake.states() == {p: CHECKPOINTED for p in pids}
    fake.clear_log()
    return pids, image


def test_two_gpus_identity_restore_resumes_all_without_a_map(fake, procs, nodes, node, tmp_path):
    pids, image = checkpoint_with_exit(fake, procs, nodes, node, tmp_path)
    runtime = Runtime(Clock())

    async def go():
        c = gpu_container(tmp_path, runtime, pids, fake, env_spec("0,1"), node, state=State.CREATED_CHECKPOINT,
                          image=str(image))
        await c.layer.before_restore(c.handle, c.init.current.image_dir)
        placement = c.layer.gpu.placement
        await c.layer.after_restore(c.handle, c.init.current.image_dir)
        return placement

    placement = run(go)
    assert placement.decision == "identity" and placement.gpu_map is None
    assert [l.detail for l in fake.log("restore")] == ["args=null"] * 4
    assert fake.states() == {p: RUNNING for p in pids}
    assert fake.devices() == {p: [i // 2] for i, p in enumerate(pids)}
    assert runtime.calls == []


def test_two_gpus_remap_restore_passes_the_map_to_every_process(fake, procs, nodes, node, tmp_path):
    pids, image = checkpoint_with_exit(fake, procs, nodes, node, tmp_path)
    runtime = Runtime(Clock())

    async def go():
        c = gpu_container(tmp_path, runtime, pids, fake, {"annotations": {
            "cdi.k8s.io/gpus": f"nvidia.com/gpu=3,nvidia.com/gpu={fake_uuid(2)}"}}, node,
            state=State.CREATED_CHECKPOINT, image=str(image))
        await c.layer.before_restore(c.handle, c.init.current.image_dir)
        placement = c.layer.gpu.placement
        await c.layer.after_restore(c.handle, c.init.current.image_dir)
        return placement

    placement = run(go)
    assert placement.decision == "remap"
    assert placement.gpu_map == {fake_uuid(0): fake_uuid(3), fake_uuid(1): fake_uuid(2)}
    hexes = lambda i: f"fakegpu-uuid-{i:03d}".encode().hex()  # noqa: E731
    want = f"pairs=2 {hexes(0)}>{hexes(3)},{hexes(1)}>{hexes(2)}"
    assert sorted(l.pid for l in fake.log("restore")) == sorted(pids)
    assert {l.detail for l in fake.log("restore")} == {want}
    # the stand-in moved each process to its new GPU (it checks every checkpointed GPU is in the pairs)
    assert fake.devices() == {pids[0]: [3], pids[1]: [3], pids[2]: [2], pids[3]: [2]}
    assert fake.states() == {p: RUNNING for p in pids}


def test_stand_in_refuses_pairs_that_miss_a_checkpointed_gpu(fake, procs, monkeypatch):
    """The stand-in's rule behind the remap test: without every checkpointed GPU the restore fails."""
    from cuda_bindings import CudaError
    monkeypatch.setenv("FAKECUDA_DEVICES", "4")
    pid = procs.cuda_like(fake.path, None)
    fake.set_states({pid: CHECKPOINTED}, devices={pid: [0, 1]})
    drv = fake.driver()
    with pytest.raises(CudaError, match="CUDA_ERROR_INVALID_VALUE"):
        drv.restore(pid, {fake_uuid(0): fake_uuid(2)})
    drv.restore(pid, {fake_uuid(0): fake_uuid(2), fake_uuid(1): fake_uuid(3)})
    assert fake.devices() == {pid: [2, 3]} and fake.states() == {pid: LOCKED}


# ---- refused before runc restore, through lifecycle.restore -------------------------------------------------------
def doctored(image: Path, change) -> Path:
    path = image / gpu_records.RECORD_NAME
    rec = json.loads(path.read_text())
    change(rec)
    path.write_text(json.dumps(rec))
    return path


@pytest.mark.parametrize("change, spec, words", [
    (lambda r: r["container_gpus"].append("GPU-00000000-0000-0000-0000-00000000beef"), env_spec("0,1"),
     "3 GPU(s) at checkpoint, 2 now"),
    (lambda r: r["gpu_models"].update({k: A100 for k in r["gpu_models"]}), env_spec("0,1"),
     f"GPU model {A100!r} at checkpoint, {FAKE_MODEL!r}"),
    (lambda r: r.update(driver_release="580.159.05"), env_spec("0,1"), "a patch-level difference"),
    (lambda r: None, env_spec("0"), "2 GPU(s) at checkpoint, 1 now"),
])
def test_lifecycle_restore_refuses_before_runc_restore(fake, procs, nodes, node, tmp_path, change, spec, words):
    pids, image = checkpoint_with_exit(fake, procs, nodes, node, tmp_path)
    doctored(image, change)
    runtime = Runtime(Clock())

    async def go():
        c = gpu_container(tmp_path, runtime, pids, fake, spec, node, cid="new", state=State.CREATED_CHECKPOINT,
                          image=str(image))
        try:
            await c.start("")
        finally:
            state = c.init.state
        return state

    with pytest.raises(TTRPCError) as info:
        run(go)
    err = info.value
    assert err.code is Code.FAILED_PRECONDITION and "restore container new: GPU placement refused" in err.message
    assert words in err.message and fake_uuid(0) in err.message and "580.159.04" in err.message
    assert "restore" not in runtime.calls and runtime.calls == ["delete"]  # runc restore never ran
    assert fake.log("restore") == [] and fake.states() == {p: CHECKPOINTED for p in pids}


def test_remap_on_a_driver_without_gpu_pairs_is_refused_before_runc(fake, procs, nodes, node, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKECUDA_VERSION", "12080")
    pids, image = checkpoint_with_exit(fake, procs, nodes, node, tmp_path)
    runtime = Runtime(Clock())

    async def go():
        c = gpu_container(tmp_path, runtime, pids, fake, env_spec("2,3"), node, cid="new",
                          state=State.CREATED_CHECKPOINT, image=str(image))
        await c.start("")

    with pytest.raises(TTRPCError) as info:
        run(go)
    assert info.value.code is Code.FAILED_PRECONDITION
    assert "remapping them needs CUDA driver API 13.0 or newer" in info.value.message
    assert runtime.calls == ["delete"] and fake.log("restore") == []


def test_no_driver_here_refuses_a_gpu_restore(fake, procs, nodes, node, tmp_path):
    pids, image = checkpoint_with_exit(fake, procs, nodes, node, tmp_path)
    from cuda_bindings import DriverMissing

    def no_driver(hint_pids=()):
        raise DriverMissing("libcuda.so.1", "not found")

    async def go():
        c = gpu_container(tmp_path, Runtime(Clock()), pids, fake, env_spec("0,1"), node, cid="new",
                          state=State.CREATED_CHECKPOINT, image=str(image))
        c.layer.gpu._load = no_driver
        await c.layer.before_restore(c.handle, c.init.current.image_dir)

    with pytest.raises(TTRPCError) as info:
        run(go)
    assert info.value.code is Code.FAILED_PRECONDITION
    assert "the checkpoint holds 4 CUDA process(es)" in info.value.message and "not found" in info.value.message


def test_a_cpu_image_loads_no_driver_before_restore(tmp_path, node):
    image = tmp_path / "cpu-image"
    image.mkdir()

    async def go():
        g = gpu.ContainerGpu("cpu", {}, lambda: [], driver_loader=lc.refusing_loader, gpus_dir=node[0])
        return await g.plan_restore(str(image)), g.placement

    assert run(go) == (None, None)


def test_a_libcuda_named_by_the_record_is_never_loaded(fake, procs, nodes, node, tmp_path, monkeypatch):
    """kybernate-gpu.json comes from a checkpoint image (untrusted): the libcuda path it records is
    information, never a library the shim loads."""
    from shim.gpu import driver as gpu_driver

    pids, image = checkpoint_with_exit(fake, procs, nodes, node, tmp_path)
    record = json.loads((image / gpu_records.RECORD_NAME).read_text())
    record["libcuda"] = fake.path
    (image / gpu_records.RECORD_NAME).write_text(json.dumps(record))
    monkeypatch.setattr(gpu_driver, "WELL_KNOWN_DIRS", (str(tmp_path / "none"),))
    monkeypatch.delenv("KYBERNATE_LIBCUDA", raising=False)
    loader = gpu_driver.DriverLoader()

    async def go():
        g = gpu.ContainerGpu("new", env_spec("0,1"), lambda: [], driver_loader=loader, gpus_dir=node[0])
        await g.plan_restore(str(image))

    with pytest.raises(TTRPCError) as info:
        run(go)
    assert info.value.code is Code.FAILED_PRECONDITION and "cannot use the CUDA driver" in info.value.message
    assert not loader.loaded


def test_a_gpu_record_that_is_a_link_is_refused(tmp_path, node):
    image = tmp_path / "image"
    image.mkdir()
    (tmp_path / "elsewhere.json").write_text('{"processes": [{"pid": 1}]}')
    (image / gpu_records.RECORD_NAME).symlink_to(tmp_path / "elsewhere.json")

    async def go():
        g = gpu.ContainerGpu("new", {}, lambda: [], driver_loader=lc.refusing_loader, gpus_dir=node[0])
        await g.plan_restore(str(image))

    with pytest.raises(TTRPCError) as info:
        run(go)
    assert info.value.code is Code.FAILED_PRECONDITION and "regular file" in info.value.message


def test_processes_without_device_files_are_recorded_on_the_containers_gpus(fake, procs, node, tmp_path):
    """Where /proc shows no /dev/nvidiaN held open, a process's GPUs are its container's (from the spec),
    not every GPU of the node."""
    pids = [procs.cuda_like(fake.path, None) for _ in range(2)]
    fake.set_states({p: RUNNING for p in pids})
    image = tmp_path / "image"

    async def go():
        c = gpu_container(tmp_path, FakeRuntime(Clock()), pids, fake, env_spec(f"{fake_uuid(3)},1"), node)
        await c.checkpoint(checkpoint_request(image))

    run(go)
    rec = json.loads((image / gpu_records.RECORD_NAME).read_text())
    assert rec["container_gpus"] == [fake_uuid(3), fake_uuid(1)]
    assert rec["visible_gpus"] == [fake_uuid(i) for i in range(4)]
    assert [(p["gpus"], p["gpus_source"]) for p in rec["processes"]] == [([fake_uuid(3), fake_uuid(1)], "container-spec")] * 2
    assert sorted(rec["gpu_models"]) == sorted([fake_uuid(3), fake_uuid(1)]) and rec["gpu_count"] == 2
