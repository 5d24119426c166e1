"""Which OCI runtime binary runs a container, and whether the container has GPUs.

The choice, in order (first that applies):

1. ``BinaryName`` in the runtime options (containerd's config: the node's operator);
2. ``KYBERNATE_RUNTIME`` in the shim's environment (containerd's environment: the node again);
3. the GPU request of the spec (`shim.runtime.gpu_request`), granted or not by the node's config
   (`shim.policy.node.NodeConfig`, section ``[gpu]``):

   - GPU device nodes already in ``linux.devices`` (CDI applied by containerd, the default of current
     NVIDIA GPU Operator releases; or a device plugin's DeviceSpecs): plain runc. Nothing needs
     injecting, so nvidia-container-runtime is neither needed nor used, even where installed.
   - ``cdi.k8s.io/*`` annotations naming NVIDIA devices that are not in the spec yet: someone must
     apply them. ``nvidia_runtime`` in the node config (nvidia-container-runtime in CDI mode does),
     else the container is refused: running it with plain runc would start it without its GPUs.
   - ``NVIDIA_VISIBLE_DEVICES`` in the process env (and nothing above): the device plugin's env mode
     writes it, but so does every CUDA base image and any pod author, and the shim cannot tell them
     apart. Counted only where the node config says ``accept_visible_devices_env = true`` (then it
     needs ``nvidia_runtime`` to inject the devices, else refused). Otherwise it grants nothing: the
     container runs as a CPU container with runc and an audit line says the value was ignored.
     (The NVIDIA toolkit's own switch for this is ``accept-nvidia-visible-devices-envvar-when-
     unprivileged``; NVIDIA recommends false for Kubernetes, which is our default.)
4. runc.

`RuntimeChoice.gpu` says whether the container has GPUs (devices in its spec, a CDI annotation, or an
accepted env value): the GPU checkpoint layer stacks on the container only then.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Mapping, Optional

from shim.policy import audit
from shim.policy.node import NodeConfig
from shim.runtime.gpu_request import GpuRequest, Origin, gpu_requests

DEFAULT_BINARY = "runc"
NVIDIA_RUNTIME = "nvidia-container-runtime"
RUNTIME_ENV = "KYBERNATE_RUNTIME"


class RuntimeSelectionError(Exception):
    """No usable OCI runtime for this bundle (the Task service answers FailedPrecondition)."""


@dataclass(frozen=True)
class RuntimeChoice:
    binary: str  # absolute path when found on PATH, else as given
    reason: str
    gpu: bool = False  # the container has GPUs (see the module's doc); the GPU layer stacks on it
    request: Optional[GpuRequest] = None  # the granted GPU request (None: a CPU container)


def _config_name(node: NodeConfig) -> str:
    return f"node config {node.source}" if node.source != "defaults" else "node config (defaults: no file)"


def granted_request(spec: Mapping, node: NodeConfig) -> tuple[Optional[GpuRequest], Optional[GpuRequest]]:
    """(the GPU request this container is granted, an env request that is not): the first of the
    spec's requests, where an ``NVIDIA_VISIBLE_DEVICES`` value counts only with the node's consent.
    ``NVIDIA_VISIBLE_DEVICES=void`` grants nothing and needs no consent."""
    for request in gpu_requests(spec):
        if not request.gpus:
            return None, None
        if request.origin is Origin.VISIBLE_DEVICES_ENV and not node.accept_visible_devices_env:
            return None, request
        return request, None
    return None, None


def select_runtime(spec: Mapping, node: NodeConfig, binary_name: str = "", env: Mapping[str, str] | None = None,
                   which=shutil.which, container_id: str = "", namespace: str = "") -> RuntimeChoice:
    """Pick the OCI runtime binary for a bundle (see the module's doc for the order).

    node: the node's config, loaded once per Create by the caller. env: the shim's environment
    (default os.environ). An ignored NVIDIA_VISIBLE_DEVICES is logged as an audit line here.
    RuntimeSelectionError: a binary that is not there, or GPUs no runtime here would give."""
    env = os.environ if env is None else env
    name = f"container {container_id}" if container_id else "container"
    granted, ignored = granted_request(spec, node)
    gpu = granted is not None
    if ignored is not None:
        audit.ignored(container_id or "-", ignored.key, ignored.value,
                      f"{_config_name(node)} does not accept GPU requests from a pod's or image's env "
                      f"([gpu] accept_visible_devices_env = false): the container runs without GPUs",
                      namespace=namespace)
    about = _about(granted, ignored)

    if binary_name:
        return RuntimeChoice(_resolve(binary_name, which, name, "BinaryName in the runtime options"),
                             f"runtime options name BinaryName={binary_name}{about}", gpu, granted)
    explicit = env.get(RUNTIME_ENV, "")
    if explicit:
        return RuntimeChoice(_resolve(explicit, which, name, RUNTIME_ENV),
                             f"{RUNTIME_ENV}={explicit}{about}", gpu, granted)
    if granted is None or granted.origin is Origin.SPEC_DEVICES:
        found = which(DEFAULT_BINARY)
        if not found:
            raise RuntimeSelectionError(f"{name}: OCI runtime {DEFAULT_BINARY} not found in PATH")
        if granted is not None:
            return RuntimeChoice(found, f"runc: the GPU device nodes are already in the spec ({granted.describe()}; "
                                        f"CDI applied by containerd or the device plugin): nothing to inject", True,
                                 granted)
        if ignored is not None:
            return RuntimeChoice(found, f"runc: a CPU container{about}", False)
        return RuntimeChoice(found, "default: runc (no GPU request, no explicit runtime)", False)

    # granted GPUs whose devices are not in the spec: they need injecting
    if node.nvidia_runtime:
        binary = _resolve(node.nvidia_runtime, which, name, f"[gpu] nvidia_runtime in the {_config_name(node)}")
        return RuntimeChoice(binary, f"[gpu] nvidia_runtime={node.nvidia_runtime} injects the devices of "
                                     f"{granted.describe()}", True, granted)
    if granted.origin is Origin.CDI_ANNOTATION:
        raise RuntimeSelectionError(
            f"{name} asks for NVIDIA devices by {granted.describe()}, but they are not in the spec's linux.devices: "
            f"containerd did not apply them. Enable CDI in containerd (1.7: enable_cdi = true and cdi_spec_dirs in "
            f"the CRI plugin's table; 2.x: on by default) with a CDI spec of this node's GPUs (nvidia-ctk cdi "
            f"generate --output=/var/run/cdi/nvidia.yaml), or set [gpu] nvidia_runtime in the {_config_name(node)} "
            f"to have {NVIDIA_RUNTIME} apply them")
    raise RuntimeSelectionError(
        f"{name} asks for NVIDIA GPUs by {granted.describe()}, which the {_config_name(node)} accepts "
        f"([gpu] accept_visible_devices_env = true), but no runtime is named to inject them: set [gpu] "
        f"nvidia_runtime (e.g. \"{NVIDIA_RUNTIME}\") in that file, or use CDI (the devices then come in the spec)")


def _about(granted: Optional[GpuRequest], ignored: Optional[GpuRequest]) -> str:
    if granted is not None:
        return f"; GPUs from {granted.describe()}"
    if ignored is not None:
        return f"; {ignored.describe()} ignored (not accepted by the node config)"
    return ""


def _resolve(binary: str, which, name: str, source: str) -> str:
    found = which(binary)
    if not found:
        raise RuntimeSelectionError(f"{name}: OCI runtime binary {binary!r} ({source}) not found or not executable")
    return found
