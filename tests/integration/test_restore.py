"""Restore through the kybernate shim (containerd 1.6, 1.7, 2.1): a container whose spec carries the
annotation kybernate.io/restore-from=NAME (a checkpoint in its scope of the node's checkpoint store,
or a directory beneath the node config's restore_roots: the harness's is pytest's tmp dir) is
restored from that CRIU image on Create (the Kubernetes way: kubelet only creates containers); so is
one with RESTORE_FROM=NAME in its env where the node config accepts that. Never the CRI sandbox. A
bad image is refused before anything is created, with one sentence for every reason, and a restore
that CRIU fails leaves nothing. (containerd's own `ctr c restore --live` flow is in
test_checkpoint.py; the attacks on all this are in test_attack_restore.py.)
"""
from __future__ import annotations

import os
import shutil

import grpc
import pytest

from .checkpoint_support import (RESTORE_ANNOTATION, api_checkpoint, api_create_task, audit_lines, bundle_dir,
                                 counting_past, leftovers_of, log_counts, mounts_under, read_count, refused_code,
                                 remove, run_counter, store_image, task_status, wait_until, hold_counter)
from .harness import KYBERNATE_RUNTIME


@pytest.fixture
def counter_image(containerd, container_id, tmp_path):
    """A checkpoint (with exit) of a counter in the checkpoint store: (image dir, its name for
    kybernate.io/restore-from, last value in its stdout log)."""
    cd = containerd
    src = f"{container_id}-src"
    log = tmp_path / "src.log"
    run_counter(cd, src, KYBERNATE_RUNTIME, log=log)
    try:
        assert counting_past(cd, src, 3) is not None
        hold_counter(cd, src)  # parked between writes: no /tmp/count open in the dump
        image, name = store_image(cd, src)
        api_checkpoint(cd, src, image_path=str(image), exit=True)
        assert wait_until(lambda: task_status(cd, src) == "STOPPED", 10)
        yield image, name, log_counts(log)[-1]
    finally:
        remove(cd, src)


@pytest.mark.parametrize("how", ["annotation", "absolute-annotation", "env", "restore-root"])
def test_restore_on_create(containerd, container_id, counter_image, tmp_path, how):
    """By name in the store (relative, or the absolute path of a checkpoint in the scope), by
    RESTORE_FROM where the node accepts it, and from a copy beneath a restore root."""
    cd, cid = containerd, container_id
    image, name, last_before = counter_image
    accept_env = {"checkpoint": {"accept_restore_from_env": True}} if how == "env" else {}
    if how == "restore-root":
        shutil.copytree(image, tmp_path / "copy", symlinks=True)
    flag = {"annotation": ["--annotation", f"{RESTORE_ANNOTATION}={name}"],
            "absolute-annotation": ["--annotation", f"{RESTORE_ANNOTATION}={image}"],
            "env": ["--env", f"RESTORE_FROM={name}"],
            "restore-root": ["--annotation", f"{RESTORE_ANNOTATION}={tmp_path / 'copy'}"]}[how]
    log = tmp_path / "restored.log"
    with cd.node_config(**accept_env):
        run_counter(cd, cid, KYBERNATE_RUNTIME, *flag, log=log)
    first_after = wait_until(lambda: (log_counts(log) or [None])[0], 10)
    # the restored process writes to the new task's stdout, and goes on from where it was
    assert first_after == last_before + 1, (last_before, log.read_text()[:200])
    assert counting_past(cd, cid, first_after, 10) is not None
    assert task_status(cd, cid) == "RUNNING"


def test_cri_sandbox_is_never_restored(containerd, container_id, counter_image, tmp_path):
    """A pod annotation reaches the sandbox container too; the sandbox starts fresh."""
    cd, cid = containerd, container_id
    _, name, _ = counter_image
    log = tmp_path / "sandbox.log"
    run_counter(cd, cid, KYBERNATE_RUNTIME, "--annotation", f"{RESTORE_ANNOTATION}={name}",
                "--annotation", "io.kubernetes.cri.container-type=sandbox", log=log)
    assert wait_until(lambda: log_counts(log), 10)
    assert log_counts(log)[0] == 1, "the sandbox was restored instead of started"


def _bad_image(kind: str, tmp_path, good=None):
    d = tmp_path / f"bad-{kind}"
    if kind == "missing":
        return d, "does not exist"
    d.mkdir()
    if kind == "empty":
        return d, "is empty"
    if kind == "corrupt":
        (d / "inventory.img").write_bytes(b"\x00" * 64)
        (d / "pstree.img").write_bytes(b"\x00" * 64)
        return d, "corrupt"
    raise ValueError(kind)


REFUSED = "no checkpoint of that name that this container may restore from"


@pytest.mark.parametrize("kind", ["missing", "empty", "corrupt"])
def test_restore_from_a_bad_image_is_refused_and_leaves_nothing(containerd, container_id, tmp_path, kind):
    """A pod must not learn which host paths exist: every bad image gets the same sentence and
    PermissionDenied; the reason is in the node's audit line. The image checks themselves: on a node
    that does not require seals (where one does, an unsealed directory is refused before them:
    test_attack_seal.py)."""
    cd, cid = containerd, container_id
    image, words = _bad_image(kind, tmp_path)
    with cd.node_config(checkpoint={"require_seal": False}):
        r = cd.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME, "--annotation", f"{RESTORE_ANNOTATION}={image}",
                   "docker.io/kybernate/busybox:test", cid, "sleep", "60", check=False)
    assert r.returncode != 0
    assert f"restore container {cid}: {RESTORE_ANNOTATION}={str(image)!r}: {REFUSED}" in r.stderr, r.stderr
    assert words not in r.stderr.replace(str(image), ""), r.stderr
    assert wait_until(lambda: leftovers_of(cd, cid) == [], 10), leftovers_of(cd, cid)
    assert not bundle_dir(cd, cid).exists() or not mounts_under(bundle_dir(cd, cid) / "rootfs")
    if kind == "missing":
        assert not image.exists()
    assert [line for line in audit_lines(cd, f"container={cid}", f"key={RESTORE_ANNOTATION}") if words in line]
    # the gRPC code, through containerd's Tasks API (ctr of 2.1 does not print it)
    with cd.node_config(checkpoint={"require_seal": False}), pytest.raises(grpc.RpcError) as refused:
        api_create_task(cd, cid)
    assert refused.value.code().name == refused_code(cd), (refused.value.code(), refused.value.details())
    assert REFUSED in refused.value.details()
    assert f"rpc create {cid}: PERMISSION_DENIED restore container {cid}" in cd.log_text()  # the shim's own code
    assert wait_until(lambda: leftovers_of(cd, cid) == [], 10), leftovers_of(cd, cid)


def test_restore_that_criu_fails_leaves_nothing(containerd, container_id, counter_image, tmp_path):
    """An image that passes the checks but whose memory layout (mm-*.img) is gone: CRIU fails the restore; the
    error quotes CRIU's log; no process, runc state, cgroup or mount is left, and the task goes away
    with an ordinary delete."""
    cd, cid = containerd, container_id
    image, _, _ = counter_image
    damaged = tmp_path / "damaged"
    shutil.copytree(image, damaged)
    for mm in damaged.glob("mm-*.img"):  # the memory layout: gone (page images intact, sizes right)
        mm.unlink()
    # sealed again with the node's key: a trusted image that CRIU cannot restore (test_attack_seal.py
    # has the untrusted ones, refused before CRIU)
    from shim.checkpoint import seal

    seal.seal(str(damaged), cd.seal_key, seal.identity_of(cd.namespace, {}, cid))
    r = cd.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME, "--annotation", f"{RESTORE_ANNOTATION}={damaged}",
               "docker.io/kybernate/busybox:test", cid, "sh", "-c", "echo fresh", check=False)
    assert r.returncode != 0
    assert f"restore container {cid}" in r.stderr and "CRIU restore failed" in r.stderr, r.stderr
    # containerd still has the (stopped) task, and so its shim; nothing else is left
    assert task_status(cd, cid) == "STOPPED", cd.ctr("tasks", "ls").stdout
    left = [x for x in leftovers_of(cd, cid, shims=False) if not x.startswith("task ")]
    assert left == [], left
    cd.ctr("tasks", "delete", cid)
    cd.ctr("containers", "delete", cid)
    assert wait_until(lambda: leftovers_of(cd, cid) == [], 10), leftovers_of(cd, cid)
    assert not bundle_dir(cd, cid).exists()


def test_restore_of_a_terminal_task_gets_the_new_console(containerd, container_id, tmp_path):
    """`ctr run -d -t`: the restored process writes to the new task's console (a pty the shim got
    through runc's console socket), not to the old one."""
    from .checkpoint_support import task_pid
    from .test_shim_ctr import run_in_pty

    cd, cid = containerd, container_id
    ctr = [str(cd.install.ctr), "--address", cd.address, "--namespace", cd.namespace]
    counter = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; echo $i; sleep 0.1; done"
    rc, out = run_in_pty(ctr + ["run", "-d", "-t", "--runtime", KYBERNATE_RUNTIME, "docker.io/kybernate/busybox:test",
                                cid, "sh", "-c", counter], cd.env, 30)
    assert rc == 0, out
    assert counting_past(cd, cid, 3) is not None
    image = tmp_path / "image"
    api_checkpoint(cd, cid, image_path=str(image), exit=True)
    assert wait_until(lambda: task_status(cd, cid) == "STOPPED", 10)
    before = read_count(cd, cid)
    remove(cd, cid)
    rc, out = run_in_pty(ctr + ["run", "-d", "-t", "--runtime", KYBERNATE_RUNTIME,
                                "--annotation", f"{RESTORE_ANNOTATION}={image}", "docker.io/kybernate/busybox:test",
                                cid, "sh", "-c", counter], cd.env, 30)
    assert rc == 0, out
    after = counting_past(cd, cid, before)
    assert after is not None and after <= before + 20, (before, after)
    pid = task_pid(cd, cid)
    assert os.readlink(f"/proc/{pid}/fd/1").startswith("/dev/pts/"), os.readlink(f"/proc/{pid}/fd/1")
    # the console works: the shim still copies from it (a full, undrained pty would stop the counter)
    assert counting_past(cd, cid, after + 10, 10) is not None


@pytest.mark.parametrize("cut", [36864, 0])
def test_a_truncated_page_image_is_refused_before_criu_runs(containerd, container_id, counter_image, tmp_path, cut):
    """CRIU 4.1.1's restorer spins for ever on a page image cut short (its log grew 40 MB/s): the
    shim compares every page image with its pagemaps first. Refused at Create, CRIU never started;
    the pod gets the one sentence of every refused restore-from, the audit line names the file. The
    image is sealed again after the cut (a node's own broken image): the seal passes, the pagemap check
    refuses (an image cut by anyone else is the seal's refusal: test_attack_seal.py)."""
    from shim.checkpoint import seal

    cd, cid = containerd, container_id
    image, _, _ = counter_image
    damaged = tmp_path / "truncated"
    shutil.copytree(image, damaged)
    biggest = max(damaged.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    os.truncate(biggest, cut)
    seal.seal(str(damaged), cd.seal_key, seal.identity_of(cd.namespace, {}, cid))
    r = cd.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME, "--annotation", f"{RESTORE_ANNOTATION}={damaged}",
               "docker.io/kybernate/busybox:test", cid, "sh", "-c", "echo fresh", check=False, timeout=60)
    assert r.returncode != 0
    assert f"restore container {cid}: {RESTORE_ANNOTATION}={str(damaged)!r}: {REFUSED}" in r.stderr, r.stderr
    assert audit_lines(cd, f"container={cid}", f"key={RESTORE_ANNOTATION}", biggest.name), cd.log_tail(20)
    assert not (damaged / "restore.log").exists()
    assert leftovers_of(cd, cid) == [], leftovers_of(cd, cid)
