"""Attacks on checkpoint images at rest (issue 13, sealed images), on a real containerd with runc and
CRIU: a checkpoint the shim sealed with the node's key (the harness gives every instance a key and
require_seal = true) is tampered with as someone with write access to the storage could, then restored
through kybernate.io/restore-from. Each tampered image is refused at Create with PermissionDenied naming
the first bad file, with an audit line, before CRIU runs: no restore was attempted, nothing is left (no
process, mount, runc state, cgroup or task), CRIU wrote nothing into the image. The untampered image
restores and its counter goes on.

The attacks: a flipped byte in a page image, a truncated page image, a file swapped in from another
container's checkpoint, a file added, a file replaced by a symlink to its own copy, the seal removed,
a checkpoint of another containerd namespace (another tenant), an image sealed with another key.

The checkpoints are written into the node's checkpoint store (`image_root`, one place), in their
containers' scopes; the tampered copies go to the test's tmp dir, beneath the harness's restore root,
so that the store's resolution (shim.policy.untrusted) accepts them and the seal is what refuses them.
The untampered image restores by its name in the store, relative to the container's scope.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import grpc
import pytest

from shim.checkpoint import seal

from .checkpoint_support import (COUNTER, RESTORE_ANNOTATION, api_create_task, bundle_dir, checkpoint_options,
                                 counting_past, leftovers_of, log_counts, mounts_under, remove, run_counter,
                                 task_status, wait_until)
from .harness import BUSYBOX_REF, KYBERNATE_RUNTIME


@pytest.fixture(scope="module")
def image_root(containerd) -> Path:
    """Where checkpoints are written: the node's store (``<store>/<namespace>/_/<container>/<id>``)."""
    return containerd.checkpoint_store


def _in_store(image_root: Path, namespace: str, cid: str) -> Path:
    from shim.policy.store import make_dirs

    return Path(make_dirs(str(image_root), [namespace, "_", cid])) / "ck"


def _checkpoint_counter(cd, cid: str, image: Path, log: Path, namespace: str | None = None) -> int:
    """A counter container checkpointed (with exit) into image; returns the last count it printed."""
    from kybernate.containerd_api import Containerd as Api

    ns = namespace or cd.namespace
    cd.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME, "--log-uri", f"file://{log}", BUSYBOX_REF, cid,
           "sh", "-c", COUNTER, namespace=ns)
    assert wait_until(lambda: len(log_counts(log)) > 3, 15), log.read_text() if log.exists() else "no log"
    with Api(cd.address) as api:
        api.checkpoint(ns, cid, checkpoint_options(image_path=str(image), exit=True), timeout=120)

    def stopped() -> bool:
        rows = [ln.split() for ln in cd.ctr("tasks", "ls", namespace=ns).stdout.splitlines()[1:]]
        return all(row[-1] == "STOPPED" for row in rows if row and row[0] == cid)

    assert wait_until(stopped, 10)
    return log_counts(log)[-1]


def _remove(cd, cid: str, namespace: str) -> None:
    cd.ctr("tasks", "kill", "-a", "-s", "SIGKILL", cid, namespace=namespace, check=False, timeout=15)
    cd.ctr("tasks", "delete", "-f", cid, namespace=namespace, check=False, timeout=30)
    cd.ctr("containers", "delete", cid, namespace=namespace, check=False, timeout=30)


@pytest.fixture(scope="module")
def checkpoints(containerd, image_root, tmp_path_factory):
    """Sealed checkpoints: 'a' and 'b' of two counters of this namespace, 'foreign' of a counter in
    another containerd namespace (another tenant) on the same node, sealed with the same key.
    Returns ({name: image dir}, last count of a)."""
    cd = containerd
    logs = tmp_path_factory.mktemp("seal-logs")
    other_ns = f"{cd.namespace}-b"
    token = os.urandom(3).hex()
    made = {"a": (f"seal-a-{token}", cd.namespace), "b": (f"seal-b-{token}", cd.namespace),
            "foreign": (f"seal-f-{token}", other_ns)}
    cd.import_busybox(namespace=other_ns)
    images, last = {}, {}
    try:
        for name, (cid, ns) in made.items():
            images[name] = _in_store(image_root, ns, cid)
            last[name] = _checkpoint_counter(cd, cid, images[name], logs / f"{name}.log", namespace=ns)
            assert seal.is_sealed(str(images[name])), sorted(p.name for p in images[name].iterdir())
        yield images, last["a"]
    finally:
        for cid, ns in made.values():
            _remove(cd, cid, ns)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def _largest_pages(image: Path) -> Path:
    return max(image.glob("pages-*.img"), key=lambda p: p.stat().st_size)


def tamper(kind: str, image: Path, images: dict[str, Path], key: bytes, namespace: str, scratch: Path) -> str:
    """Do one attack on image (a copy); returns the file the refusal must name."""
    if kind == "flipped-byte":
        pages = _largest_pages(image)
        _flip(pages, pages.stat().st_size // 2)
        return pages.name
    if kind == "truncated":
        pages = _largest_pages(image)
        os.truncate(pages, pages.stat().st_size // 2)
        return pages.name
    if kind == "swapped-in":
        # a file of the same name from b's checkpoint, a valid sealed image of the same namespace
        other = images["b"]
        name = next(p.name for p in sorted(image.glob("*.img")) if (other / p.name).exists()
                    and (other / p.name).read_bytes() != p.read_bytes())
        shutil.copyfile(other / name, image / name)
        return name
    if kind == "added":
        (image / "pages-99.img").write_bytes(os.urandom(4096))
        return "pages-99.img"
    if kind == "symlink":
        pages = _largest_pages(image)
        copy = scratch / f"{pages.name}.outside"
        shutil.copyfile(pages, copy)
        pages.unlink()
        pages.symlink_to(copy)  # the same bytes, but a link: refused
        return pages.name
    if kind == "unsealed":
        (image / seal.MANIFEST_NAME).unlink()
        return seal.MANIFEST_NAME
    if kind == "another-key":
        seal.seal(str(image), os.urandom(32).hex().encode(), seal.identity_of(namespace, {}, "x"))
        return seal.MANIFEST_NAME
    raise ValueError(kind)


ATTACKS = ["flipped-byte", "truncated", "swapped-in", "added", "symlink", "unsealed", "another-key"]


def _assert_refused_before_criu(cd, cid: str, image: Path, bad_file: str, before: dict[str, bytes],
                                args: list[str]) -> None:
    r = cd.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME, "--annotation", f"{RESTORE_ANNOTATION}={image}",
               *args, BUSYBOX_REF, cid, "sh", "-c", COUNTER, check=False)
    assert r.returncode != 0, r.stdout
    assert f"restore container {cid}" in r.stderr and str(image) in r.stderr and bad_file in r.stderr, r.stderr
    # nothing was created, and CRIU never ran: no restore was started, CRIU wrote nothing into the image
    assert wait_until(lambda: leftovers_of(cd, cid) == [], 10), leftovers_of(cd, cid)
    assert not bundle_dir(cd, cid).exists() or not mounts_under(bundle_dir(cd, cid) / "rootfs")
    assert not (bundle_dir(cd, cid) / "criu-restore.log").exists()
    after = {p.name: (p.read_bytes() if not p.is_symlink() else b"link") for p in image.iterdir()}
    assert after == before, "the refused restore changed the image"
    # the shim's lines about this container (through containerd's log): the seam logs "restore from
    # IMAGE (...; layer NAME)" right before `runc restore`; it never got there
    mine = [ln for ln in cd.log_path.read_text(errors="replace").splitlines()
            if f"container {cid}:" in ln or f"container={cid} " in ln]
    assert not [ln for ln in mine if "; layer " in ln], "runc restore was started"
    assert any("AUDIT refused" in ln and f"container={cid} " in ln and bad_file in ln for ln in mine), mine[-5:]
    # the gRPC code, through containerd's Tasks API: containerd 1.x's errdefs know no PermissionDenied and
    # pass the shim's refusal on as Unknown (its message intact)
    with pytest.raises(grpc.RpcError) as refused:
        api_create_task(cd, cid)
    want = grpc.StatusCode.UNKNOWN if cd.version.startswith("1.") else grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.code() == want and bad_file in refused.value.details(), (refused.value.code(),
                                                                                   refused.value.details())
    assert wait_until(lambda: leftovers_of(cd, cid) == [], 10), leftovers_of(cd, cid)


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_tampered_image_is_refused_before_criu_runs(containerd, container_id, checkpoints, tmp_path, attack):
    cd, cid = containerd, container_id
    images, _ = checkpoints
    image = _copy(images["a"], tmp_path / "image")
    bad_file = tamper(attack, image, images, os.urandom(32), cd.namespace, tmp_path)
    before = {p.name: (p.read_bytes() if not p.is_symlink() else b"link") for p in image.iterdir()}
    _assert_refused_before_criu(cd, cid, image, bad_file, before, [])


def test_a_checkpoint_of_another_namespace_is_refused(containerd, container_id, checkpoints, tmp_path):
    """Another tenant's checkpoint, sealed on this node with this node's key: its seal is genuine, its
    scope is not ours."""
    cd, cid = containerd, container_id
    images, _ = checkpoints
    image = _copy(images["foreign"], tmp_path / "image")
    before = {p.name: p.read_bytes() for p in image.iterdir()}
    _assert_refused_before_criu(cd, cid, image, seal.MANIFEST_NAME, before, [])
    r = cd.ctr("containers", "info", cid, check=False)
    assert r.returncode == 0  # (ctr run left the container record; the Create was refused)
    cd.ctr("containers", "delete", cid, check=False)


def test_the_untampered_image_restores_and_counts_on(containerd, container_id, checkpoints, tmp_path):
    cd, cid = containerd, container_id
    images, last_before = checkpoints
    image = images["a"]
    name = f"{image.parent.name}/{image.name}"   # in this container's scope of the store (namespace/_)
    log = tmp_path / "restored.log"
    run_counter(cd, cid, KYBERNATE_RUNTIME, "--annotation", f"{RESTORE_ANNOTATION}={name}", log=log)
    first_after = wait_until(lambda: (log_counts(log) or [None])[0], 10)
    assert first_after == last_before + 1, (last_before, log.read_text()[:200])
    assert counting_past(cd, cid, first_after, 10) is not None
    assert task_status(cd, cid) == "RUNNING"
    text = cd.log_path.read_text(errors="replace")
    assert f"container {cid}: seal of {image} verified" in text
    # a copy elsewhere (a restore root) verifies as well: a seal does not bind the image to its directory
    copy = _copy(image, tmp_path / "copy")
    seal.verify(str(copy), cd.seal_key, seal.identity_of(cd.namespace, {}, cid))
    # the restore read the image and left it as it was: it verifies again
    seal.verify(str(image), cd.seal_key, seal.identity_of(cd.namespace, {}, cid))
    remove(cd, cid)
