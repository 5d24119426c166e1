"""Sealed checkpoint images (shim.checkpoint.seal): what a seal covers, what verification refuses and
how it names the first bad file, the key file's rules, and the shim's policy at checkpoint and at Create
(unsealed images, require_seal, the audit line). The real thing, through containerd 1.6 and CRIU, is
tests/integration/test_attack_seal.py."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import struct
from pathlib import Path

import pytest

from criu.images import COMPLETE_MARKER, IMG_COMMON_MAGIC, IN_PROGRESS_MARKER, INVENTORY_MAGIC, PSTREE_MAGIC, mark_complete
from shim.checkpoint import seal as S
from shim.checkpoint import seam
from ttrpc import Code, TTRPCError

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
NS = {"namespace": "team-a", "container_id": "web", "pod_namespace": "", "pod": "", "container": ""}


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    """Pieces of 4 KiB, so that small files have several (the shim's are 64 MiB)."""
    monkeypatch.setattr(S, "PIECE_BYTES", 4096)


def make_image(d: Path, pages: bytes = b"") -> Path:
    """A CRIU-like image dir: inventory, pstree, a core image and 5 pieces of pages."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "inventory.img").write_bytes(struct.pack("<I", INVENTORY_MAGIC) + b"\0" * 12)
    (d / "pstree.img").write_bytes(struct.pack("<II", IMG_COMMON_MAGIC, PSTREE_MAGIC) + b"\0" * 8)
    (d / "core-1.img").write_bytes(struct.pack("<I", IMG_COMMON_MAGIC) + os.urandom(300))
    (d / "pages-1.img").write_bytes(pages or os.urandom(5 * 4096 - 17))
    mark_complete(d, {"container_id": "web"})
    return d


def sealed(d: Path, key: bytes = KEY, identity=NS, **kw) -> Path:
    make_image(d, **kw)
    S.seal(str(d), key, identity)
    return d


def refused(d: Path, key: bytes = KEY, identity=NS) -> S.SealError:
    with pytest.raises(S.SealError) as e:
        S.verify(str(d), key, identity)
    return e.value


# ---- what a seal covers ------------------------------------------------------------------------------
def test_a_sealed_image_verifies_and_the_manifest_lists_every_file(tmp_path):
    d = sealed(tmp_path / "img")
    doc = json.loads((d / S.MANIFEST_NAME).read_text())
    assert set(doc["body"]["files"]) == {"inventory.img", "pstree.img", "core-1.img", "pages-1.img", COMPLETE_MARKER}
    pages = doc["body"]["files"]["pages-1.img"]
    assert pages["size"] == 5 * 4096 - 17 and len(pages["sha256"]) == 5
    assert doc["body"]["identity"] == NS and doc["mac"].startswith("hmac-sha256:")
    assert oct((d / S.MANIFEST_NAME).stat().st_mode & 0o777) == "0o600"
    v = S.verify(str(d), KEY, NS)
    assert v.files == 5 and v.bytes == sum(p.stat().st_size for p in d.iterdir() if p.name != S.MANIFEST_NAME)
    assert v.identity["container_id"] == "web" and v.driver_version is None


def test_the_gpu_record_driver_version_is_sealed(tmp_path):
    d = make_image(tmp_path / "img")
    (d / "kybernate-gpu.json").write_text(json.dumps({"format": 1, "driver_version": 12080, "processes": []}))
    S.seal(str(d), KEY, NS)
    assert json.loads((d / S.MANIFEST_NAME).read_text())["body"]["driver_version"] == 12080
    assert S.verify(str(d), KEY, NS).driver_version == 12080
    (d / "kybernate-gpu.json").write_text(json.dumps({"format": 1, "driver_version": 12090, "processes": []}))
    assert refused(d).file == "kybernate-gpu.json"


def test_many_threads_and_one_thread_seal_alike_and_resealing_replaces_the_manifest(tmp_path):
    d = make_image(tmp_path / "img", pages=os.urandom(40 * 4096 + 5))
    S.seal(str(d), KEY, NS, threads=1)
    one = json.loads((d / S.MANIFEST_NAME).read_text())["body"]["files"]
    S.seal(str(d), KEY, NS, threads=8)
    many = json.loads((d / S.MANIFEST_NAME).read_text())["body"]["files"]
    assert one == many and len(many["pages-1.img"]["sha256"]) == 41
    assert S.verify(str(d), KEY, NS, threads=8).files == 5
    assert sorted(p.name for p in d.iterdir() if p.name.startswith(".")) == []  # no temp file left


def test_a_small_image_is_hashed_by_the_calling_thread_and_a_large_one_by_the_pool(tmp_path, monkeypatch):
    """A CPU container's image (a few hundred KiB) costs more to hand to a pool than to hash; the pool
    is for images of PARALLEL_MIN_BYTES and more (or when the caller names a thread count)."""
    d = sealed(tmp_path / "img")
    pools = []
    real_pool = S.ThreadPoolExecutor
    monkeypatch.setattr(S, "ThreadPoolExecutor", lambda *a, **kw: pools.append(kw) or real_pool(*a, **kw))
    assert S.verify(str(d), KEY, NS).files == 5
    assert pools == []
    data = bytearray((d / "pages-1.img").read_bytes())
    data[5000] ^= 1
    (d / "pages-1.img").write_bytes(bytes(data))
    assert refused(d).file == "pages-1.img" and pools == []  # every byte is still checked
    monkeypatch.setattr(S, "PARALLEL_MIN_BYTES", 4096)
    assert refused(d).file == "pages-1.img" and len(pools) == 1


# ---- what verification refuses, naming the file -----------------------------------------------------
@pytest.mark.parametrize("offset", [0, 4096 * 3 + 100, 5 * 4096 - 18])
def test_a_flipped_byte_in_a_page_image_is_refused_naming_the_file_and_the_range(tmp_path, offset):
    d = sealed(tmp_path / "img")
    data = bytearray((d / "pages-1.img").read_bytes())
    data[offset] ^= 0x01
    (d / "pages-1.img").write_bytes(bytes(data))
    e = refused(d)
    start = offset // 4096 * 4096
    assert e.file == "pages-1.img" and e.reason == "content", e
    assert f"bytes {start}-" in e.why and "differs" in e.why


def test_a_truncated_file_is_refused_by_its_size(tmp_path):
    d = sealed(tmp_path / "img")
    os.truncate(d / "pages-1.img", 4096)
    e = refused(d)
    assert (e.file, e.reason) == ("pages-1.img", "truncated") and "sealed with 20463" in e.why, e


def test_a_file_swapped_in_from_another_sealed_checkpoint_is_refused(tmp_path):
    a = sealed(tmp_path / "a")
    b = sealed(tmp_path / "b")  # same namespace, same key, same sizes: a valid checkpoint of its own
    shutil.copyfile(b / "core-1.img", a / "core-1.img")
    e = refused(a)
    assert (e.file, e.reason) == ("core-1.img", "content"), e
    # and the other way round: b's seal on a's files
    shutil.copyfile(a / S.MANIFEST_NAME, tmp_path / "a-seal")
    shutil.copyfile(b / S.MANIFEST_NAME, a / S.MANIFEST_NAME)
    assert refused(a).file in ("core-1.img", "inventory.img", "kybernate-complete.json", "pages-1.img")


def test_an_added_file_is_refused(tmp_path):
    d = sealed(tmp_path / "img")
    (d / "pages-2.img").write_bytes(b"\0" * 4096)
    e = refused(d)
    assert (e.file, e.reason) == ("pages-2.img", "added") and "not in the seal" in e.why


def test_a_missing_file_is_refused(tmp_path):
    d = sealed(tmp_path / "img")
    (d / "pstree.img").unlink()
    assert (refused(d).file, refused(d).reason) == ("pstree.img", "missing")


def test_a_file_replaced_by_a_symlink_is_refused_even_to_identical_content(tmp_path):
    d = sealed(tmp_path / "img")
    keep = tmp_path / "elsewhere.img"
    shutil.copyfile(d / "pages-1.img", keep)
    (d / "pages-1.img").unlink()
    (d / "pages-1.img").symlink_to(keep)
    e = refused(d)
    assert (e.file, e.reason) == ("pages-1.img", "not-regular") and "symbolic link" in e.why


@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_non_regular_files_are_refused(tmp_path, kind):
    d = sealed(tmp_path / "img")
    (d / "core-1.img").unlink()
    os.mkfifo(d / "core-1.img") if kind == "fifo" else (d / "core-1.img").mkdir()
    e = refused(d)
    assert e.file == "core-1.img" and e.reason == "not-regular" and ("FIFO" in e.why or "directory" in e.why)


def test_nothing_is_tolerated_beside_the_sealed_files(tmp_path):
    """runc has CRIU write logs and stats into the work dir, so a restored image gains no file; one named
    like CRIU's restore stats is refused like any other (as a link it would have CRIU write through it)."""
    d = sealed(tmp_path / "img")
    (d / "stats-restore").symlink_to("/etc/passwd")
    assert (refused(d).file, refused(d).reason) == ("stats-restore", "added")
    (d / "stats-restore").unlink()
    (d / "stats-restore").write_bytes(b"\x01" * 40)
    assert (refused(d).file, refused(d).reason) == ("stats-restore", "added")


def test_the_first_bad_file_in_name_order_is_named(tmp_path):
    d = make_image(tmp_path / "img", pages=os.urandom(30 * 4096))
    for i in range(20):
        (d / f"fdinfo-{i:02d}.img").write_bytes(os.urandom(3 * 4096))
    S.seal(str(d), KEY, NS)
    for name in ("pages-1.img", "fdinfo-17.img", "fdinfo-03.img"):
        data = bytearray((d / name).read_bytes())
        data[-1] ^= 0xFF
        (d / name).write_bytes(bytes(data))
    # whichever thread finds what first, the answer is the first bad file in name order
    assert {refused_with(d, threads).file for threads in (1, 2, 8, 16)
            for _ in range(5)} == {"fdinfo-03.img"}
    (d / "core-1.img").unlink()  # a missing file is found before any content is read
    assert refused(d).file == "core-1.img"


def refused_with(d: Path, threads: int) -> S.SealError:
    with pytest.raises(S.SealError) as e:
        S.verify(str(d), KEY, NS, threads=threads)
    return e.value


def test_another_key_is_refused_naming_the_manifest(tmp_path):
    d = sealed(tmp_path / "img", key=OTHER_KEY)
    e = refused(d)
    assert (e.file, e.reason) == (S.MANIFEST_NAME, "foreign-key") and S.key_id(KEY) in e.why


def test_an_edited_manifest_is_refused(tmp_path):
    d = sealed(tmp_path / "img")
    doc = json.loads((d / S.MANIFEST_NAME).read_text())
    doc["body"]["identity"]["namespace"] = "team-b"
    (d / S.MANIFEST_NAME).write_text(json.dumps(doc))
    e = refused(d, identity={**NS, "namespace": "team-b"})
    assert (e.file, e.reason) == (S.MANIFEST_NAME, "altered")


@pytest.mark.parametrize("field, value", [("namespace", "team-b"), ("pod_namespace", "tenant-b")])
def test_a_checkpoint_of_another_scope_is_refused(tmp_path, field, value):
    d = sealed(tmp_path / "img")
    e = refused(d, identity={**NS, field: value})
    assert (e.file, e.reason) == (S.MANIFEST_NAME, "foreign-scope") and "team-a" in e.why and value in e.why


def test_another_container_of_the_same_scope_may_restore_it(tmp_path):
    d = sealed(tmp_path / "img")
    assert S.verify(str(d), KEY, {**NS, "container_id": "web-2", "container": "other"}).files == 5


def test_no_manifest_a_linked_manifest_and_garbage_are_told_apart(tmp_path):
    d = make_image(tmp_path / "img")
    assert refused(d).reason == "unsealed" and not S.is_sealed(str(d))
    other = sealed(tmp_path / "other")
    (d / S.MANIFEST_NAME).symlink_to(other / S.MANIFEST_NAME)
    assert S.is_sealed(str(d))
    assert (refused(d).file, refused(d).reason) == (S.MANIFEST_NAME, "malformed")
    (d / S.MANIFEST_NAME).unlink()
    (d / S.MANIFEST_NAME).write_text("{not json")
    assert refused(d).reason == "malformed"


# ---- the key file ------------------------------------------------------------------------------------
def _key_file(path: Path, text: bytes, mode: int = 0o600, uid: int = 0) -> Path:
    path.write_bytes(text)
    os.chmod(path, mode)
    os.chown(path, uid, 0)
    return path


@pytest.mark.skipif(os.geteuid() != 0, reason="key files must be root's: needs root to make one")
def test_the_key_file_rules(tmp_path):
    good = _key_file(tmp_path / "good", b"a" * 64 + b"\n")
    assert S.load_key(str(good)) == b"a" * 64
    link = tmp_path / "link"
    link.symlink_to(good)  # a key mounted from a Secret is reached through links
    assert S.load_key(str(link)) == b"a" * 64
    with pytest.raises(S.SealKeyError) as e:
        S.load_key(str(tmp_path / "none"))
    assert e.value.missing
    for path, words in ((_key_file(tmp_path / "readable", b"a" * 64, 0o640), "mode 0640"),
                        (_key_file(tmp_path / "theirs", b"a" * 64, 0o600, uid=1000), "uid 1000"),
                        (_key_file(tmp_path / "short", b"abc\n"), "at least 32")):
        with pytest.raises(S.SealKeyError) as e:
            S.load_key(str(path))
        assert not e.value.missing and words in str(e.value) and str(path) in str(e.value)
    with pytest.raises(S.SealKeyError, match="not a regular file"):
        S.load_key(str(tmp_path))
    assert len(S.new_key_text().strip()) == 64


def test_the_operator_command_knows_the_manifest_by_the_same_name():
    import kybernate

    assert kybernate.SEAL_MANIFEST == S.MANIFEST_NAME  # kybernate imports nothing of the shim: a twin constant


def test_identity_takes_the_pod_only_from_cri_containers():
    cri = {"annotations": {"io.kubernetes.cri.container-type": "container",
                           "io.kubernetes.cri.sandbox-namespace": "tenant-a",
                           "io.kubernetes.cri.sandbox-name": "web-0", "io.kubernetes.cri.container-name": "app"}}
    assert S.identity_of("k8s.io", cri, "abc") == {"namespace": "k8s.io", "container_id": "abc",
                                                  "pod_namespace": "tenant-a", "pod": "web-0", "container": "app"}
    sandbox = {"annotations": {**cri["annotations"], "io.kubernetes.cri.container-type": "sandbox"}}
    assert S.identity_of("k8s.io", sandbox, "abc")["pod_namespace"] == ""
    partial = {"annotations": {"io.kubernetes.cri.sandbox-namespace": "tenant-a"}}
    assert S.identity_of("k8s.io", partial, "abc")["pod_namespace"] == ""
    assert S.identity_of("default", {}, "c1")["pod_namespace"] == ""


# ---- the shim: at Create (seam.prepare_create) ---------------------------------------------------------
class CreateRequest:
    def __init__(self, cid: str = "web", checkpoint: str = ""):
        self.id = cid
        self.checkpoint = checkpoint


def _create(tmp_path: Path, image: Path, namespace: str = "team-a", how: str = "annotation"):
    from shim.runtime.options import RuntimeOptions

    bundle = tmp_path / "bundle"
    bundle.mkdir(parents=True, exist_ok=True)
    spec = {"ociVersion": "1.0.2", "process": {"args": ["sh"], "env": []}, "annotations": {}}
    if how == "annotation":
        spec["annotations"]["kybernate.io/restore-from"] = str(image)
    (bundle / "config.json").write_text(json.dumps(spec))
    req = CreateRequest(checkpoint=str(image) if how == "checkpoint" else "")
    return asyncio.run(seam.prepare_create(req, spec, RuntimeOptions(), str(bundle), namespace=namespace))


def _refused_create(tmp_path, image, caplog, **kw) -> TTRPCError:
    caplog.set_level(logging.WARNING, logger="kybernate.audit")
    with pytest.raises(TTRPCError) as e:
        _create(tmp_path, image, **kw)
    # refused before prepare_bundle: no CRIU config written, config.json untouched
    assert not list((tmp_path / "bundle").glob("criu*")), list((tmp_path / "bundle").iterdir())
    assert "org.criu.config" not in (tmp_path / "bundle" / "config.json").read_text()
    return e.value


def test_create_verifies_the_seal_with_the_node_key(tmp_path, node_config):
    image = sealed(tmp_path / "img", key=node_config.key)
    settings, got = _create(tmp_path, image)
    assert got == str(image)


def test_containerd_checkpoint_of_a_small_image_is_checked_on_the_loop_and_a_large_one_in_a_thread(
        tmp_path, node_config, monkeypatch):
    """`ctr c restore` of a CPU container: its few hundred KiB are verified without the hand-over to a
    thread (which costs more); a larger image goes to the thread. Both are verified (the refusals of
    a tampered image by either way are the test below)."""
    image = sealed(tmp_path / "img", key=node_config.key)
    hops = []
    real_to_thread = asyncio.to_thread

    async def to_thread(fn, *args, **kwargs):
        hops.append(fn)
        return await real_to_thread(fn, *args, **kwargs)

    monkeypatch.setattr(seam.asyncio, "to_thread", to_thread)
    assert _create(tmp_path, image, how="checkpoint")[1] == str(image) and hops == []
    monkeypatch.setattr(seam, "INLINE_IMAGE_BYTES", 1024)
    assert _create(tmp_path, image, how="checkpoint")[1] == str(image) and len(hops) == 1


@pytest.mark.parametrize("inline", [True, False])
@pytest.mark.parametrize("how", ["annotation", "checkpoint"])
def test_create_refuses_a_tampered_image_naming_the_file_with_an_audit_line(tmp_path, node_config, caplog, how,
                                                                          inline, monkeypatch):
    if not inline:  # containerd's checkpoint of a small image is checked on the loop, else in a thread
        monkeypatch.setattr(seam, "INLINE_IMAGE_BYTES", 0)
    image = sealed(tmp_path / "img", key=node_config.key)
    data = bytearray((image / "pages-1.img").read_bytes())
    data[5000] ^= 0x80
    (image / "pages-1.img").write_bytes(bytes(data))
    e = _refused_create(tmp_path, image, caplog, how=how)
    assert e.code == Code.PERMISSION_DENIED
    assert e.message.startswith("restore container web: ") and "pages-1.img" in e.message
    assert str(image) in e.message and "before CRIU" in e.message
    key = "kybernate.io/restore-from" if how == "annotation" else "checkpoint"
    audit = [r.getMessage() for r in caplog.records if r.name == "kybernate.audit"]
    assert any("AUDIT refused container=web namespace=team-a" in a and f"key={key}" in a and "pages-1.img" in a
               for a in audit), audit


def test_the_seal_is_checked_where_the_store_found_the_image_before_its_own_checks(tmp_path, node_config, caplog,
                                                                                   monkeypatch):
    """A name in the container's scope of the store (relative, as a pod gives it): the seal is checked
    on the directory the store's resolution opened, before the image check reads inventory.img (a
    corrupt inventory is the seal's refusal, naming the file), and the refusal quotes the pod's value."""
    from shim.checkpoint import settings as checkpoint_settings

    image = sealed(node_config.store / "team-a" / "_" / "web" / "ck1", key=node_config.key)
    read = []
    real_problem = checkpoint_settings.image_problem
    monkeypatch.setattr(seam, "image_problem", lambda path: read.append(path) or real_problem(path))
    spec_value = "web/ck1"
    assert _create_named(tmp_path, spec_value)[1] == str(image)
    assert read and read[0].startswith("/proc/self/fd/")          # the store's fd, after the seal
    (image / "inventory.img").write_bytes(b"\0" * 16)              # corrupt, same size
    read.clear()
    caplog.set_level(logging.WARNING, logger="kybernate.audit")
    with pytest.raises(TTRPCError) as e:
        _create_named(tmp_path / "second", spec_value)
    assert e.value.code == Code.PERMISSION_DENIED and read == []
    assert e.value.message.startswith("restore container web: kybernate.io/restore-from='web/ck1': inventory.img: ")
    audit = [r.getMessage() for r in caplog.records if r.name == "kybernate.audit"]
    assert any("inventory.img" in a and f"image {image}" in a for a in audit), audit


def test_another_scopes_checkpoint_is_the_stores_refusal_and_never_read(tmp_path, node_config, caplog, monkeypatch):
    image = sealed(node_config.store / "team-b" / "_" / "web" / "ck1", key=node_config.key)
    monkeypatch.setattr(S, "verify", lambda *a, **k: pytest.fail("the seal of another scope's image was read"))
    e = _refused_create(tmp_path, image, caplog)
    assert e.code == Code.PERMISSION_DENIED and "no checkpoint of that name" in e.message


def test_a_note_in_containerds_dir_leads_to_an_image_whose_seal_is_checked(tmp_path, node_config, caplog):
    from shim.checkpoint.settings import write_note

    image = sealed(node_config.store / "team-a" / "_" / "web" / "ck1", key=node_config.key)
    copy = tmp_path / "containerd-copy"
    copy.mkdir()
    write_note(str(copy), {"container_id": "web", "image_path": str(image)})
    assert _create(tmp_path, copy, how="checkpoint")[1] == str(image)
    (image / "core-1.img").write_bytes(os.urandom((image / "core-1.img").stat().st_size))
    e = _refused_create(tmp_path / "second", copy, caplog, how="checkpoint")
    assert e.code == Code.PERMISSION_DENIED and "core-1.img" in e.message


def _create_named(tmp_path: Path, value: str, namespace: str = "team-a"):
    from shim.runtime.options import RuntimeOptions

    bundle = tmp_path / "bundle"
    bundle.mkdir(parents=True, exist_ok=True)
    spec = {"ociVersion": "1.0.2", "process": {"args": ["sh"], "env": []},
            "annotations": {"kybernate.io/restore-from": value}}
    (bundle / "config.json").write_text(json.dumps(spec))
    return asyncio.run(seam.prepare_create(CreateRequest(), spec, RuntimeOptions(), str(bundle), namespace=namespace))


def test_create_refuses_a_checkpoint_of_another_namespace(tmp_path, node_config, caplog):
    image = sealed(tmp_path / "img", key=node_config.key)
    e = _refused_create(tmp_path, image, caplog, namespace="team-b")
    assert e.code == Code.PERMISSION_DENIED and S.MANIFEST_NAME in e.message and "'team-a'" in e.message


def test_create_refuses_an_unsealed_image_when_the_node_requires_seals(tmp_path, node_config, caplog):
    image = make_image(tmp_path / "img")
    e = _refused_create(tmp_path, image, caplog, how="checkpoint")
    assert e.code == Code.PERMISSION_DENIED and "not sealed" in e.message and "require_seal" in e.message


def test_without_require_seal_an_unsealed_image_restores_and_a_bad_seal_is_still_refused(tmp_path, node_config,
                                                                                         caplog):
    node_config.write(require_seal=False)
    image = make_image(tmp_path / "img")
    assert _create(tmp_path, image)[1] == str(image)
    S.seal(str(image), node_config.key, NS)
    (image / "extra.img").write_bytes(b"x")
    e = _refused_create(tmp_path / "second", image, caplog)
    assert e.code == Code.PERMISSION_DENIED and "extra.img" in e.message


def test_a_node_without_a_key_cannot_verify(tmp_path, node_config, caplog):
    image = sealed(tmp_path / "img", key=node_config.key)
    node_config.write(key=False)
    e = _refused_create(tmp_path, image, caplog)
    assert e.code == Code.FAILED_PRECONDITION and "no seal key" in e.message
    node_config.write(require_seal=False, key=False)
    assert _create(tmp_path, image)[1] == str(image)


def test_a_key_others_can_read_fails_the_create(tmp_path, node_config, caplog):
    image = sealed(tmp_path / "img", key=node_config.key)
    os.chmod(node_config.key_path, 0o644)
    e = _refused_create(tmp_path, image, caplog)
    assert e.code == Code.FAILED_PRECONDITION and "mode 0644" in e.message and str(node_config.key_path) in e.message


# ---- the shim: at checkpoint (seam.checkpoint) ----------------------------------------------------------
def _checkpoint(tmp_path: Path, request_path: Path | None, **opts):
    from tests.unit.shim.test_lifecycle_checkpoint import FakeRuntime, make, request

    rt = FakeRuntime()

    async def go():
        c = make(tmp_path, rt)
        return await c.checkpoint(request(request_path, **opts))

    return rt, asyncio.run(go())


def test_a_checkpoint_into_containerds_dir_seals_every_file_with_the_note(tmp_path, node_config):
    path = tmp_path / "containerd-dir"
    rt, image = _checkpoint(tmp_path, path)
    assert image == str(path)
    files = json.loads((path / S.MANIFEST_NAME).read_text())["body"]["files"]
    assert {"inventory.img", "pstree.img", COMPLETE_MARKER, "kybernate-checkpoint.json"} <= set(files)
    assert IN_PROGRESS_MARKER not in files and not (path / IN_PROGRESS_MARKER).exists()  # removed before sealing
    assert S.verify(str(path), node_config.key, {"namespace": "ns", "pod_namespace": ""}).files == len(files)


def test_a_checkpoint_without_a_key_is_unsealed_and_a_bad_key_fails_before_criu(tmp_path, node_config):
    node_config.write(key=False)
    rt, image = _checkpoint(tmp_path, None, image_path=str(tmp_path / "i1"))
    assert not S.is_sealed(image) and rt.calls[0][0] == "checkpoint"
    node_config.write()
    os.chmod(node_config.key_path, 0o604)
    with pytest.raises(TTRPCError) as e:
        _checkpoint(tmp_path, None, image_path=str(tmp_path / "i2"))
    assert e.value.code == Code.FAILED_PRECONDITION and "checkpoint container c1" in e.value.message
    assert not (tmp_path / "i2").exists()


def test_a_directory_without_an_image_is_the_stores_one_sentence_not_the_seals(tmp_path, node_config, caplog):
    """No inventory.img: nothing to verify, and the image check refuses it without reading anything;
    the pod gets the same sentence as for a missing name (it cannot tell an empty dir from none)."""
    empty = node_config.store / "team-a" / "_" / "web" / "empty"
    empty.mkdir(parents=True)
    (empty / "pages-1.img").write_bytes(b"x" * 100)
    for value in ("web/empty", "web/missing"):
        caplog.clear()
        caplog.set_level(logging.WARNING, logger="kybernate.audit")
        with pytest.raises(TTRPCError) as e:
            _create_named(tmp_path, value)
        assert e.value.code == Code.PERMISSION_DENIED
        assert e.value.message == (f"restore container web: kybernate.io/restore-from={value!r}: "
                                   "no checkpoint of that name that this container may restore from")
