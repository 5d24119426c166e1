"""A restore that hangs inside CRIU (issue #14): the shim's deadline kills runc and CRIU and undoes
the restore; a Kill while it hangs does the same at once; nothing is left, nothing outside the
container's own cgroup is touched.

CRIU is real for the checkpoint. For the restore, a `criu` earlier on the shim's PATH (runc runs the
first one it finds) stands in for a CRIU that never answers, once a flag file exists (runc's version
check still gets the real one): that is how
CRIU 4.1.1 behaves on a truncated page image when the shim's own check is bypassed. containerd 1.6.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from .checkpoint_support import (RESTORE_ANNOTATION, api_checkpoint, counting_past, leftovers_of, remove,
                                 run_counter, task_status, wait_until)
from .harness import KYBERNATE_RUNTIME, Containerd, _all_pids, _cmdline, unavailable_reason

DEADLINE_S = 4


KILL_TEST_DEADLINE_S = 120  # long: the Kill, not the deadline, must end that restore


@pytest.fixture
def stuck_cd(request, tmp_path):
    deadline = getattr(request, "param", DEADLINE_S)
    reason = unavailable_reason("1.6")
    if reason:
        pytest.skip(reason)
    hang = tmp_path / "hang"
    wrap = tmp_path / "criu-bin"
    wrap.mkdir()
    cd = Containerd("1.6", tmp_path / "cd")
    real = cd.which("criu")
    assert real, "no criu on containerd's PATH"
    # runc runs `criu swrk` twice for a restore: a version check, then the restore itself (the one to hang)
    (wrap / "criu").write_text(f"#!/bin/sh\nif [ -e {hang} ]; then\n  if [ -e {hang}.seen ]; then exec python3 -c 'import time; time.sleep(3600)' "
                               f"kybernate-stuck-criu; fi\n  touch {hang}.seen\nfi\nexec {real} \"$@\"\n")
    os.chmod(wrap / "criu", 0o755)
    cd.env["PATH"] = f"{wrap}{os.pathsep}{cd.env['PATH']}"
    cd.write_node_config(criu={"restore_timeout_s": deadline})  # the harness's store and restore roots, too
    cd.start()
    try:
        cd.import_busybox()
        yield cd, hang
    finally:
        cd.stop()


def _image(cd: Containerd, cid: str, tmp_path: Path) -> Path:
    src = f"{cid}-src"
    run_counter(cd, src, KYBERNATE_RUNTIME)
    try:
        assert counting_past(cd, src, 3) is not None
        image = tmp_path / "image"
        api_checkpoint(cd, src, image_path=str(image), exit=True)
        assert wait_until(lambda: task_status(cd, src) == "STOPPED", 10)
    finally:
        remove(cd, src)
    return image


def _stuck_criu_pids() -> list[int]:
    return [p for p in _all_pids() if "kybernate-stuck-criu" in _cmdline(p)]


def _sentinel_cgroups(token: str) -> list[Path]:
    """An empty cgroup of the host's in every hierarchy: what a walk into CRIU's cgroup yard (the
    host's hierarchies mounted under its work dir) would remove. Other tests run beside this one, so
    the host's whole set of cgroups cannot be compared; these must simply survive."""
    made = []
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        if hierarchy.is_dir() and (hierarchy / "cgroup.procs").exists():
            target = hierarchy / f"kyb-sentinel-{token}"
            try:
                target.mkdir()
            except OSError:
                continue
            made.append(target)
    if (Path("/sys/fs/cgroup") / "cgroup.procs").exists() and not made:  # cgroup v2 only
        target = Path("/sys/fs/cgroup") / f"kyb-sentinel-{token}"
        target.mkdir()
        made.append(target)
    return made


def test_a_restore_stuck_in_criu_is_killed_at_its_deadline_and_leaves_nothing(stuck_cd, tmp_path):
    cd, hang = stuck_cd
    cid = "stuck-deadline"
    image = _image(cd, cid, tmp_path)
    sentinels = _sentinel_cgroups(cid)
    hang.touch()
    t0 = time.monotonic()
    r = cd.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME, "--annotation", f"{RESTORE_ANNOTATION}={image}",
               "docker.io/kybernate/busybox:test", cid, "sh", "-c", "echo fresh", check=False, timeout=90)
    took = time.monotonic() - t0
    assert r.returncode != 0
    assert took < DEADLINE_S + 20, f"ctr run took {took:.1f} s"
    assert f"restore container {cid}" in r.stderr and f"deadline of {DEADLINE_S} s" in r.stderr, r.stderr
    assert "CRIU's log:" in r.stderr, r.stderr
    assert wait_until(lambda: _stuck_criu_pids() == [], 5), _stuck_criu_pids()
    assert task_status(cd, cid) == "STOPPED"
    assert [x for x in leftovers_of(cd, cid, shims=False) if not x.startswith("task ")] == []
    cd.ctr("tasks", "delete", cid)
    cd.ctr("containers", "delete", cid)
    assert wait_until(lambda: leftovers_of(cd, cid) == [], 10), leftovers_of(cd, cid)
    try:
        assert sentinels and all(s.is_dir() for s in sentinels), "empty cgroups of the host were removed"
    finally:
        for s in sentinels:
            s.rmdir()


@pytest.mark.parametrize("stuck_cd", [KILL_TEST_DEADLINE_S], indirect=True)
def test_kill_during_a_stuck_restore_ends_it_at_once(stuck_cd, tmp_path):
    cd, hang = stuck_cd
    cid = "stuck-kill"
    image = _image(cd, cid, tmp_path)
    hang.touch()
    result = {}

    def run() -> None:
        result["r"] = cd.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME, "--annotation",
                             f"{RESTORE_ANNOTATION}={image}", "docker.io/kybernate/busybox:test", cid,
                             "sh", "-c", "echo fresh", check=False, timeout=KILL_TEST_DEADLINE_S + 30)

    runner = threading.Thread(target=run)
    runner.start()
    assert wait_until(lambda: _stuck_criu_pids(), 20), "the restore never reached CRIU"
    t0 = time.monotonic()
    k = cd.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False, timeout=30)
    runner.join(KILL_TEST_DEADLINE_S + 40)
    took = time.monotonic() - t0
    assert k.returncode == 0, k.stderr
    assert not runner.is_alive() and took < 20, f"the restore ended {took:.1f} s after the kill"
    r = result["r"]
    assert r.returncode != 0 and f"restore container {cid}" in r.stderr, r.stderr
    assert wait_until(lambda: _stuck_criu_pids() == [], 5)
    cd.ctr("tasks", "delete", cid)
    cd.ctr("containers", "delete", cid)
    assert wait_until(lambda: leftovers_of(cd, cid) == [], 10), leftovers_of(cd, cid)
