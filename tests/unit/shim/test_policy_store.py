"""The checkpoint store (shim.policy.store): its layout by scope, and a name resolved beneath a root
without leaving it, through openat2 and through the component walk used where openat2 is missing."""
from __future__ import annotations

import os
import stat

import pytest

from shim.policy import store
from shim.policy.store import Scope, StoreError, open_beneath, real_path, scope_of

CRI = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-namespace": "team-a",
       "io.kubernetes.cri.sandbox-name": "web-0", "io.kubernetes.cri.container-name": "app"}


# ---- layout ---------------------------------------------------------------------------------------
def test_scope_of_a_cri_container_is_its_kubernetes_namespace():
    s = scope_of("k8s.io", "0123abcd", CRI)
    assert s == Scope("k8s.io", "team-a", ("web-0", "app"))
    assert s.directory("/store") == "/store/k8s.io/team-a"
    assert s.checkpoint_parent("/store") == "/store/k8s.io/team-a/web-0/app"
    assert s.relative_name("20260101T000000Z") == "web-0/app/20260101T000000Z"


def test_scope_of_other_containers_is_their_containerd_namespace():
    s = scope_of("default", "c1", {})
    assert s.directory("/store") == "/store/default/_" and s.checkpoint_parent("/store") == "/store/default/_/c1"
    # the CRI sandbox, or a container without the CRI plugin's whole set, is not a CRI container
    assert scope_of("k8s.io", "c1", {**CRI, "io.kubernetes.cri.container-type": "sandbox"}).pod_namespace == ""
    assert scope_of("k8s.io", "c1", {"io.kubernetes.cri.sandbox-namespace": "team-a"}).pod_namespace == ""


@pytest.mark.parametrize("ns,cid,ann", [("..", "c1", {}), ("a/b", "c1", {}), ("default", "..", {}),
                                        ("k8s.io", "c1", {**CRI, "io.kubernetes.cri.sandbox-namespace": "../x"}),
                                        ("k8s.io", "c1", {**CRI, "io.kubernetes.cri.container-name": "a/b"})])
def test_names_that_are_no_directory_names_are_refused(ns, cid, ann):
    with pytest.raises(ValueError):
        scope_of(ns, cid, ann)


def test_new_checkpoint_ids_do_not_collide(tmp_path):
    assert store.new_checkpoint_id(str(tmp_path), now=0) == "19700101T000000Z"
    (tmp_path / "19700101T000000Z").mkdir()
    assert store.new_checkpoint_id(str(tmp_path), now=0) == "19700101T000000Z.2"


def test_make_dirs_makes_a_root_only_tree_and_never_follows_a_link(tmp_path):
    root = tmp_path / "store"
    made = store.make_dirs(str(root), ["default", "_", "c1"])
    assert made == str(root / "default" / "_" / "c1")
    for d in (root, root / "default", root / "default" / "_", root / "default" / "_" / "c1"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    (root / "default" / "_" / "evil").symlink_to(tmp_path)
    with pytest.raises(OSError):
        store.make_dirs(str(root), ["default", "_", "evil"])


def test_the_store_must_be_roots_alone(tmp_path):
    root = tmp_path / "store"
    root.mkdir(mode=0o700)
    store.check_store_root(str(root))
    root.chmod(0o777)
    with pytest.raises(StoreError, match="not writable by group or others"):
        store.check_store_root(str(root))


# ---- resolution beneath a root --------------------------------------------------------------------
@pytest.fixture(params=["openat2", "walk"])
def via(request):
    return request.param == "openat2"


@pytest.fixture
def tree(tmp_path):
    """root/ns/_/c1/ck (a dir), root/ns/_/c1/file, links inside and out, and a secret outside."""
    outside = tmp_path / "outside"
    (outside / "secret").mkdir(parents=True)
    root = tmp_path / "root"
    c1 = root / "ns" / "_" / "c1"
    (c1 / "ck").mkdir(parents=True)
    (c1 / "file").write_text("x")
    (c1 / "out").symlink_to(outside / "secret")          # a link out of the root
    (c1 / "abs-in").symlink_to(c1 / "ck")                # a link that stays inside, absolute
    (c1 / "rel-in").symlink_to("ck")                     # a link that stays inside, relative
    (root / "ns" / "up").symlink_to("..")
    return root


def test_a_name_beneath_the_root_is_found(tree, via):
    fd = open_beneath(str(tree), "ns/_/c1/ck", use_openat2=via)
    try:
        assert real_path(fd) == str(tree / "ns" / "_" / "c1" / "ck")
    finally:
        os.close(fd)
    fd = open_beneath(str(tree), "./ns//_/c1/ck/", use_openat2=via)
    os.close(fd)


@pytest.mark.parametrize("name,why", [
    ("ns/_/c1/../c1/ck", "'..'"),                  # .. even where it would stay inside
    ("..", "'..'"),
    ("ns/_/../../outside/secret", "'..'"),
    ("/etc", "absolute"),
    ("ns/_/c1/out", "symbolic link"),             # a link out of the root
    ("ns/_/c1/abs-in", "symbolic link"),          # a link inside, pointing in: links are never followed
    ("ns/_/c1/rel-in", "symbolic link"),
    ("ns/up/outside", "symbolic link"),
    ("ns/_/c1/file", "not a directory"),          # a non-directory
    ("ns/_/c1/missing", "does not exist"),
    ("", "empty"),
    (".", "the root itself"),
    ("a\0b", "NUL"),
])
def test_everything_else_is_refused(tree, via, name, why):
    with pytest.raises(StoreError) as e:
        open_beneath(str(tree), name, use_openat2=via)
    assert why in e.value.reason, e.value.reason


def test_the_root_itself_may_be_reached_through_a_link(tree, tmp_path, via):
    """The root is the node's (store, restore_roots): a link to it is the operator's choice."""
    (tmp_path / "store-link").symlink_to(tree)
    fd = open_beneath(str(tmp_path / "store-link"), "ns/_/c1/ck", use_openat2=via)
    os.close(fd)


def test_target_dir_rules(tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "rootfs" / "tmp").mkdir(parents=True)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "to-bundle").symlink_to(bundle)
    forbidden = [str(bundle), str(bundle / "rootfs")]
    assert store.target_dir(str(tmp_path / "new"), forbidden) == (str(tmp_path / "new"), False)
    assert store.target_dir(str(empty), forbidden) == (str(empty), True)
    for value, why in [("rel/dir", "not an absolute path"), (str(full), "already holds files"),
                       (str(full / "x"), "not a directory"), (str(bundle / "ck"), "inside"),
                       (str(bundle / "rootfs" / "tmp" / "ck"), "inside"),
                       (str(tmp_path / "to-bundle" / "ck"), "inside"),
                       ("/etc", "already holds files")]:
        with pytest.raises(ValueError, match=why):
            store.target_dir(value, forbidden)
