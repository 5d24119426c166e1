"""Which NVIDIA GPUs an OCI spec asks for, and where it says so: the one parser of GPU requests.

Read by the runtime choice (`shim.runtime.select`: which binary, and whether the container has GPUs
at all) and by the GPU layer (`shim.gpu.placement`: which GPUs a restored container lands on). It
only reads the spec; it imports nothing of ours, so both may use it without a circle.

A spec names GPUs in three places, each a different trust and a different path to the devices:

- ``linux.devices`` (`Origin.SPEC_DEVICES`): the device nodes are already in the spec. containerd put
  them there: applying a CDI spec (containerd 1.7 with ``enable_cdi``, 2.x by default; the default of
  current NVIDIA GPU Operator releases), or from a device plugin's DeviceSpecs. runc creates them;
  nothing needs injecting. Comes from the node (kubelet and containerd), so it is trusted.
- ``cdi.k8s.io/*`` annotations (`Origin.CDI_ANNOTATION`) naming ``nvidia.com/gpu=...`` (or ``mig``):
  CDI devices that nobody has applied yet (when containerd applies them, the nodes are in
  ``linux.devices`` and that wins). Someone must inject them: containerd's CDI support, or
  nvidia-container-runtime in CDI mode.
- ``NVIDIA_VISIBLE_DEVICES`` in ``process.env`` (`Origin.VISIBLE_DEVICES_ENV`): the device plugin's
  env mode writes it, but so can any image (every CUDA base image carries ``=all``) and any pod
  author; the shim cannot tell them apart, so it grants nothing unless the node's config says so.
  ``void``, ``none`` or empty: explicitly no GPU (a request with no items).

First found in that order is *the* request (`gpu_request`): the device nodes the container really
gets beat an annotation that may not be applied yet, which beats an env value.

NVIDIA device nodes in ``linux.devices``, and why they count as they do:

- ``/dev/nvidiaN`` (character major 195, minor N < 254): one GPU each, item ``("minor", N)``. A node
  given with its numbers counts by the numbers whatever its path (``/dev/gpu0`` 195:0 is GPU minor 0;
  a ``/dev/nvidia3`` with numbers of another major is not a GPU); a path without numbers counts by
  its digits.
- ``/dev/nvidiactl`` (195:255), ``/dev/nvidia-modeset`` (195:254), ``/dev/nvidia-uvm``,
  ``/dev/nvidia-uvm-tools``, ``/dev/nvidia-nvswitch*``, ``/dev/nvidia-nvlink``,
  ``/dev/nvidia-caps-imex-channels/*``: the driver's control nodes (`GpuRequest.control`). Every GPU
  container needs them, but they give no GPU by themselves (CUDA sees no device without a
  ``/dev/nvidiaN``; some setups hand them to every container), so alone they are no GPU request.
- ``/dev/nvidia-caps/nvidia-capN``, N >= 3: the access capability of one MIG GPU or compute
  instance (the driver's ``/proc/driver/nvidia-caps/mig-minors`` names them ``gpuG/giI[/ciC]/access``).
  CUDA on a GPU in MIG mode runs only inside such an instance, never on the whole GPU: so a spec
  carrying one with a ``/dev/nvidiaN`` is a MIG request (items ``("mig", "/dev/nvidia-caps/nvidia-capN")``;
  the parent GPU's node stays in `GpuRequest.devices`). That is a GPU container, but not one the CUDA
  checkpoint API can checkpoint or place (`shim.gpu.placement` refuses MIG). Same for
  ``nvidia.com/mig=...`` CDI names and ``MIG-...`` or ``G:I`` (``0:1``) values in the env or CDI names.
- ``/dev/nvidia-caps/nvidia-cap1`` and ``nvidia-cap2``: the node-wide ``mig/config`` and
  ``mig/monitor`` capabilities (the driver reserves those two minors). They let a tool manage or
  watch MIG, they are no MIG instance: control nodes, as above. Any capability without a
  ``/dev/nvidiaN`` gives nothing.

Items are ``(kind, value)`` in the spec's order: kind ``minor`` (a /dev/nvidiaN minor), ``index``
(nvidia-smi's index), ``uuid`` (``GPU-...``), ``all``, or ``mig``.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Mapping, Optional

VISIBLE_ENV = "NVIDIA_VISIBLE_DEVICES"
CDI_PREFIX = "cdi.k8s.io/"
NVIDIA_MAJOR = 195
NVIDIA_CONTROL_MINORS = frozenset({254, 255})  # nvidia-modeset, nvidiactl
NO_GPU_VALUES = frozenset({"", "void", "none"})
MIG_CAPS_DIR = "/dev/nvidia-caps/"
MAX_DESCRIBED_CHARS = 200
MIG_NODE_WIDE_CAPS = frozenset({1, 2})  # nvidia-cap1 = mig/config, nvidia-cap2 = mig/monitor (fixed by the driver)
_GPU_PATH = re.compile(r"^/dev/nvidia(\d+)$")
_CAP_PATH = re.compile(r"^/dev/nvidia-caps/nvidia-cap(\d+)$")


class Origin(enum.Enum):
    """Where a request came from (see the module's doc for what each means)."""

    SPEC_DEVICES = "linux.devices"
    CDI_ANNOTATION = "CDI annotation"
    VISIBLE_DEVICES_ENV = "env " + VISIBLE_ENV


@dataclass(frozen=True)
class GpuRequest:
    """What one place of the spec says about NVIDIA GPUs.

    key/value: where exactly and what it said, for messages and audit lines (``linux.devices`` and
    the device paths; the annotation key(s) and the CDI names; ``NVIDIA_VISIBLE_DEVICES`` and its value).
    items: the GPUs, in the spec's order; empty for ``NVIDIA_VISIBLE_DEVICES=void|none|``.
    devices: every NVIDIA node path in linux.devices (GPUs, control nodes, MIG capabilities).
    control: the control nodes among them. cdi_devices: fully qualified CDI names (``nvidia.com/gpu=0``)."""

    origin: Origin
    key: str
    value: str
    items: tuple[tuple[str, str], ...]
    devices: tuple[str, ...] = ()
    control: tuple[str, ...] = ()
    cdi_devices: tuple[str, ...] = ()

    @property
    def gpus(self) -> bool:
        """Whether it names at least one GPU (False: explicitly none)."""
        return bool(self.items)

    @property
    def mig(self) -> bool:
        return any(kind == "mig" for kind, _ in self.items)

    @property
    def minors(self) -> tuple[int, ...]:
        return tuple(int(v) for kind, v in self.items if kind == "minor")

    @property
    def source(self) -> str:
        """Where it came from, in the words messages and kybernate-gpu.json use."""
        if self.origin is Origin.SPEC_DEVICES:
            return "linux.devices"
        if self.origin is Origin.CDI_ANNOTATION:
            return f"annotation {self.key}"
        return f"env {VISIBLE_ENV}={self.value}"

    def describe(self) -> str:
        """One phrase for logs and errors: ``linux.devices /dev/nvidia0, /dev/nvidiactl``. Values are
        cut at MAX_DESCRIBED_CHARS: they may come from a pod."""
        if self.origin is Origin.SPEC_DEVICES:
            return f"linux.devices {_cut(', '.join(self.devices))}"
        if self.origin is Origin.CDI_ANNOTATION:
            return f"CDI annotation {_cut(self.key)}={_cut(self.value)}"
        return f"{VISIBLE_ENV}={_cut(self.value)}"


def _cut(text: str) -> str:
    return text if len(text) <= MAX_DESCRIBED_CHARS else text[:MAX_DESCRIBED_CHARS] + "..."


def _token(text: str) -> tuple[str, str]:
    """One GPU as NVIDIA_VISIBLE_DEVICES or a CDI device name writes it."""
    t = text.strip()
    if t.lower() == "all":
        return ("all", t)
    if t.upper().startswith("MIG-") or ":" in t:
        return ("mig", t)
    if t.isdigit():
        return ("index", t)
    return ("uuid", t)


def _cdi_gpus(value: str) -> tuple[list[tuple[str, str]], list[str]]:
    """'nvidia.com/gpu=0,nvidia.com/gpu=GPU-...' -> (items, names) of its NVIDIA GPUs and MIG devices;
    other vendors' devices (``example.com/net=eth0``) are not ours to count."""
    items, names = [], []
    for name in str(value).split(","):
        kind, sep, dev = name.strip().partition("=")
        if not sep or not dev.strip():
            continue
        vendor, _, cls = kind.partition("/")
        if (vendor == "nvidia.com" or vendor.endswith(".nvidia.com")) and cls in ("gpu", "mig"):
            items.append(("mig", dev.strip()) if cls == "mig" else _token(dev))
            names.append(name.strip())
    return items, names


def _cap_minor(path: str) -> int | None:
    m = _CAP_PATH.match(path)
    return int(m.group(1)) if m else None


def _is_control(path: str) -> bool:
    return path.startswith("/dev/nvidia") and not _GPU_PATH.match(path) and not path.startswith(MIG_CAPS_DIR)


def _from_devices(devices) -> Optional[GpuRequest]:
    gpus: list[tuple[str, str]] = []
    caps: list[str] = []
    control: list[str] = []
    seen: list[str] = []
    for dev in devices if isinstance(devices, list) else []:
        if not isinstance(dev, Mapping):
            continue
        path = dev.get("path")
        path = path if isinstance(path, str) else ""
        major, minor = dev.get("major"), dev.get("minor")
        numbered = type(major) is int and type(minor) is int
        if path.startswith(MIG_CAPS_DIR):  # the nvidia-caps major is dynamic: by path (minor if given)
            cap = minor if numbered else _cap_minor(path)
            (control if cap in MIG_NODE_WIDE_CAPS else caps).append(path)
        elif numbered and major == NVIDIA_MAJOR:
            if minor in NVIDIA_CONTROL_MINORS:
                control.append(path or f"{major}:{minor}")
            else:
                gpus.append(("minor", str(minor)))
        elif not numbered and _GPU_PATH.match(path):
            gpus.append(("minor", _GPU_PATH.match(path).group(1)))
        elif _is_control(path):  # nvidia-uvm, nvswitch, ...: a dynamic major, or a path without numbers
            control.append(path)
        else:
            continue
        seen.append(path or f"{major}:{minor}")
    if not gpus:
        return None  # control nodes or MIG capabilities alone give no GPU
    items = tuple(("mig", c) for c in caps) if caps else tuple(gpus)
    return GpuRequest(Origin.SPEC_DEVICES, "linux.devices", ", ".join(seen), items, tuple(seen), tuple(control))


def _from_annotations(annotations) -> Optional[GpuRequest]:
    if not isinstance(annotations, Mapping):
        return None
    keys, items, names = [], [], []
    for key in sorted(k for k in annotations if isinstance(k, str) and k.startswith(CDI_PREFIX)):
        value = annotations[key]
        if not isinstance(value, str):
            continue
        found, found_names = _cdi_gpus(value)
        if found:
            keys.append(key)
            items += found
            names += found_names
    if not items:
        return None
    return GpuRequest(Origin.CDI_ANNOTATION, ", ".join(keys), ",".join(names), tuple(items), cdi_devices=tuple(names))


def _from_env(process) -> Optional[GpuRequest]:
    env = process.get("env") if isinstance(process, Mapping) else None
    for item in env if isinstance(env, list) else []:
        if not (isinstance(item, str) and item.startswith(VISIBLE_ENV + "=")):
            continue
        value = item.split("=", 1)[1].strip()  # the first one: what getenv() in the container sees
        if value.lower() in NO_GPU_VALUES:
            return GpuRequest(Origin.VISIBLE_DEVICES_ENV, VISIBLE_ENV, value, ())
        items: list[tuple[str, str]] = []
        names: list[str] = []
        for part in value.split(","):
            if not part.strip():
                continue
            kind, sep, _ = part.strip().partition("=")
            if sep and "/" in kind:  # CDI names in the env (the device plugin's cdi-cri/envvar modes)
                found, found_names = _cdi_gpus(part)
                items += found
                names += found_names
            else:
                items.append(_token(part))
        return GpuRequest(Origin.VISIBLE_DEVICES_ENV, VISIBLE_ENV, value, tuple(items), cdi_devices=tuple(names))
    return None


def gpu_requests(spec: Mapping) -> tuple[GpuRequest, ...]:
    """Every place of the spec that names NVIDIA GPUs, strongest first (linux.devices, CDI
    annotations, NVIDIA_VISIBLE_DEVICES); empty for a spec that names none. Malformed parts of the
    spec are skipped, never raised on: the spec comes from containerd but carries the pod's values."""
    if not isinstance(spec, Mapping):
        return ()
    linux = spec.get("linux")
    found = (_from_devices(linux.get("devices") if isinstance(linux, Mapping) else None),
             _from_annotations(spec.get("annotations")),
             _from_env(spec.get("process")))
    return tuple(r for r in found if r is not None)


def gpu_request(spec: Mapping) -> Optional[GpuRequest]:
    """The request that decides which GPUs the spec names (the first of `gpu_requests`), or None.
    Says nothing about whether it is granted: an env value needs the node's consent
    (`shim.runtime.select`)."""
    found = gpu_requests(spec)
    return found[0] if found else None
