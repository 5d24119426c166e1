"""Attacks on checkpoint and restore from a pod's position, through `ctr run --annotation`/`--env` and
containerd's Tasks API, as issue 13 reproduced them on the old code (run on containerd 1.6 and 2.1:
KYB_CONTAINERD_VERSIONS=1.6 / 2.1). Each test asserts the refusal, the audit line in the shim's log
(containerd's log), and that nothing happened:

- kybernate.io/criu-plugin-dir naming a directory with a .so whose constructor writes a marker: the
  Create is refused, alone or together with a restore-from that points at a fake image in another
  container's rootfs; the marker never appears (a control shows that the same .so, in the node's own
  plugin dir, is loaded by CRIU: the payload works);
- kybernate.io/restore-from with /etc, '..', a symbolic link out of the scope, another containerd
  namespace's checkpoint, a path into a container's rootfs, a missing name: refused with one
  sentence (only the value differs), PermissionDenied from the shim, the reason in the audit line; a
  control restores the same checkpoint by its name in the scope;
- RESTORE_FROM in the env (the image's or the pod's) is ignored: the container starts fresh;
- Tasks.Checkpoint with image_path=/etc, a relative path, a path inside the rootfs, an existing
  non-empty directory: refused, the task keeps running, nothing is written or removed.
The CRI side (pod annotations through CRI, another Kubernetes namespace) is in test_cri.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from .checkpoint_support import (RESTORE_ANNOTATION, api_checkpoint, audit_lines, bundle_dir, counting_past,
                                 leftovers_of, log_counts, read_count, remove, run_counter, store_image,
                                 task_status, wait_until)
from .harness import BUSYBOX_REF, KYBERNATE_RUNTIME

PLUGIN_DIR_ANNOTATION = "kybernate.io/criu-plugin-dir"
REFUSED = "no checkpoint of that name that this container may restore from"

MARKER_SO = r"""
#include <fcntl.h>
#include <unistd.h>
__attribute__((constructor)) static void kybernate_test_marker(void) {
    int fd = open(MARKER, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) { write(fd, "loaded\n", 7); close(fd); }
}
"""


@pytest.fixture
def marker_plugin(tmp_path):
    """(plugin dir holding evil.so, the marker file its constructor writes when anything loads it)."""
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc) to build the marker .so")
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    marker = tmp_path / "marker"
    source = tmp_path / "evil.c"
    source.write_text(MARKER_SO)
    subprocess.run([cc, "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(plugins / "evil.so"), str(source)],
                   check=True, capture_output=True, timeout=60)
    return plugins, marker


def refused_run(cd, cid, *flags: str) -> str:
    """`ctr run` that the shim must refuse: its stderr; nothing of the container is left."""
    r = cd.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME, *flags, BUSYBOX_REF, cid, "sleep", "60", check=False)
    assert r.returncode != 0, f"the shim accepted {flags}: {r.stdout}"
    assert wait_until(lambda: leftovers_of(cd, cid) == [], 10), leftovers_of(cd, cid)
    remove(cd, cid)
    return r.stderr


def _counting(cd, cid):
    assert counting_past(cd, cid, 3) is not None, f"{cid} does not count"


# ---- code loading: the CRIU plugin dir ------------------------------------------------------------
def test_the_marker_plugin_is_loaded_from_the_nodes_plugin_dir(containerd, container_id, marker_plugin, tmp_path):
    """Control: the payload works. The node's own plugin dir (node config, trusted) reaches CRIU, which
    dlopens evil.so at the checkpoint and so runs its constructor (as root)."""
    cd, cid = containerd, container_id
    plugins, marker = marker_plugin
    with cd.node_config(criu={"plugin_dir": str(plugins)}):
        run_counter(cd, cid, KYBERNATE_RUNTIME)
    try:
        _counting(cd, cid)
        try:
            api_checkpoint(cd, cid, image_path=str(tmp_path / "img"))
        except grpc.RpcError:
            pass  # CRIU may refuse a plugin without a descriptor: it has loaded it by then
        assert marker.exists(), "CRIU did not load a plugin from the node's plugin dir"
    finally:
        remove(cd, cid)


def test_a_plugin_dir_annotation_is_refused_and_nothing_is_loaded(containerd, container_id, marker_plugin, tmp_path):
    """The annotation alone, and with a restore-from at a fake image inside another container's rootfs
    (what the pod controls, seen from the host): refused at Create, PermissionDenied naming the key;
    a checkpoint of a container on this node loads nothing from that dir."""
    cd, cid = containerd, container_id
    plugins, marker = marker_plugin
    other = f"{cid}-other"
    run_counter(cd, other, KYBERNATE_RUNTIME)
    try:
        _counting(cd, other)
        fake = bundle_dir(cd, other) / "rootfs" / "tmp" / "fake-image"
        fake.mkdir()
        (fake / "inventory.img").write_bytes(bytes.fromhex("16313158") + b"\0" * 12)
        (fake / "pstree.img").write_bytes(bytes.fromhex("1943565430302750") + b"\0" * 8)
        for flags in (["--annotation", f"{PLUGIN_DIR_ANNOTATION}={plugins}"],
                      ["--annotation", f"{PLUGIN_DIR_ANNOTATION}={plugins}",
                       "--annotation", f"{RESTORE_ANNOTATION}={fake}"]):
            err = refused_run(cd, cid, *flags)
            assert f"create container {cid}: {PLUGIN_DIR_ANNOTATION}={str(plugins)!r}" in err, err
            assert "plugin dir comes only from the node's config" in err, err
        assert len(audit_lines(cd, f"container={cid}", f"key={PLUGIN_DIR_ANNOTATION}")) >= 2
        assert f"rpc create {cid}: PERMISSION_DENIED" in cd.log_text()
        # the restore-from alone is refused too (a path in a rootfs is no checkpoint of the pod's)
        err = refused_run(cd, cid, "--annotation", f"{RESTORE_ANNOTATION}={fake}")
        assert REFUSED in err, err
        # a checkpoint on this node (default node config): CRIU runs, loads nothing of the pod's
        api_checkpoint(cd, other, image_path=str(tmp_path / "img"))
        assert (tmp_path / "img" / "inventory.img").exists()
        assert not marker.exists(), "the pod's plugin was loaded"
    finally:
        remove(cd, other)


# ---- restore-from: the scope ----------------------------------------------------------------------
@pytest.fixture
def victim(containerd, container_id, tmp_path):
    """A counter's checkpoint (with exit) in this namespace's scope ("victim/ck"), and a copy of it as
    another containerd namespace's checkpoint in the store: (own image, other namespace's image)."""
    cd = containerd
    src = f"{container_id}-victim"
    run_counter(cd, src, KYBERNATE_RUNTIME)
    try:
        _counting(cd, src)
        image, _ = store_image(cd, src)
        api_checkpoint(cd, src, image_path=str(image), exit=True)
        assert wait_until(lambda: task_status(cd, src) == "STOPPED", 10)
    finally:
        remove(cd, src)
    other = cd.checkpoint_store / f"{cd.namespace}-other" / "_" / src / "ck"
    shutil.copytree(image, other, symlinks=True)
    for d in (other, other.parent, other.parent.parent, other.parent.parent.parent):
        d.chmod(0o700)
    yield image, other


def test_restore_from_outside_the_scope_is_refused_with_one_sentence(containerd, container_id, victim, tmp_path):
    cd, cid = containerd, container_id
    own, other = victim
    scope = cd.checkpoint_store / cd.namespace / "_"
    (scope / "link-out").symlink_to(other.parent)                  # a link in the scope, pointing out
    (scope / "link-in").symlink_to(own.parent)                     # links are never followed, even inside
    attempts = {
        "/etc": "/etc",
        "dotdot": f"../../{other.relative_to(cd.checkpoint_store)}",
        "other-namespace": str(other),
        "link-out": "link-out/ck",
        "link-in": f"link-in/{own.name}",
        "missing": f"{own.parent.name}/nope",
        "not-an-image": str(scope / own.parent.name),              # a directory of the scope, no image
        "host-dir": str(cd.state),                                 # outside the store and the restore roots
    }
    etc_before = sorted(os.listdir("/etc"))
    shapes = set()
    for case, value in attempts.items():
        err = refused_run(cd, cid, "--annotation", f"{RESTORE_ANNOTATION}={value}")
        sentence = f"restore container {cid}: {RESTORE_ANNOTATION}={value!r}: {REFUSED}"
        assert sentence in err, (case, err)
        shapes.add(err.replace(repr(value), "VALUE"))
        lines = audit_lines(cd, f"container={cid}", f"key={RESTORE_ANNOTATION}", f"value={value!r}")
        assert lines and "detail=" in lines[-1], (case, lines)
    assert len(shapes) == 1, f"the refusals differ beyond the value: {shapes}"
    assert sorted(os.listdir("/etc")) == etc_before
    # control: the same checkpoint, named in the scope, restores (the refusals were not about the image)
    restored = f"{cid}-r"
    try:
        run_counter(cd, restored, KYBERNATE_RUNTIME, "--annotation",
                    f"{RESTORE_ANNOTATION}={own.parent.name}/{own.name}")
        assert task_status(cd, restored) == "RUNNING"
        assert wait_until(lambda: read_count(cd, restored) > 3, 10)
    finally:
        remove(cd, restored)


def test_restore_from_in_the_env_is_ignored(containerd, container_id, victim, tmp_path):
    """RESTORE_FROM in a container's env (an image's Env, or a pod's) names a checkpoint, even one in
    its own scope: ignored, the container starts fresh, and the node's audit log says so."""
    cd, cid = containerd, container_id
    own, other = victim
    for n, value in enumerate((f"{own.parent.name}/{own.name}", str(other))):
        log = tmp_path / f"fresh-{n}.log"
        run_counter(cd, f"{cid}-{n}", KYBERNATE_RUNTIME, "--env", f"RESTORE_FROM={value}", log=log)
        try:
            assert wait_until(lambda: log_counts(log), 10)
            assert log_counts(log)[0] == 1, f"RESTORE_FROM={value} restored the container"
            assert audit_lines(cd, "AUDIT ignored", f"container={cid}-{n}", "key=env RESTORE_FROM",
                               f"value={value!r}")
        finally:
            remove(cd, f"{cid}-{n}")
    # where the node accepts it, it is held to the scope like the annotation
    with cd.node_config(checkpoint={"accept_restore_from_env": True}):
        err = refused_run(cd, cid, "--env", f"RESTORE_FROM={other}")
    assert f"env RESTORE_FROM={str(other)!r}: {REFUSED}" in err, err


# ---- Tasks.Checkpoint: where the image may go ------------------------------------------------------
def _tree(path: Path) -> dict:
    """Every entry below path with its size and mtime (what a refused checkpoint must not change)."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


def test_checkpoint_image_paths_are_bound_by_sanity(containerd, container_id, tmp_path):
    cd, cid = containerd, container_id
    run_counter(cd, cid, KYBERNATE_RUNTIME)
    try:
        _counting(cd, cid)
        bundle = bundle_dir(cd, cid)
        full = tmp_path / "full"
        full.mkdir()
        (full / "keep").write_text("mine\n")
        etc_before = sorted(os.listdir("/etc"))
        bundle_before = {p: v for p, v in _tree(bundle).items() if "/rootfs/tmp/count" not in p}
        full_before = _tree(full)
        # the host's /etc last: a shim that let the others through has failed before it writes there
        cases = [("image_path", str(full)), ("image_path", "ckpt"),
                 ("image_path", str(bundle / "rootfs" / "tmp" / "x")), ("image_path", str(bundle / "ckpt")),
                 ("work_path", "work"), ("work_path", str(full)),
                 ("image_path", "/etc"), ("work_path", "/etc")]
        for key, value in cases:
            fields = {key: value} if key == "image_path" else {"image_path": str(tmp_path / "img"), key: value}
            with pytest.raises(grpc.RpcError) as refused:
                api_checkpoint(cd, cid, **fields)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (key, value, refused.value.details())
            assert f"checkpoint container {cid}: CheckpointOptions.{key}={value!r}" in refused.value.details()
            assert audit_lines(cd, f"container={cid}", f"key=CheckpointOptions.{key}", f"value={value!r}")
            assert task_status(cd, cid) == "RUNNING"
        assert sorted(os.listdir("/etc")) == etc_before and not os.path.exists("/etc/inventory.img")
        bundle_after = {p: v for p, v in _tree(bundle).items() if "/rootfs/tmp/count" not in p}
        assert bundle_after.keys() == bundle_before.keys(), set(bundle_after) ^ set(bundle_before)
        assert _tree(full) == full_before and (full / "keep").read_text() == "mine\n"
        assert not (tmp_path / "img").exists()
        _counting(cd, cid)
        # control: a new directory is fine
        api_checkpoint(cd, cid, image_path=str(tmp_path / "img"))
        assert (tmp_path / "img" / "inventory.img").exists()
    finally:
        remove(cd, cid)
