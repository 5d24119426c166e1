"""Which GPUs a restored container gets, and whether its checkpointed CUDA processes can go there.

The GPUs of a restored container come from the new container's spec, not from the image: the
device nodes in ``linux.devices`` (/dev/nvidiaN, by their minor number), a CDI annotation
(``cdi.k8s.io/*: nvidia.com/gpu=N|UUID|all``), or ``NVIDIA_VISIBLE_DEVICES`` in the process env
(indices, GPU-UUIDs, ``all``), first found in that order (`shim.runtime.gpu_request`, the parser the
runtime choice uses too). The checkpointed GPUs come from
``kybernate-gpu.json`` (written by shim.gpu.lifecycle at checkpoint). The old GPUs are paired with the new ones
in order, and the restore is:

- identity: the same GPUs (as a set): the driver restores without a GPU map; but a
  ``kybernate.io/gpu-map`` that moves any GPU (a swap of the same GPUs included) is a remap;
- remap: other GPUs of the same count and model, on a driver whose restore takes GPU pairs (CUDA
  driver API 13.0 or newer): every checkpointed GPU is passed in the map (the driver wants them all);
- refused, before ``runc restore`` creates anything (FailedPrecondition naming both GPU sets, the
  models and the driver versions): another GPU count, another model, another driver version, GPUs
  this node does not have, or a remap on a driver without GPU pairs.

Driver versions must match exactly, a patch-level difference included (580.159.04 vs 580.159.05 is
refused): the restored processes carry the user-space driver they were started with (the
libcuda.so.<version> files the container mounts are restored by path), and NVIDIA's kernel module
serves only clients of its own full version ("API mismatch"). Where the kernel module's version is
unknown on either side, the CUDA driver API versions (cuDriverGetVersion) are compared instead.

Indices are NVML's (nvidia-smi's): PCI bus order, read from /proc/driver/nvidia/gpus; where that is
missing, the driver's own order (CUDA's default order equals PCI order for GPUs of one model).
Nothing here loads the driver: the caller passes one (or none) to `host_gpus`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

from ttrpc.codes import Code
from ttrpc.errors import TTRPCError

from shim.runtime.gpu_request import GpuRequest, gpu_request

NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")
NVIDIA_VERSION = Path("/proc/driver/nvidia/version")
GPU_REMAP_API_VERSION = 13000  # = cuda_bindings.errors.GPU_REMAP_API_VERSION (not imported: no cffi here)
_RELEASE = re.compile(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)(?:\s|$)")


class PlacementError(ValueError):
    """A GPU the spec names cannot be resolved on this node."""


def canon_uuid(value: str) -> str:
    """'GPU-ABC...' / 'gpu-abc...' / 'abc...' -> 'GPU-abc...' (nvidia-smi's form, lower-case hex)."""
    text = str(value).strip()
    if text[:4].upper() == "GPU-":
        text = text[4:]
    return "GPU-" + text.lower()


def _api(version: Optional[int]) -> str:
    if not version:
        return "unknown"
    return f"{version // 1000}.{(version % 1000) // 10}"


# ---- this node's GPUs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostGpu:
    index: int  # NVML's (nvidia-smi's) index
    uuid: str
    model: str = ""
    minor: Optional[int] = None
    bus: str = ""


@dataclass
class HostGpus:
    gpus: list[HostGpu]
    release: Optional[str] = None  # the kernel module's version, "580.159.04"
    api_version: Optional[int] = None  # cuDriverGetVersion, 13000
    source: str = ""  # where the list came from

    def by_uuid(self, uuid: str) -> Optional[HostGpu]:
        want = canon_uuid(uuid)
        return next((g for g in self.gpus if canon_uuid(g.uuid) == want), None)

    def by_index(self, index: int) -> Optional[HostGpu]:
        return next((g for g in self.gpus if g.index == index), None)

    def by_minor(self, minor: int) -> Optional[HostGpu]:
        if any(g.minor is not None for g in self.gpus):
            return next((g for g in self.gpus if g.minor == minor), None)
        return self.by_index(minor)  # no /proc/driver/nvidia: minor N taken as the driver's device N

    def model_of(self, uuid: str) -> str:
        g = self.by_uuid(uuid)
        return g.model if g else ""


def read_proc_gpus(gpus_dir: Path = NVIDIA_GPUS) -> list[dict]:
    """/proc/driver/nvidia/gpus/<bus>/information of each GPU: uuid, model, minor, bus; PCI order."""
    out = []
    try:
        entries = sorted(gpus_dir.iterdir(), key=lambda e: e.name.lower())
    except OSError:
        return out
    for entry in entries:
        try:
            text = (entry / "information").read_text()
        except OSError:
            continue
        fields = {}
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        uuid = fields.get("GPU UUID", "")
        if not uuid.upper().startswith("GPU-"):
            continue
        try:
            minor = int(fields["Device Minor"])
        except (KeyError, ValueError):
            minor = None
        out.append({"uuid": canon_uuid(uuid), "model": fields.get("Model", ""), "minor": minor,
                    "bus": fields.get("Bus Location", entry.name)})
    return out


def driver_release(version_file: Path = NVIDIA_VERSION) -> Optional[str]:
    """The NVIDIA kernel module's version ('580.159.04') from /proc/driver/nvidia/version, or None."""
    try:
        text = version_file.read_text()
    except OSError:
        return None
    m = _RELEASE.search(text)
    return m.group(1) if m else None


def host_gpus(driver=None, gpus_dir: Path = NVIDIA_GPUS, version_file: Path = NVIDIA_VERSION) -> HostGpus:
    """This node's GPUs in NVML index order, with model, minor and the driver versions.

    /proc/driver/nvidia where present (UUID, model, minor, PCI order); the driver (a CudaDriver) adds
    the CUDA API version and, where /proc is missing, the list itself. Blocking: call in a thread."""
    api = None
    from_driver: list[tuple[str, str]] = []
    if driver is not None:
        api = driver.driver_version()
        try:
            from_driver = [(canon_uuid(u), n) for u, n in driver.devices()]
        except Exception:  # noqa: BLE001 - device names are a nicety; UUIDs alone still do
            from_driver = [(canon_uuid(u), "") for u in driver.device_uuids()]
    names = dict(from_driver)
    proc = read_proc_gpus(gpus_dir)
    if proc:
        gpus = [HostGpu(i, p["uuid"], p["model"] or names.get(p["uuid"], ""), p["minor"], p["bus"])
                for i, p in enumerate(proc)]
        source = str(gpus_dir)
    else:
        gpus = [HostGpu(i, u, n) for i, (u, n) in enumerate(from_driver)]
        source = "the CUDA driver's device order"
    return HostGpus(gpus, driver_release(version_file), api, source)


# ---- the GPUs a spec asks for: shim.runtime.gpu_request (GpuRequest, gpu_request) ---------------------


def resolve(request: GpuRequest, host: HostGpus) -> list[str]:
    """The request's GPUs as UUIDs of this node, in the spec's order, each once; PlacementError for
    one this node does not have (or a MIG device: not checkpointable)."""
    out: list[str] = []
    for kind, value in request.items:
        if kind == "all":
            found = [g.uuid for g in host.gpus]
        elif kind == "mig":
            raise PlacementError(f"{value} is a MIG device: CUDA checkpoint/restore does not support MIG")
        elif kind == "index":
            g = host.by_index(int(value))
            if g is None:
                raise PlacementError(f"GPU index {value} does not exist here ({len(host.gpus)} GPU(s))")
            found = [g.uuid]
        elif kind == "minor":
            g = host.by_minor(int(value))
            if g is None:
                raise PlacementError(f"/dev/nvidia{value} (minor {value}) is no GPU of this node")
            found = [g.uuid]
        else:
            g = host.by_uuid(value)
            if g is None:
                raise PlacementError(f"{value} is no GPU of this node")
            found = [g.uuid]
        out += [u for u in found if u not in out]
    return out


def container_gpus(spec: Mapping, host: HostGpus) -> tuple[list[str], str]:
    """(UUIDs, source) of the GPUs the spec gives; ([], why) where it names none or cannot be resolved."""
    request = gpu_request(spec)
    if request is None:
        return [], "the spec names no GPU"
    try:
        return resolve(request, host), request.source
    except PlacementError as exc:
        return [], f"{request.source}: {exc}"


# ---- what the checkpoint recorded ------------------------------------------------------------------
@dataclass
class Checkpointed:
    gpus: list[str]
    source: str
    models: dict
    release: Optional[str]
    api_version: Optional[int]


def checkpointed(record: Mapping) -> Checkpointed:
    """The checkpointed container's GPUs, in its order: `container_gpus` (its spec's, resolved at
    checkpoint), else the GPUs its processes held (per process, in `visible_gpus` order)."""
    models = {canon_uuid(k): str(v) for k, v in (record.get("gpu_models") or {}).items()}
    api = record.get("driver_version") if isinstance(record.get("driver_version"), int) else None
    release = record.get("driver_release") or None
    gpus = [canon_uuid(u) for u in record.get("container_gpus") or []]
    if gpus:
        return Checkpointed(gpus, str(record.get("container_gpus_source") or "container_gpus"), models,
                            release, api)
    used: list[str] = []
    for p in record.get("processes") or []:
        used += [canon_uuid(u) for u in p.get("gpus") or [] if canon_uuid(u) not in used]
    order = [canon_uuid(u) for u in record.get("visible_gpus") or []]
    used.sort(key=lambda u: order.index(u) if u in order else len(order))
    return Checkpointed(used, "the GPUs its processes held", models, release, api)


# ---- the decision ---------------------------------------------------------------------------------
@dataclass
class Placement:
    decision: str  # "identity" or "remap"
    old: list[str]
    new: list[str]
    gpu_map: Optional[dict]  # None for identity
    target_source: str
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        pairs = ", ".join(f"{o} -> {n}" for o, n in zip(self.old, self.new))
        extra = f"; {'; '.join(self.notes)}" if self.notes else ""
        return f"{self.decision} ({pairs}; target from {self.target_source}){extra}"


def _gpu_list(uuids: Sequence[str], models: Mapping[str, str]) -> str:
    return "[" + ", ".join(f"{u} ({models.get(u) or 'model unknown'})" for u in uuids) + "]"


def decide(container_id: str, record: Mapping, request: Optional[GpuRequest], host: HostGpus,
           explicit_map: Optional[Mapping[str, str]] = None) -> Placement:
    """Identity or remap for a restore of `record`'s GPUs onto those `request` names on `host`;
    TTRPCError(FAILED_PRECONDITION) for a restore that cannot work, naming both GPU sets, the models
    and the driver versions. explicit_map: the kybernate.io/gpu-map annotation (it replaces the
    in-order pairing; the same checks apply)."""
    ck = checkpointed(record)
    host_models = {g.uuid: g.model for g in host.gpus}
    target: list[str] = []
    target_source = request.source if request is not None else "the checkpointed GPUs: the spec names none"
    problem = ""
    if request is not None:
        try:
            target = resolve(request, host)
        except PlacementError as exc:
            problem = f"the new container's GPUs cannot be resolved: {exc}"
    elif explicit_map:  # the operator names the targets; all this node can check is that they exist
        target = [g.uuid for g in host.gpus]
        target_source = "this node's GPUs (the spec names none; annotation kybernate.io/gpu-map)"
    elif all(host.by_uuid(u) for u in ck.gpus):
        target = list(ck.gpus)
    else:
        problem = ("the new container's spec names no GPU and the checkpointed GPUs are not all on this node "
                   "(name the target GPUs in the spec)")

    def refuse(why: str) -> TTRPCError:
        old_driver = f"driver {ck.release or 'version unknown'} (CUDA {_api(ck.api_version)})"
        new_driver = f"driver {host.release or 'version unknown'} (CUDA {_api(host.api_version)})"
        return TTRPCError(Code.FAILED_PRECONDITION,
                          f"restore container {container_id}: GPU placement refused: {why}; checkpointed on "
                          f"{len(ck.gpus)} GPU(s) {_gpu_list(ck.gpus, ck.models)} with {old_driver}; this "
                          f"container gets {len(target)} GPU(s) {_gpu_list(target, host_models)} "
                          f"({target_source}) with {new_driver}")

    if problem:
        raise refuse(problem)
    notes: list[str] = []
    # driver: the exact version (see the module's doc), else the CUDA API version
    if ck.release and host.release:
        if ck.release != host.release:
            same_branch = ck.release.split(".")[:2] == host.release.split(".")[:2]
            raise refuse(f"driver {ck.release} at checkpoint, {host.release} here"
                         + (" (a patch-level difference: still refused, " if same_branch else " (")
                         + "the restored processes carry the user-space driver of their checkpoint and the "
                           "kernel module serves only its own exact version)")
    elif ck.api_version and host.api_version and ck.api_version != host.api_version:
        raise refuse(f"CUDA driver API {_api(ck.api_version)} at checkpoint, {_api(host.api_version)} here")
    elif not (ck.release and host.release):
        notes.append("kernel module version not known on both sides: compared the CUDA API versions only")
    if not ck.gpus:
        raise refuse("kybernate-gpu.json names no GPU for the checkpointed CUDA processes")
    if explicit_map:
        given = {canon_uuid(k): canon_uuid(v) for k, v in explicit_map.items()}
        missing = [u for u in ck.gpus if u not in given]
        if missing:
            raise refuse(f"annotation kybernate.io/gpu-map names no target for checkpointed GPU(s) {missing} "
                         "(the driver wants every checkpointed GPU in the map)")
        new = [given[u] for u in ck.gpus]
        foreign = [u for u in new if u not in target]
        if foreign:
            raise refuse(f"annotation kybernate.io/gpu-map maps onto {foreign}, which this container does not get")
        notes.append("pairs from annotation kybernate.io/gpu-map")
    else:
        if len(target) != len(ck.gpus):
            raise refuse(f"{len(ck.gpus)} GPU(s) at checkpoint, {len(target)} now: the GPU count must be the same")
        new = list(target)
    for old_uuid, new_uuid in zip(ck.gpus, new):
        old_model, new_model = ck.models.get(old_uuid, ""), host_models.get(new_uuid, "")
        if old_model and new_model and old_model != new_model:
            raise refuse(f"GPU model {old_model!r} at checkpoint, {new_model!r} for {new_uuid}: the driver restores "
                         "only onto the same kind of GPU")
        if not old_model or not new_model:
            notes.append(f"model of {old_uuid if not old_model else new_uuid} unknown: not compared")
    # The same GPUs with no pair asked to move: identity. A kybernate.io/gpu-map that moves a process to
    # another of the same GPUs (a swap) is a remap: the driver must get the pairs, or nothing moves.
    moved = explicit_map and any(o != n for o, n in zip(ck.gpus, new))
    if set(new) == set(ck.gpus) and not moved:
        return Placement("identity", ck.gpus, new, None, target_source, notes)
    if not host.api_version or host.api_version < GPU_REMAP_API_VERSION:
        raise refuse(f"the GPUs differ, and remapping them needs CUDA driver API {_api(GPU_REMAP_API_VERSION)} or "
                     f"newer (CUcheckpointRestoreArgs.gpuPairs); this driver reports {_api(host.api_version)}")
    return Placement("remap", ck.gpus, new, dict(zip(ck.gpus, new)), target_source, notes)


def record_fields(spec: Mapping, host: HostGpus, used: Sequence[str] = ()) -> dict:
    """What shim.gpu.lifecycle adds to kybernate-gpu.json at checkpoint for a later placement decision."""
    gpus, source = container_gpus(spec, host)
    used = {canon_uuid(u) for u in used}
    models = {g.uuid: g.model for g in host.gpus if g.model and (g.uuid in gpus or g.uuid in used)}
    return {"container_gpus": gpus, "container_gpus_source": source, "gpu_count": len(gpus) or len(used),
            "gpu_models": models, "driver_release": host.release}

