"""shim.runtime.runc.kill_orphaned: the shim binary's `delete` kills the runc checkpoint/restore (and
their CRIU) that a dead shim left running for this container, and nothing else."""
from __future__ import annotations

import subprocess
import sys
import time

from shim.runtime.runc import kill_orphaned


def _fake_runc(root: str, op: str, cid: str, own_group: bool = True) -> subprocess.Popen:
    """A process whose argv reads `runc --root ROOT OP ... CID` (python under argv[0] 'runc')."""
    code = "import time; time.sleep(60)"
    return subprocess.Popen(["runc", "-c", code, "--root", root, op, "--image-path", "/x", cid],
                            executable=sys.executable, start_new_session=own_group)


def test_the_dead_shims_commands_for_this_container_are_killed_and_only_they(tmp_path):
    root = str(tmp_path / "runc-root")
    mine = [_fake_runc(root, "checkpoint", "c1"), _fake_runc(root, "restore", "c1", own_group=False)]
    others = [_fake_runc(root, "checkpoint", "c2"),                  # another container
              _fake_runc(str(tmp_path / "other-root"), "checkpoint", "c1"),  # another root
              _fake_runc(root, "state", "c1")]                       # not a checkpoint/restore
    time.sleep(0.3)  # argv in place
    try:
        killed = kill_orphaned("/usr/sbin/runc", root, "c1")
        assert sorted(killed) == sorted(p.pid for p in mine)
        for p in mine:
            assert p.wait(5) == -9
        for p in others:
            assert p.poll() is None
    finally:
        for p in mine + others:
            p.kill()
            p.wait(5)


def test_nothing_to_kill_is_no_error(tmp_path):
    assert kill_orphaned("runc", str(tmp_path), "none", wait_s=0.1) == []
