"""The one GPU-request parser (shim.runtime.gpu_request): which GPUs a spec names, and where it says so.

Both the runtime choice (shim.runtime.select) and GPU placement at restore (shim.gpu.placement)
read specs through it, so the device-node rules (control nodes, MIG capabilities) are decided once.
"""
from __future__ import annotations

import pytest

from shim.gpu import placement
from shim.runtime import gpu_request as gr
from shim.runtime.gpu_request import Origin, gpu_request, gpu_requests

CTL = {"path": "/dev/nvidiactl", "type": "c", "major": 195, "minor": 255}
MODESET = {"path": "/dev/nvidia-modeset", "type": "c", "major": 195, "minor": 254}
UVM = {"path": "/dev/nvidia-uvm", "type": "c", "major": 507, "minor": 0}
UVM_TOOLS = {"path": "/dev/nvidia-uvm-tools", "type": "c", "major": 507, "minor": 1}


def gpu(minor: int, path: str | None = None) -> dict:
    return {"path": path or f"/dev/nvidia{minor}", "type": "c", "major": 195, "minor": minor}


def cap(minor: int) -> dict:
    return {"path": f"/dev/nvidia-caps/nvidia-cap{minor}", "type": "c", "major": 508, "minor": minor}


def devices_spec(*devs: dict) -> dict:
    return {"linux": {"devices": list(devs)}}


def env_spec(value: str, *more: str) -> dict:
    return {"process": {"env": ["PATH=/bin", f"NVIDIA_VISIBLE_DEVICES={value}", *more]}}


def test_placement_uses_this_parser():
    assert placement.gpu_request is gr.gpu_request and placement.GpuRequest is gr.GpuRequest


# ---- linux.devices -----------------------------------------------------------------------------------
def test_cdi_applied_spec_is_a_request_for_its_gpu_nodes_only():
    """What containerd's CDI support (or the GPU Operator's CDI spec) leaves in the spec."""
    req = gpu_request(devices_spec(gpu(1), CTL, UVM, UVM_TOOLS, MODESET, gpu(0)))
    assert req.origin is Origin.SPEC_DEVICES and req.source == "linux.devices"
    assert req.items == (("minor", "1"), ("minor", "0")) and req.minors == (1, 0) and req.gpus and not req.mig
    assert req.control == ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")
    assert req.devices[0] == "/dev/nvidia1" and len(req.devices) == 6
    assert req.describe().startswith("linux.devices /dev/nvidia1, /dev/nvidiactl")


@pytest.mark.parametrize("devs", [
    [CTL],
    [CTL, UVM, UVM_TOOLS, MODESET],
    [{"path": "/dev/nvidiactl"}, {"path": "/dev/nvidia-uvm"}, {"path": "/dev/nvidia-nvswitchctl"}],
    [CTL, cap(1), cap(2)],
    [CTL, cap(12), cap(13)],  # MIG capabilities without their GPU's node: no GPU either
])
def test_control_nodes_and_capabilities_alone_are_no_gpu(devs):
    assert gpu_request(devices_spec(*devs)) is None
    assert gpu_requests(devices_spec(*devs)) == ()


def test_device_numbers_beat_paths():
    # a node renamed inside the container counts by its numbers; a path without numbers by its digits
    req = gpu_request(devices_spec(gpu(0, "/dev/gpu0"), gpu(2, "/dev/nvidia0"), {"path": "/dev/nvidia5"}))
    assert req.items == (("minor", "0"), ("minor", "2"), ("minor", "5"))
    # /dev/nvidiactl by number (195:255) is control whatever its path; another major is no GPU
    assert gpu_request(devices_spec(gpu(255, "/dev/nvidia7"))) is None
    assert gpu_request(devices_spec({"path": "/dev/nvidia3", "type": "c", "major": 1, "minor": 3})) is None


def test_mig_instance_capabilities_make_a_mig_request():
    req = gpu_request(devices_spec(gpu(0), CTL, cap(21), cap(22)))
    assert req.origin is Origin.SPEC_DEVICES and req.gpus and req.mig
    assert req.items == (("mig", "/dev/nvidia-caps/nvidia-cap21"), ("mig", "/dev/nvidia-caps/nvidia-cap22"))
    assert "/dev/nvidia0" in req.devices
    # placement refuses a MIG device by name
    host = placement.HostGpus([placement.HostGpu(0, "GPU-00000000-1111-2222-3333-444455556666", "H100", 0)])
    with pytest.raises(placement.PlacementError, match="nvidia-cap21 is a MIG device"):
        placement.resolve(req, host)


def test_mig_config_and_monitor_capabilities_are_control_nodes():
    """nvidia-cap1 (mig/config) and nvidia-cap2 (mig/monitor) are node-wide: a monitoring container on a
    whole GPU carries them; it is not a MIG container."""
    req = gpu_request(devices_spec(gpu(3), cap(1), cap(2)))
    assert req.items == (("minor", "3"),) and not req.mig
    assert req.control == ("/dev/nvidia-caps/nvidia-cap1", "/dev/nvidia-caps/nvidia-cap2")
    by_path = gpu_request(devices_spec(gpu(3), {"path": "/dev/nvidia-caps/nvidia-cap2"}))
    assert by_path.items == (("minor", "3"),)


# ---- CDI annotations ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value, items", [
    ("nvidia.com/gpu=0", (("index", "0"),)),
    ("nvidia.com/gpu=1,nvidia.com/gpu=GPU-ABC", (("index", "1"), ("uuid", "GPU-ABC"))),
    ("k8s.device-plugin.nvidia.com/gpu=GPU-abc", (("uuid", "GPU-abc"),)),
    ("nvidia.com/gpu=all", (("all", "all"),)),
    ("nvidia.com/mig=0:1", (("mig", "0:1"),)),
    ("nvidia.com/gpu=0:1", (("mig", "0:1"),)),  # a MIG device as nvidia-ctk names it
])
def test_cdi_annotation(value, items):
    req = gpu_request({"annotations": {"other": "x", "cdi.k8s.io/vendor": "example.com/net=eth0",
                                       "cdi.k8s.io/gpus": value}})
    assert req.origin is Origin.CDI_ANNOTATION and req.source == "annotation cdi.k8s.io/gpus"
    assert req.items == items and req.key == "cdi.k8s.io/gpus"


def test_cdi_annotations_of_one_spec_are_one_request():
    req = gpu_request({"annotations": {"cdi.k8s.io/b": "nvidia.com/gpu=1", "cdi.k8s.io/a": "nvidia.com/gpu=0",
                                       "cdi.k8s.io/net": "example.com/net=eth0"}})
    assert req.key == "cdi.k8s.io/a, cdi.k8s.io/b" and req.items == (("index", "0"), ("index", "1"))
    assert req.cdi_devices == ("nvidia.com/gpu=0", "nvidia.com/gpu=1")
    assert req.describe() == "CDI annotation cdi.k8s.io/a, cdi.k8s.io/b=nvidia.com/gpu=0,nvidia.com/gpu=1"


@pytest.mark.parametrize("annotations", [
    {"cdi.k8s.io/x": "vendor.com/fpga=0"},
    {"cdi.k8s.io/x": "notnvidia.com/gpu=0"},  # a vendor that merely ends in the letters
    {"cdi.k8s.io/x": "nvidia.com/gpu="},
    {"cdi.k8s.io/x": 5},
    {"other.io/x": "nvidia.com/gpu=0"},
])
def test_other_annotations_are_no_gpu(annotations):
    assert gpu_request({"annotations": annotations}) is None


# ---- NVIDIA_VISIBLE_DEVICES --------------------------------------------------------------------------
@pytest.mark.parametrize("value, items", [
    ("0,2", (("index", "0"), ("index", "2"))),
    ("GPU-aa, GPU-bb", (("uuid", "GPU-aa"), ("uuid", "GPU-bb"))),
    ("all", (("all", "all"),)),
    ("void", ()),
    ("none", ()),
    ("NONE", ()),
    ("", ()),
    ("nvidia.com/gpu=1", (("index", "1"),)),
    ("MIG-1234", (("mig", "MIG-1234"),)),
    ("0:1", (("mig", "0:1"),)),
])
def test_nvidia_visible_devices(value, items):
    req = gpu_request(env_spec(value))
    assert req.origin is Origin.VISIBLE_DEVICES_ENV and req.key == "NVIDIA_VISIBLE_DEVICES"
    assert req.source == f"env NVIDIA_VISIBLE_DEVICES={value}" and req.items == items
    assert req.gpus == bool(items) and req.value == value


def test_long_values_are_cut_in_descriptions_not_in_the_request():
    value = ",".join(str(i) for i in range(500))
    req = gpu_request(env_spec(value))
    assert req.value == value and len(req.items) == 500
    assert req.describe() == f"NVIDIA_VISIBLE_DEVICES={value[:gr.MAX_DESCRIBED_CHARS]}..."


def test_the_first_visible_devices_entry_counts():
    """What getenv() in the container returns."""
    assert gpu_request(env_spec("1", "NVIDIA_VISIBLE_DEVICES=all")).items == (("index", "1"),)


# ---- which place wins --------------------------------------------------------------------------------
def test_no_gpu_named_and_the_order_of_the_places():
    assert gpu_request({}) is None
    assert gpu_request({"process": {"env": ["A=1"]}, "linux": {"devices": []}}) is None
    both = {**env_spec("0,1"), **devices_spec(gpu(1), CTL), "annotations": {"cdi.k8s.io/x": "nvidia.com/gpu=0"}}
    assert [r.origin for r in gpu_requests(both)] == [Origin.SPEC_DEVICES, Origin.CDI_ANNOTATION,
                                                      Origin.VISIBLE_DEVICES_ENV]
    assert gpu_request(both).source == "linux.devices"  # the device nodes the container really gets
    del both["linux"]
    assert gpu_request(both).source == "annotation cdi.k8s.io/x"
    # control nodes alone do not hide what the annotation names (CDI not applied yet)
    both.update(devices_spec(CTL, UVM))
    assert gpu_request(both).origin is Origin.CDI_ANNOTATION


@pytest.mark.parametrize("spec", [
    {}, [], None, "x", {"process": None}, {"process": {"env": "x"}}, {"process": {"env": [None, 3]}},
    {"linux": None}, {"linux": {"devices": "x"}}, {"linux": {"devices": [None, 3, {"path": 5}]}},
    {"annotations": ["cdi.k8s.io/a"]}, {"annotations": {"cdi.k8s.io/a": 5, 7: "nvidia.com/gpu=0"}},
])
def test_malformed_specs_name_nothing_and_never_raise(spec):
    found = gpu_requests(spec)
    assert all(not r.gpus for r in found)
