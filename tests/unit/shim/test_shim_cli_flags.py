"""containerd's shim command line, parsed like Go's flag package."""
import pytest

from shim.binary.cli import Flags, UsageError, main, parse_flags


def test_start_command_line_as_containerd_writes_it():
    f = parse_flags(["-namespace", "k8s.io", "-address", "/run/containerd/containerd.sock",
                     "-publish-binary", "/usr/bin/containerd", "-id", "abc", "-debug", "start"],
                    environ={"TTRPC_ADDRESS": "/run/containerd/containerd.sock.ttrpc"})
    assert (f.namespace, f.address, f.publish_binary, f.id, f.debug, f.action) == (
        "k8s.io", "/run/containerd/containerd.sock", "/usr/bin/containerd", "abc", True, "start")
    assert f.ttrpc_address == "/run/containerd/containerd.sock.ttrpc"


def test_delete_with_bundle_flag_and_equals_syntax():
    f = parse_flags(["--namespace=default", "-id=x1", "-bundle", "/b", "-address=/a", "delete"], environ={})
    assert (f.namespace, f.id, f.bundle, f.address, f.action) == ("default", "x1", "/b", "/a", "delete")
    assert f.bundle_path == "/b"


def test_daemon_has_no_action_and_bool_forms():
    f = parse_flags(["-namespace", "n", "-id", "i", "-debug=false"], environ={})
    assert f.action == "" and f.debug is False
    assert parse_flags(["-debug=true"], environ={}).debug is True
    assert parse_flags(["-v"], environ={}).version is True


def test_parsing_stops_at_the_action_and_double_dash():
    f = parse_flags(["-id", "a", "start", "-debug"], environ={})
    assert f.action == "start" and f.debug is False
    f = parse_flags(["-id", "a", "--", "-weird"], environ={})
    assert f.action == "-weird"


@pytest.mark.parametrize("argv,msg", [
    (["-nope", "x"], "flag provided but not defined: -nope"),
    (["-namespace"], "flag needs an argument: -namespace"),
    (["-debug=maybe"], "invalid boolean value"),
    (["---x"], "bad flag syntax"),
    (["-=x"], "bad flag syntax"),
])
def test_bad_command_lines(argv, msg):
    with pytest.raises(UsageError) as info:
        parse_flags(argv, environ={})
    assert msg in str(info.value)


def test_main_exit_codes(capsys):
    assert main(["-nope"]) == 2
    assert "flag provided but not defined" in capsys.readouterr().err
    assert main(["-id", "x", "start"]) == 1  # no namespace
    assert "namespace cannot be empty" in capsys.readouterr().err
    assert main(["-namespace", "n", "-id", "x", "frobnicate"]) == 2
    assert "unknown action" in capsys.readouterr().err
    assert main(["-v"]) == 0
    assert "containerd-shim-kybernate-v1" in capsys.readouterr().out


def test_flags_equality_and_repr():
    assert Flags(id="a") == Flags(id="a")
    assert Flags(id="a") != Flags(id="b")
    assert "id='a'" in repr(Flags(id="a"))
