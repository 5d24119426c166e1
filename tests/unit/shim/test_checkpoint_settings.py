"""A container's checkpoint settings and the files beside an image (shim.checkpoint.settings); what a
pod says becomes settings in shim.policy.untrusted (test_policy_untrusted.py)."""
import json
import struct

from criu.images import INVENTORY_MAGIC, IMG_COMMON_MAGIC, PSTREE_MAGIC, mark_complete
from shim.checkpoint.settings import CheckpointSettings, prepare_bundle, recorded_options


def spec(annotations=None, env=()):
    return {"ociVersion": "1.0.2", "process": {"args": ["sh"], "env": list(env)},
            "annotations": dict(annotations or {})}


def fake_image(d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "inventory.img").write_bytes(struct.pack("<I", INVENTORY_MAGIC) + b"\0" * 12)
    (d / "pstree.img").write_bytes(struct.pack("<II", IMG_COMMON_MAGIC, PSTREE_MAGIC) + b"\0" * 8)
    return d


def test_prepare_bundle_writes_the_config_and_names_it_in_config_json(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    s0 = spec()
    (bundle / "config.json").write_text(json.dumps(s0))
    settings = CheckpointSettings({}, str(plugins))
    path = prepare_bundle(str(bundle), s0, settings, "c1")
    on_disk = json.loads((bundle / "config.json").read_text())
    assert on_disk["annotations"]["org.criu.config"] == path == str(bundle / "criu-runc.conf")
    assert on_disk["process"] == s0["process"]
    assert f"libdir {plugins}" in (bundle / "criu-runc.conf").read_text().splitlines()


def test_prepare_bundle_keeps_a_config_the_spec_names(tmp_path):
    bundle = tmp_path
    s0 = spec({"org.criu.config": "/etc/mine.conf"})
    (bundle / "config.json").write_text(json.dumps(s0))
    assert prepare_bundle(str(bundle), s0, CheckpointSettings({}, None), "c1") == "/etc/mine.conf"
    assert not (bundle / "criu-runc.conf").exists()


# ---- where the image goes --------------------------------------------------------------------------
def test_image_dir_precedence(tmp_path):
    """The request's image_path, else CriuImagePath in the store's layout (parents root's alone),
    else containerd's directory."""
    from shim.policy.store import Scope

    s = CheckpointSettings({}, None, image_root=str(tmp_path / "root"))
    assert s.image_dir("/asked", "/containerd", "ns", "c1") == "/asked"
    d = s.image_dir("", "/containerd", "ns", "c1", now=0)
    assert d == str(tmp_path / "root" / "ns" / "_" / "c1" / "19700101T000000Z")
    assert oct((tmp_path / "root" / "ns" / "_" / "c1").stat().st_mode & 0o777) == "0o700"
    (tmp_path / "root" / "ns" / "_" / "c1" / "19700101T000000Z").mkdir()
    assert s.image_dir("", "/containerd", "ns", "c1", now=0).endswith("19700101T000000Z.2")
    cri = CheckpointSettings({}, None, image_root=str(tmp_path / "root"),
                             scope=Scope("k8s.io", "team-a", ("web-0", "app")))
    assert cri.image_dir("", "/containerd", "k8s.io", "0123", now=0) == \
        str(tmp_path / "root" / "k8s.io" / "team-a" / "web-0" / "app" / "19700101T000000Z")
    assert CheckpointSettings({}, None).image_dir("", "/containerd", "ns", "c1") == "/containerd"
    assert CheckpointSettings({}, None, work_root="/w").work_dir("", "c1") == "/w/c1"
    assert CheckpointSettings({}, None).work_dir("", "c1") == ""


def test_recorded_options_come_from_the_completion_marker(tmp_path):
    image = fake_image(tmp_path / "img")
    assert recorded_options(str(image)) == {}
    mark_complete(image, {"options": {"open_tcp": True}})
    assert recorded_options(str(image)) == {"open_tcp": True}


def test_recorded_options_never_come_through_a_link_or_from_a_huge_marker(tmp_path):
    """The marker is read from an image dir (untrusted): a link to another file, or a marker larger
    than the record cap, counts as no record."""
    image = fake_image(tmp_path / "img")
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"version": 1, "meta": {"options": {"open_tcp": True}}}))
    (image / "kybernate-complete.json").symlink_to(elsewhere)
    assert recorded_options(str(image)) == {}
    (image / "kybernate-complete.json").unlink()
    (image / "kybernate-complete.json").write_text(json.dumps(
        {"version": 1, "meta": {"options": {"open_tcp": True}, "pad": "x" * (2 << 20)}}))
    assert recorded_options(str(image)) == {}
