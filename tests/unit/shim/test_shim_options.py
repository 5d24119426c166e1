"""Runtime options: runc's protobuf Options and CRI's runtimeoptions (TOML) for our runtime type."""
import pytest

from proto.anyutil import pack
from proto.containerd.runc.v1 import options_pb2
from shim.runtime.options import OptionsError, RuntimeOptions, parse, parse_marshalled_any
from shim.wire import encode_bytes_field


def generic(body: bytes = b"", path: str = "") -> bytes:
    """A marshalled runtimeoptions.v1.Options (what containerd's CRI plugin sends other runtimes)."""
    value = (encode_bytes_field(2, path.encode()) if path else b"") + (encode_bytes_field(3, body) if body else b"")
    return encode_bytes_field(1, b"runtimeoptions.v1.Options") + encode_bytes_field(2, value)


def test_runc_options_protobuf():
    any_msg = pack(options_pb2.Options(shim_cgroup="/kyb/shim", binary_name="crun", systemd_cgroup=True,
                                       root="/run/r", io_uid=5, io_gid=6, no_pivot_root=True,
                                       criu_work_path="/w"))
    got = parse_marshalled_any(any_msg.SerializeToString())
    assert (got.shim_cgroup, got.binary_name, got.systemd_cgroup, got.root, got.io_uid, got.io_gid,
            got.no_pivot_root, got.criu_work_path, got.no_new_keyring) == (
        "/kyb/shim", "crun", True, "/run/r", 5, 6, True, "/w", False)
    assert got.source == "containerd.runc.v1.Options"
    # same through Create's Any (type url + value), prefixed type URLs too
    assert parse("type.googleapis.com/containerd.runc.v1.Options", any_msg.value) == got


def test_cri_toml_options_for_other_runtime_types():
    body = b'BinaryName = "/usr/bin/crun"\nSystemdCgroup = true\nShimCgroup = "/pods"\nIoUid = 1000\nOther = 1\n'
    got = parse_marshalled_any(generic(body))
    assert (got.binary_name, got.systemd_cgroup, got.shim_cgroup, got.io_uid) == ("/usr/bin/crun", True, "/pods", 1000)
    assert got.source == "runtimeoptions.v1.Options"


def test_cri_config_path(tmp_path):
    conf = tmp_path / "kyb.toml"
    conf.write_text('Root = "/run/kyb"\ncriu_path = "/usr/local/sbin/criu"\n')
    got = parse_marshalled_any(generic(path=str(conf)))
    assert (got.root, got.criu_path) == ("/run/kyb", "/usr/local/sbin/criu")
    with pytest.raises(OptionsError, match="config file"):
        parse_marshalled_any(generic(path=str(tmp_path / "missing.toml")))


@pytest.mark.parametrize("body,msg", [
    (b"BinaryName = ", "not TOML"),
    (b"SystemdCgroup = \"yes\"", "true or false"),
    (b"IoUid = -1", "non-negative"),
    (b"Root = 3", "must be a string"),
])
def test_bad_toml_is_refused_with_the_key(body, msg):
    with pytest.raises(OptionsError, match=msg):
        parse_marshalled_any(generic(body))


def test_empty_unknown_and_garbage():
    assert parse_marshalled_any(b"") == RuntimeOptions()
    other = pack(options_pb2.CheckpointOptions(exit=True)).SerializeToString()
    assert parse_marshalled_any(other).source.startswith("ignored")
    with pytest.raises(OptionsError):
        parse_marshalled_any(b"\x0a\xff")
