"""proto.anyutil: containerd's bare type URLs out, both forms in."""

import pytest
from google.protobuf import any_pb2

from proto import anyutil
from proto.containerd.events.task_pb2 import TaskExit
from proto.containerd.runc.v1.options_pb2 import CheckpointOptions, Options
from proto.io.containerd.cgroups.v1.metrics_pb2 import Metrics as MetricsV1
from proto.io.containerd.cgroups.v2.metrics_pb2 import Metrics as MetricsV2


@pytest.mark.parametrize("msg, url", [
    (Options(binary_name="runc", systemd_cgroup=True), "containerd.runc.v1.Options"),
    (CheckpointOptions(exit=True, image_path="/x"), "containerd.runc.v1.CheckpointOptions"),
    (TaskExit(container_id="c", pid=7, exit_status=137), "containerd.events.TaskExit"),
    (MetricsV1(), "io.containerd.cgroups.v1.Metrics"),
    (MetricsV2(), "io.containerd.cgroups.v2.Metrics"),
])
def test_pack_uses_the_bare_full_name(msg, url):
    a = anyutil.pack(msg)
    assert a.type_url == url
    assert not a.type_url.startswith("type.googleapis.com/")
    assert anyutil.unpack(a, type(msg)) == msg


def test_unpack_accepts_the_google_prefix():
    a = any_pb2.Any()
    a.Pack(Options(root="/run/kybernate"))          # protobuf's own Pack writes the prefixed form
    assert a.type_url == "type.googleapis.com/containerd.runc.v1.Options"
    assert anyutil.unpack(a, Options).root == "/run/kybernate"
    assert anyutil.type_name(a) == "containerd.runc.v1.Options"


def test_bytes_are_what_containerd_sends():
    # containerd's typeurl.MarshalAny(&options.Options{BinaryName: "runc"}): field 6, string "runc"
    a = any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"\x32\x04runc")
    assert anyutil.unpack(a, Options) == Options(binary_name="runc")
    assert anyutil.pack(Options(binary_name="runc")).SerializeToString() == a.SerializeToString()


def test_unpack_refuses_another_type():
    a = anyutil.pack(CheckpointOptions(exit=True))
    assert not anyutil.is_type(a, Options)
    with pytest.raises(anyutil.TypeMismatch, match="containerd.runc.v1.CheckpointOptions"):
        anyutil.unpack(a, Options)
    with pytest.raises(anyutil.TypeMismatch):
        anyutil.unpack(any_pb2.Any(), Options)


def test_unpack_reports_garbage():
    with pytest.raises(anyutil.DecodeError):
        anyutil.unpack(any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"\xff\xff"), Options)
