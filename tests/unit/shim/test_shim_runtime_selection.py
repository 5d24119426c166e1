"""Which OCI runtime runs a bundle, and why."""
import pytest

from shim.runtime.runc import NVIDIA_RUNTIME, RuntimeSelectionError, gpu_request, select_runtime

INSTALLED = {"runc": "/usr/sbin/runc", NVIDIA_RUNTIME: "/usr/bin/nvidia-container-runtime",
             "crun": "/usr/bin/crun", "/opt/x/runc": "/opt/x/runc"}


def which_all(name):
    return INSTALLED.get(name)


def which_no_nvidia(name):
    return None if name == NVIDIA_RUNTIME else INSTALLED.get(name)


def spec(env=(), annotations=None, devices=()):
    return {"process": {"env": list(env)}, "annotations": annotations or {},
            "linux": {"devices": [{"path": d, "type": "c"} for d in devices]}}


def test_plain_bundle_gets_runc():
    c = select_runtime(spec(["PATH=/bin"]), env={}, which=which_all)
    assert c.binary == "/usr/sbin/runc" and not c.gpu and "default" in c.reason


@pytest.mark.parametrize("s,why", [
    (spec(["NVIDIA_VISIBLE_DEVICES=all"]), "NVIDIA_VISIBLE_DEVICES=all"),
    (spec(["NVIDIA_VISIBLE_DEVICES=0,1"]), "NVIDIA_VISIBLE_DEVICES=0,1"),
    (spec(annotations={"cdi.k8s.io/gpu": "nvidia.com/gpu=0"}), "CDI annotation"),
    (spec(devices=["/dev/nvidia0"]), "/dev/nvidia0"),
])
def test_gpu_bundles_get_the_nvidia_runtime(s, why):
    c = select_runtime(s, env={}, which=which_all)
    assert c.binary == "/usr/bin/nvidia-container-runtime" and c.gpu
    assert why in c.reason


@pytest.mark.parametrize("value", ["", "void", "none", "NONE"])
def test_void_or_empty_visible_devices_is_no_gpu(value):
    assert gpu_request(spec([f"NVIDIA_VISIBLE_DEVICES={value}"])) is None
    assert select_runtime(spec([f"NVIDIA_VISIBLE_DEVICES={value}"]), env={}, which=which_no_nvidia).binary == "/usr/sbin/runc"


def test_unrelated_cdi_annotation_and_devices_are_no_gpu():
    assert gpu_request(spec(annotations={"cdi.k8s.io/x": "vendor.com/fpga=0"}, devices=["/dev/fuse"])) is None


def test_gpu_bundle_without_nvidia_runtime_is_refused_with_a_reason():
    with pytest.raises(RuntimeSelectionError) as info:
        select_runtime(spec(["NVIDIA_VISIBLE_DEVICES=all"]), env={}, which=which_no_nvidia, container_id="train")
    msg = str(info.value)
    assert "container train" in msg and NVIDIA_RUNTIME in msg and "BinaryName" in msg


def test_explicit_binary_name_wins_even_for_gpu_bundles():
    c = select_runtime(spec(["NVIDIA_VISIBLE_DEVICES=all"]), binary_name="crun", env={}, which=which_no_nvidia)
    assert c.binary == "/usr/bin/crun" and c.gpu and "BinaryName=crun" in c.reason


def test_env_override_comes_after_options():
    env = {"KYBERNATE_RUNTIME": "/opt/x/runc"}
    assert select_runtime(spec(), env=env, which=which_all).binary == "/opt/x/runc"
    assert select_runtime(spec(), binary_name="crun", env=env, which=which_all).binary == "/usr/bin/crun"
    assert "KYBERNATE_RUNTIME" in select_runtime(spec(["NVIDIA_VISIBLE_DEVICES=all"]), env=env,
                                                 which=which_no_nvidia).reason


def test_missing_explicit_binary_is_refused():
    with pytest.raises(RuntimeSelectionError) as info:
        select_runtime(spec(), binary_name="nosuch-runtime", env={}, which=which_all, container_id="c1")
    assert "nosuch-runtime" in str(info.value) and "container c1" in str(info.value)


def test_malformed_specs_do_not_crash():
    for s in ({}, {"process": None}, {"process": {"env": "x"}}, {"linux": {"devices": [None, 3]}},
              {"annotations": {"cdi.k8s.io/a": 5}}, []):
        assert select_runtime(s, env={}, which=which_all).binary == "/usr/sbin/runc"
