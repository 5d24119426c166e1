"""fsutil.atomic: the one atomic writer. Whole old file or whole new file, the mode asked for, the file
and its directory fsync'ed, nothing left behind on failure, and light enough for the shim's `start`."""
import os
import stat
import subprocess
import sys

import pytest

from fsutil import atomic
from fsutil.atomic import atomic_write


def test_writes_text_and_bytes_and_replaces(tmp_path):
    target = tmp_path / "state.json"
    atomic_write(target, '{"a": "ä"}')
    assert target.read_bytes() == '{"a": "ä"}'.encode()
    atomic_write(str(target), b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["state.json"]


def test_mode_is_exact_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "a", "x")
        atomic_write(tmp_path / "b", "x", mode=0o640)
        atomic_write(tmp_path / "c", "x", mode=0o666)
    finally:
        os.umask(old)
    assert {n: stat.S_IMODE((tmp_path / n).stat().st_mode) for n in "abc"} == {"a": 0o644, "b": 0o640,
                                                                              "c": 0o666}


def test_file_and_directory_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    atomic_write(tmp_path / "f", "data")
    assert events == ["fsync file", "rename", "fsync dir"]
    events.clear()
    atomic_write(tmp_path / "g", "bundle file", mode=0o600, durable=False)  # a bundle's (containerd's /run)
    assert events == ["rename"]
    assert (tmp_path / "g").read_text() == "bundle file" and stat.S_IMODE((tmp_path / "g").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "g"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "config.toml"
    target.write_text("old")

    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(atomic.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["config.toml"]


def test_a_missing_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "no" / "such" / "file", "x")


def test_owner_is_given_when_allowed(tmp_path):
    target = tmp_path / "f"
    if os.geteuid() == 0:
        atomic_write(target, "x", owner=(4321, 4322))
        assert (target.stat().st_uid, target.stat().st_gid) == (4321, 4322)
    else:  # only root gives files away: the writer keeps the file, owned by itself
        atomic_write(target, "x", owner=(0, 0))
        assert target.stat().st_uid == os.geteuid()
    assert target.read_text() == "x"


def test_importing_it_loads_builtins_only():
    """The shim's `start` (every `ctr run`) imports it: no typing, tempfile, random or shutil."""
    code = ("import sys; before = set(sys.modules); import fsutil.atomic; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert set(out) <= {"fsutil", "fsutil.atomic", "errno", "__future__"}, out
