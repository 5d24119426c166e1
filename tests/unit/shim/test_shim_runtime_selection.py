"""Which OCI runtime runs a bundle, whether it has GPUs, and why (shim.runtime.select).

The cases of issue 13: GPU devices already in the spec (CDI applied) run with plain runc, with or
without nvidia-container-runtime; CDI annotations not applied need the node's nvidia_runtime or are
refused with what to do; NVIDIA_VISIBLE_DEVICES from a pod's or image's env grants nothing unless the
node config accepts it (then it needs nvidia_runtime), and an audit line says it was ignored.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os

import pytest

from proto.containerd.task.v2 import shim_pb2 as api
from shim.policy.node import NodeConfig
from shim.runtime.gpu_request import Origin
from shim.runtime.select import NVIDIA_RUNTIME, RuntimeSelectionError, granted_request, select_runtime
from ttrpc.codes import Code
from ttrpc.errors import TTRPCError

INSTALLED = {"runc": "/usr/sbin/runc", NVIDIA_RUNTIME: "/usr/bin/nvidia-container-runtime",
             "/usr/bin/nvidia-container-runtime": "/usr/bin/nvidia-container-runtime",
             "crun": "/usr/bin/crun", "/opt/x/runc": "/opt/x/runc"}
DEFAULTS = NodeConfig()
ACCEPT_ENV = NodeConfig(accept_visible_devices_env=True, source="/etc/kybernate/config.toml")
NVIDIA_NODE = NodeConfig(accept_visible_devices_env=True, nvidia_runtime=NVIDIA_RUNTIME,
                         source="/etc/kybernate/config.toml")
CDI_DEVICES = ["/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"]


def which_all(name):
    return INSTALLED.get(name)


def which_no_nvidia(name):
    return None if "nvidia" in name else INSTALLED.get(name)


def spec(env=(), annotations=None, devices=()):
    return {"process": {"env": list(env)}, "annotations": annotations or {},
            "linux": {"devices": [{"path": d, "type": "c"} for d in devices]}}


@pytest.fixture
def audit(caplog):
    caplog.set_level(logging.WARNING, logger="kybernate.audit")

    def lines():
        return [r.getMessage() for r in caplog.records if r.name == "kybernate.audit"]
    return lines


def test_plain_bundle_gets_runc(audit):
    c = select_runtime(spec(["PATH=/bin"]), DEFAULTS, env={}, which=which_all)
    assert c.binary == "/usr/sbin/runc" and not c.gpu and c.request is None and "default" in c.reason
    assert audit() == []


# ---- devices already in the spec: the CDI case ------------------------------------------------------
@pytest.mark.parametrize("which", [which_no_nvidia, which_all], ids=["no-nvidia-runtime", "nvidia-runtime-installed"])
@pytest.mark.parametrize("node", [DEFAULTS, NVIDIA_NODE], ids=["defaults", "nvidia_runtime-set"])
def test_gpu_devices_in_the_spec_run_with_plain_runc(which, node, audit):
    """CDI applied by containerd (the GPU Operator's default): nothing to inject, so runc, even where
    nvidia-container-runtime exists or the node names it; and the container has GPUs."""
    s = spec(["NVIDIA_VISIBLE_DEVICES=void"], {"cdi.k8s.io/nvidia": "nvidia.com/gpu=0"}, CDI_DEVICES)
    c = select_runtime(s, node, env={}, which=which, container_id="train")
    assert c.binary == "/usr/sbin/runc" and c.gpu
    assert c.request.origin is Origin.SPEC_DEVICES and c.request.minors == (0,)
    assert "already in the spec" in c.reason and "/dev/nvidia0" in c.reason
    assert audit() == []


def test_image_env_beside_spec_devices_is_moot(audit):
    """Every CUDA image carries NVIDIA_VISIBLE_DEVICES=all; with the devices in the spec it asks nothing."""
    c = select_runtime(spec(["NVIDIA_VISIBLE_DEVICES=all"], devices=CDI_DEVICES), DEFAULTS, env={},
                       which=which_no_nvidia)
    assert c.binary == "/usr/sbin/runc" and c.gpu and audit() == []


def test_mig_devices_in_the_spec_are_a_gpu_container_on_runc():
    s = spec(devices=["/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-caps/nvidia-cap21"])
    c = select_runtime(s, DEFAULTS, env={}, which=which_no_nvidia)
    assert c.binary == "/usr/sbin/runc" and c.gpu and c.request.mig


@pytest.mark.parametrize("devices", [["/dev/nvidiactl", "/dev/nvidia-uvm"], ["/dev/null", "/dev/fuse"]])
def test_control_or_other_devices_alone_are_a_cpu_container(devices):
    c = select_runtime(spec(devices=devices), NVIDIA_NODE, env={}, which=which_all)
    assert c.binary == "/usr/sbin/runc" and not c.gpu


# ---- NVIDIA_VISIBLE_DEVICES alone -------------------------------------------------------------------
@pytest.mark.parametrize("which", [which_no_nvidia, which_all], ids=["no-nvidia-runtime", "nvidia-runtime-installed"])
def test_env_request_is_ignored_without_the_node_knob(which, audit):
    node = NodeConfig(nvidia_runtime=NVIDIA_RUNTIME)  # even with the runtime named: the env is not accepted
    c = select_runtime(spec(["NVIDIA_VISIBLE_DEVICES=all"]), node, env={}, which=which, container_id="train",
                       namespace="k8s.io")
    assert c.binary == "/usr/sbin/runc" and not c.gpu and c.request is None
    assert "NVIDIA_VISIBLE_DEVICES=all ignored" in c.reason
    [line] = audit()
    assert line.startswith("AUDIT ignored container=train namespace=k8s.io key=NVIDIA_VISIBLE_DEVICES value='all' ")
    assert "accept_visible_devices_env = false" in line and "runs without GPUs" in line


def test_env_request_is_granted_with_the_node_knob_and_its_runtime(audit):
    c = select_runtime(spec(["NVIDIA_VISIBLE_DEVICES=0,1"]), NVIDIA_NODE, env={}, which=which_all)
    assert c.binary == "/usr/bin/nvidia-container-runtime" and c.gpu
    assert c.request.origin is Origin.VISIBLE_DEVICES_ENV and c.request.items == (("index", "0"), ("index", "1"))
    assert "nvidia_runtime=nvidia-container-runtime" in c.reason and "NVIDIA_VISIBLE_DEVICES=0,1" in c.reason
    assert audit() == []


def test_accepted_env_request_without_a_runtime_to_inject_it_is_refused():
    with pytest.raises(RuntimeSelectionError) as info:
        select_runtime(spec(["NVIDIA_VISIBLE_DEVICES=all"]), ACCEPT_ENV, env={}, which=which_all, container_id="train")
    msg = str(info.value)
    assert msg.startswith("container train asks for NVIDIA GPUs by NVIDIA_VISIBLE_DEVICES=all")
    assert "nvidia_runtime" in msg and "/etc/kybernate/config.toml" in msg


def test_nvidia_runtime_named_by_the_node_but_missing_is_refused():
    with pytest.raises(RuntimeSelectionError) as info:
        select_runtime(spec(["NVIDIA_VISIBLE_DEVICES=all"]), NVIDIA_NODE, env={}, which=which_no_nvidia,
                       container_id="train")
    msg = str(info.value)
    assert "container train" in msg and repr(NVIDIA_RUNTIME) in msg and "[gpu] nvidia_runtime" in msg


@pytest.mark.parametrize("value", ["", "void", "none", "NONE"])
def test_void_or_empty_visible_devices_is_no_gpu_and_no_audit(value, audit):
    c = select_runtime(spec([f"NVIDIA_VISIBLE_DEVICES={value}"]), DEFAULTS, env={}, which=which_no_nvidia)
    assert c.binary == "/usr/sbin/runc" and not c.gpu and "default" in c.reason
    assert granted_request(spec([f"NVIDIA_VISIBLE_DEVICES={value}"]), ACCEPT_ENV) == (None, None)
    assert audit() == []


# ---- CDI annotations not applied --------------------------------------------------------------------
def test_unapplied_cdi_annotation_without_nvidia_runtime_is_refused_with_what_to_do():
    s = spec(annotations={"cdi.k8s.io/nvidia-device-plugin_x": "nvidia.com/gpu=GPU-abc"})
    with pytest.raises(RuntimeSelectionError) as info:
        select_runtime(s, DEFAULTS, env={}, which=which_all, container_id="train")
    msg = str(info.value)
    assert "container train" in msg and "cdi.k8s.io/nvidia-device-plugin_x=nvidia.com/gpu=GPU-abc" in msg
    assert "enable_cdi" in msg and "nvidia-ctk cdi generate" in msg and "[gpu] nvidia_runtime" in msg


def test_unapplied_cdi_annotation_goes_to_the_nodes_nvidia_runtime():
    node = NodeConfig(nvidia_runtime="/usr/bin/nvidia-container-runtime")  # no env consent needed for CDI
    c = select_runtime(spec(annotations={"cdi.k8s.io/x": "nvidia.com/gpu=0"}), node, env={}, which=which_all)
    assert c.binary == "/usr/bin/nvidia-container-runtime" and c.gpu and c.request.origin is Origin.CDI_ANNOTATION


def test_unrelated_cdi_annotation_is_no_gpu():
    c = select_runtime(spec(annotations={"cdi.k8s.io/x": "vendor.com/fpga=0"}, devices=["/dev/fuse"]), DEFAULTS,
                       env={}, which=which_no_nvidia)
    assert c.binary == "/usr/sbin/runc" and not c.gpu


# ---- the operator's explicit choice -----------------------------------------------------------------
def test_binary_name_wins_and_gpu_still_says_what_the_container_has(audit):
    c = select_runtime(spec(devices=CDI_DEVICES), DEFAULTS, binary_name="crun", env={}, which=which_no_nvidia)
    assert c.binary == "/usr/bin/crun" and c.gpu and "BinaryName=crun" in c.reason
    c = select_runtime(spec(["NVIDIA_VISIBLE_DEVICES=all"]), DEFAULTS, binary_name="crun", env={},
                       which=which_no_nvidia, container_id="c1")
    assert c.binary == "/usr/bin/crun" and not c.gpu  # the env is still not a GPU request
    assert len(audit()) == 1 and "container=c1" in audit()[0]
    c = select_runtime(spec(["NVIDIA_VISIBLE_DEVICES=all"]), ACCEPT_ENV, binary_name=NVIDIA_RUNTIME, env={},
                       which=which_all)
    assert c.binary == "/usr/bin/nvidia-container-runtime" and c.gpu


def test_env_override_comes_after_options():
    env = {"KYBERNATE_RUNTIME": "/opt/x/runc"}
    assert select_runtime(spec(), DEFAULTS, env=env, which=which_all).binary == "/opt/x/runc"
    assert select_runtime(spec(), DEFAULTS, binary_name="crun", env=env, which=which_all).binary == "/usr/bin/crun"
    c = select_runtime(spec(annotations={"cdi.k8s.io/x": "nvidia.com/gpu=0"}), DEFAULTS, env=env, which=which_no_nvidia)
    assert c.binary == "/opt/x/runc" and c.gpu and "KYBERNATE_RUNTIME" in c.reason


def test_missing_explicit_binary_is_refused():
    with pytest.raises(RuntimeSelectionError) as info:
        select_runtime(spec(), DEFAULTS, binary_name="nosuch-runtime", env={}, which=which_all, container_id="c1")
    assert "nosuch-runtime" in str(info.value) and "container c1" in str(info.value)


def test_no_runc_is_refused():
    with pytest.raises(RuntimeSelectionError, match="container c1: OCI runtime runc not found"):
        select_runtime(spec(), DEFAULTS, env={}, which=lambda name: None, container_id="c1")


def test_malformed_specs_do_not_crash():
    for s in ({}, {"process": None}, {"process": {"env": "x"}}, {"linux": {"devices": [None, 3]}},
              {"annotations": {"cdi.k8s.io/a": 5}}, []):
        assert select_runtime(s, DEFAULTS, env={}, which=which_all).binary == "/usr/sbin/runc"


# ---- Create: the node config is read once, and its errors name the file ----------------------------
def _create(bundle, cid="c1"):
    from shim.task.container import Container

    req = api.CreateTaskRequest(id=cid, bundle=str(bundle))
    return asyncio.run(Container.create(req, "default", reaper=None))


def _bundle(tmp_path, env):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"process": {"env": env}, "linux": {}}))
    return bundle


def _config(tmp_path, text):
    path = tmp_path / "config.toml"
    path.write_text(text)
    os.chmod(path, 0o644)
    return path


@pytest.mark.skipif(os.geteuid() != 0, reason="the node config must be owned by root")
def test_create_refuses_a_bad_node_config_naming_the_file(tmp_path, monkeypatch):
    path = _config(tmp_path, "[gpu]\naccept_visible_devices_env = \"yes\"\n")
    monkeypatch.setenv("KYBERNATE_CONFIG", str(path))
    with pytest.raises(TTRPCError) as info:
        _create(_bundle(tmp_path, ["PATH=/bin"]))
    assert info.value.code is Code.FAILED_PRECONDITION
    assert info.value.message.startswith(f"create container c1: node config {path}: ")
    assert "accept_visible_devices_env" in info.value.message


@pytest.mark.skipif(os.geteuid() != 0, reason="the node config must be owned by root")
def test_create_passes_the_node_config_to_the_runtime_choice(tmp_path, monkeypatch):
    """The knob read from the file reaches select_runtime: an accepted env request with a named
    nvidia runtime that is not installed is refused before anything is created."""
    path = _config(tmp_path, "[gpu]\naccept_visible_devices_env = true\n"
                             "nvidia_runtime = \"/nonexistent/nvidia-container-runtime\"\n")
    monkeypatch.setenv("KYBERNATE_CONFIG", str(path))
    monkeypatch.delenv("KYBERNATE_RUNTIME", raising=False)
    bundle = _bundle(tmp_path, ["PATH=/bin", "NVIDIA_VISIBLE_DEVICES=all"])
    with pytest.raises(TTRPCError) as info:
        _create(bundle)
    assert info.value.code is Code.FAILED_PRECONDITION
    assert "/nonexistent/nvidia-container-runtime" in info.value.message and str(path) in info.value.message
    assert not (bundle / "kybernate.json").exists()
