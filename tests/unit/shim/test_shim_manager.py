"""`start`/`delete` helpers: socket naming, grouping, bootstrap output, protobuf-free encodings."""
import hashlib
import json

import pytest

from shim import bundle, wire
from shim.binary import manager


def test_socket_address_matches_containerds_naming():
    addr = manager.socket_address("/run/containerd/containerd.sock", "default", "c1")
    digest = hashlib.sha256(b"/run/containerd/containerd.sock/default/c1").hexdigest()
    assert addr == f"unix:///run/containerd/s/{digest}"


def test_grouping_by_pod_annotation(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"annotations": {
        "io.kubernetes.cri.sandbox-id": "pod1", "io.kubernetes.cri.container-type": "container"}}))
    assert manager.grouping_id(str(tmp_path), "c1") == "pod1"
    (tmp_path / "config.json").write_text(json.dumps({"annotations": {"other": "x"}}))
    assert manager.grouping_id(str(tmp_path), "c1") == "c1"
    (tmp_path / "config.json").write_text("{not json io.kubernetes.cri.sandbox-id")
    assert manager.grouping_id(str(tmp_path), "c1") == "c1"
    assert manager.grouping_id(str(tmp_path / "missing"), "c1") == "c1"


V3 = '{"version":3,"address":"unix:///x","protocol":"ttrpc"}'


@pytest.mark.parametrize("env,major,expected", [
    ({}, 2, "unix:///x"),                                   # containerd 1.6: no MAX_SHIM_VERSION
    ({"MAX_SHIM_VERSION": "2"}, 1, "unix:///x"),            # containerd 1.7
    ({"MAX_SHIM_VERSION": "2"}, 2, V3),                     # containerd 2.x (also says 2)
    ({"MAX_SHIM_VERSION": "2"}, 0, "unix:///x"),            # unknown parent: what everyone takes
    ({"MAX_SHIM_VERSION": "3"}, 0, V3),
    ({"MAX_SHIM_VERSION": "2", "KYBERNATE_SHIM_API_VERSION": "2"}, 2, "unix:///x"),
    ({"KYBERNATE_SHIM_API_VERSION": "3"}, 0, V3),
    ({"MAX_SHIM_VERSION": "garbage"}, 2, "unix:///x"),
])
def test_bootstrap_output(env, major, expected):
    out = manager.bootstrap_output("unix:///x", env, parent_major=major)
    assert out == expected
    if out.startswith("{"):
        assert json.loads(out) == {"version": 3, "address": "unix:///x", "protocol": "ttrpc"}


@pytest.mark.parametrize("binary,major", [
    ("/usr/bin/containerd", 1),
    ("/opt/kybernate-deps/containerd-1.7/usr/bin/containerd", 1),
    ("/opt/kybernate-deps/containerd-2.1/usr/bin/containerd", 2),
])
def test_containerd_version_is_read_from_the_binary(binary, major):
    import os

    if not os.access(binary, os.X_OK):
        pytest.skip(f"{binary} not installed")
    assert manager._ask_version(binary) == major


def test_containerd_major_cache_and_non_containerd_parent(tmp_path, monkeypatch):
    import os

    assert manager.containerd_major(os.getpid()) == 0  # python is no containerd
    monkeypatch.setattr(manager, "VERSION_CACHE_DIR", str(tmp_path))
    fake = tmp_path / "containerd"
    fake.write_text("#!/bin/sh\necho containerd github.com/containerd/containerd/v2 v2.3.0 abc\n")
    fake.chmod(0o755)
    monkeypatch.setattr(manager.os, "readlink", lambda p: str(fake))
    assert manager.containerd_major(1) == 2
    fake.write_text("#!/bin/sh\nexit 1\n")  # same size? no: a new identity, asked again
    assert manager.containerd_major(1) == 0
    cached = list(tmp_path.glob("containerd-major-*"))
    assert len(cached) == 2


def test_wire_encodings_match_protobuf():
    from proto.containerd.task.v2 import shim_pb2

    data = wire.delete_response(1234, 137, 1_700_000_000_123_456_789)
    msg = shim_pb2.DeleteResponse.FromString(data)
    assert (msg.pid, msg.exit_status, msg.exited_at.seconds, msg.exited_at.nanos) == (
        1234, 137, 1_700_000_000, 123_456_789)


def test_runtime_info_encoding():
    data = wire.runtime_info("io.containerd.kybernate.v1", "0.1.0")
    fields = dict(wire.fields(data))
    assert fields[1] == b"io.containerd.kybernate.v1"
    assert dict(wire.fields(fields[2]))[1] == b"0.1.0"


def test_delete_action_without_a_shim(tmp_path, capsysbinary):
    """containerd's cleanup on a bundle whose shim is gone: exit 137 and a parseable response."""
    from proto.containerd.task.v2 import shim_pb2
    from shim.binary.flags import Flags

    (tmp_path / "init.pid").write_text("4242")
    (tmp_path / bundle.DELETED_MARK).write_text("")   # the daemon deleted it cleanly
    rc = manager.delete(Flags(namespace="ns", id="gone", bundle=str(tmp_path)))
    assert rc == 0
    resp = shim_pb2.DeleteResponse.FromString(capsysbinary.readouterr().out)
    assert resp.pid == 4242 and resp.exit_status == 137 and resp.exited_at.seconds > 0


def test_info_flag_prints_runtime_info(capsysbinary):
    from shim.binary.cli import main

    assert main(["-info"]) == 0
    fields = dict(wire.fields(capsysbinary.readouterr().out))
    assert fields[1] == b"io.containerd.kybernate.v1"


def test_bootstrap_output_asks_the_parent_when_containerd_says_2():
    # our parent here is pytest's python, not containerd: the bare address everyone accepts
    assert manager.bootstrap_output("unix:///x", {"MAX_SHIM_VERSION": "2"}) == "unix:///x"


def test_runtime_options_on_stdin_that_do_not_decode_fail_start():
    """containerd's runc shim fails its start on undecodable options; a ShimCgroup dropped in silence
    would leave the shim in containerd's own cgroup (issue #14)."""
    import subprocess
    import sys

    from proto.anyutil import pack
    from proto.containerd.runc.v1 import options_pb2

    code = "from shim.binary.manager import _shim_cgroup_from_stdin as r; print(repr(r()))"
    good = pack(options_pb2.Options(shim_cgroup="/kyb/pod1")).SerializeToString()
    ok = subprocess.run([sys.executable, "-c", code], input=good, capture_output=True, timeout=30)
    assert ok.returncode == 0 and ok.stdout.strip() == b"'/kyb/pod1'", ok.stderr
    empty = subprocess.run([sys.executable, "-c", code], input=b"", capture_output=True, timeout=30)
    assert empty.returncode == 0 and empty.stdout.strip() == b"''", empty.stderr
    bad = subprocess.run([sys.executable, "-c", code], input=b"\x0a\xff\xff\xff", capture_output=True, timeout=30)
    assert bad.returncode != 0 and b"runtime options on stdin do not decode" in bad.stderr
