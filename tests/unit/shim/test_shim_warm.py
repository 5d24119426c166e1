"""The warm template's wire format and process-title rewrite (the fork itself: integration tests)."""
import os
import subprocess
import sys

import pytest

from shim.binary import warm


def test_request_round_trip():
    env = {"PATH": "/usr/bin:/bin", "TTRPC_ADDRESS": "/run/containerd/containerd.sock.ttrpc", "EMPTY": "",
           "WITH=EQUALS": "a=b"}
    argv = ["/x/containerd-shim-kybernate-v1", "-namespace", "k8s.io", "-id", "c1", "-address", "/run/c.sock"]
    body = warm.encode_request(argv, "/run/bundle dir", env)
    got_argv, cwd, got_env = warm.decode_request(body)
    assert got_argv == argv and cwd == "/run/bundle dir"
    assert got_env["PATH"] == env["PATH"] and got_env["EMPTY"] == "" and got_env["WITH"] == "EQUALS=a=b"


@pytest.mark.parametrize("body", [b"", b"nope", warm.MAGIC + b"\0/\0x", warm.MAGIC + b"\0/\0" + b"5\0a"])
def test_garbage_requests_are_refused(body):
    with pytest.raises(ValueError):
        warm.decode_request(body)


def test_template_socket_is_per_containerd_and_binary():
    a = warm.template_socket("/run/containerd/containerd.sock", "/usr/bin/shim")
    assert a.startswith("\0kybernate-warm-")  # abstract: nothing on disk
    assert a != warm.template_socket("/run/other/containerd.sock", "/usr/bin/shim")
    assert a != warm.template_socket("/run/containerd/containerd.sock", "/opt/shim")
    assert len(a) < 108


def test_disable_switch():
    assert warm.enabled({}) is True
    assert warm.enabled({"KYBERNATE_WARM": "0"}) is False
    assert warm.enabled({"KYBERNATE_WARM": "off"}) is False


def test_set_cmdline_changes_what_ps_shows():
    code = ("import sys; from shim.binary.warm import set_cmdline; "
            "ok = set_cmdline(['/usr/bin/containerd-shim-kybernate-v1', '-id', 'a-rather-long-container-id-42']); "
            "print(ok); print(open('/proc/self/cmdline', 'rb').read())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))))
    ok, cmdline = out.stdout.splitlines()
    if ok != "True":
        pytest.skip("PR_SET_MM_MAP not permitted here")
    assert cmdline == repr(b'/usr/bin/containerd-shim-kybernate-v1\x00-id\x00a-rather-long-container-id-42\x00')


def test_boot_socket_marks_a_template_on_its_way():
    import socket

    path = warm.template_socket(f"/run/test-{os.getpid()}/containerd.sock", "/x")
    assert warm.template_coming(path) is False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(warm.boot_socket(path))
    s.listen(1)
    try:
        assert warm.template_coming(path) is True
    finally:
        s.close()
    assert warm.template_coming(path) is False
