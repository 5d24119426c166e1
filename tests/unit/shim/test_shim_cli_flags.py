"""containerd's shim command line, parsed like Go's flag package; the binary's import plan."""
import ast
import os
import sys
from pathlib import Path

import pytest

from shim.binary.cli import main
from shim.binary.flags import Flags, UsageError, binary_command, identifier_error, parse_flags

BINARY_PACKAGE = Path(__file__).resolve().parents[3] / "shim" / "binary"


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


def test_daemon_args_are_what_containerd_passed():
    f = Flags(namespace="k8s.io", id="c1", address="/run/c.sock", publish_binary="/usr/bin/containerd", debug=True)
    assert f.daemon_args() == ["-namespace", "k8s.io", "-id", "c1", "-address", "/run/c.sock",
                               "-publish-binary", "/usr/bin/containerd", "-debug"]
    assert Flags(namespace="n", id="i", address="/a").daemon_args("warm") == [
        "-namespace", "n", "-id", "i", "-address", "/a", "warm"]
    assert parse_flags(f.daemon_args("start"), environ={}) == Flags(
        namespace="k8s.io", id="c1", address="/run/c.sock", publish_binary="/usr/bin/containerd", debug=True,
        action="start")


def test_binary_command_runs_the_script_or_the_module(monkeypatch, tmp_path):
    script = tmp_path / "containerd-shim-kybernate-v1"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(script), "start"])
    assert binary_command() == [str(script)]
    monkeypatch.setattr(sys, "argv", [str(BINARY_PACKAGE / "cli.py")])
    assert binary_command() == [sys.executable, "-m", "shim.binary.cli"]


@pytest.mark.parametrize("value", ["default", "k8s.io", "a", "a-b_c.d", "0" * 76,
                                   "4f9c7e0a1d2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5"])
def test_containerd_identifiers(value):
    assert identifier_error(value) == ""


@pytest.mark.parametrize("value,why", [
    ("", "empty"), ("0" * 77, "longer than 76"), ("-a", "letters and digits"), ("a-", "end with"),
    ("a..b", "single"), ("../etc", "letters and digits"), ("a/b", "letters and digits"), ("a b", "letters"),
    ("a\x00b", "letters"), ("é", "letters"), (".", "letters"),
])
def test_not_containerd_identifiers(value, why):
    assert why in identifier_error(value)


def _imports(path: Path) -> set[str]:
    """Every shim.binary module `path` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "shim.binary":
                found |= {a.name for a in node.names}
            elif node.module.startswith("shim.binary."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("shim.binary.")}
    return found


def test_the_binarys_imports_go_one_way():
    """The plan drawn in shim/binary/flags.py: no circle, nothing imports cli, the daemon imports none
    of start's modules, and start's hot path (cli, manager, warm) reaches neither template nor daemon."""
    graph = {p.stem: _imports(p) for p in BINARY_PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert not any("cli" in deps for deps in graph.values())
    assert graph["daemon"] <= {"flags", "sockets"}
    assert graph["warm"] <= {"flags", "_digest"}
    assert graph["template"] <= {"flags", "warm", "daemon"}
    assert graph["manager"] <= {"flags", "sockets", "warm", "_digest"}
    for low in ("flags", "sockets", "_digest"):
        assert graph[low] == set(), f"{low} imports {graph[low]}"

    def reach(name, seen=()):
        for dep in graph[name]:
            assert dep not in seen and dep != name, f"import circle through {name} -> {dep}"
            reach(dep, (*seen, name))

    for name in graph:
        reach(name)


def test_start_hot_path_modules_import_only_the_standard_library():
    """flags, sockets and warm are on every `start`: nothing beyond a few builtin modules at import (no
    dataclasses, re, socket, logging, json...)."""
    import subprocess

    code = ("import os, sys; before = set(sys.modules)\n"
            "import shim.binary.cli, shim.binary.manager, shim.binary.warm\n"
            "print(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True,
                         cwd=BINARY_PACKAGE.parents[1], env={"PATH": os.environ.get("PATH", "")}).stdout.split()
    ours = {"shim", "shim.binary", "shim.binary.cli", "shim.binary.flags", "shim.binary.manager",
            "shim.binary.sockets", "shim.binary.warm", "shim.bundle", "fsutil", "fsutil.atomic"}
    assert set(out) <= ours | {"__future__", "errno"}, out
