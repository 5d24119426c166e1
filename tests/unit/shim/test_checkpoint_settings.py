"""Checkpoint/restore settings from a container's spec, runtime options and environment
(shim.checkpoint.settings)."""
import json
import struct

import pytest

from criu.images import INVENTORY_MAGIC, IMG_COMMON_MAGIC, PSTREE_MAGIC, mark_complete
from proto.containerd.runc.v1 import options_pb2
from shim.checkpoint.settings import (NOTE_NAME, CheckpointSettings, plugin_dir_for, prepare_bundle,
                                      recorded_options, resolve_image, restore_source, write_note)
from ttrpc import Code, TTRPCError


def spec(annotations=None, env=()):
    return {"ociVersion": "1.0.2", "process": {"args": ["sh"], "env": list(env)},
            "annotations": dict(annotations or {})}


def fake_image(d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "inventory.img").write_bytes(struct.pack("<I", INVENTORY_MAGIC) + b"\0" * 12)
    (d / "pstree.img").write_bytes(struct.pack("<II", IMG_COMMON_MAGIC, PSTREE_MAGIC) + b"\0" * 8)
    return d


# ---- annotations -> options ---------------------------------------------------------------------
def test_annotations_are_ored_into_the_request_options():
    s = CheckpointSettings.from_spec(spec({"kybernate.io/checkpoint-exit": "true",
                                           "kybernate.io/checkpoint-tcp-established": "1"}), None, "c1",
                                     environ={})
    merged = s.merged(options_pb2.CheckpointOptions(file_locks=True, image_path="/x"))
    assert merged["exit"] and merged["open_tcp"] and merged["file_locks"]
    assert not merged["external_unix_sockets"] and merged["image_path"] == "/x"
    assert s.merged(None)["exit"] is True


def test_false_annotations_and_no_annotations_change_nothing():
    s = CheckpointSettings.from_spec(spec({"kybernate.io/checkpoint-exit": "false"}), None, "c1", environ={})
    assert s.merged(options_pb2.CheckpointOptions(exit=True))["exit"] is True
    assert s.merged(None)["exit"] is False


def test_a_bad_annotation_value_is_refused_at_create():
    with pytest.raises(TTRPCError) as e:
        CheckpointSettings.from_spec(spec({"kybernate.io/checkpoint-exit": "maybe"}), None, "c1", environ={})
    assert e.value.code == Code.INVALID_ARGUMENT and "c1" in e.value.message and "maybe" in e.value.message


# ---- plugin dir ------------------------------------------------------------------------------------
def test_plugin_dir_annotation_then_env_then_default(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert plugin_dir_for(spec({"kybernate.io/criu-plugin-dir": str(a)}), "c", {"KYBERNATE_CRIU_PLUGIN_DIR": str(b)}) == str(a)
    assert plugin_dir_for(spec(), "c", {"KYBERNATE_CRIU_PLUGIN_DIR": str(b)}) == str(b)
    monkeypatch.setattr("shim.checkpoint.settings.DEFAULT_PLUGIN_DIR", str(tmp_path / "none"))
    assert plugin_dir_for(spec(), "c", {"KYBERNATE_CRIU_PLUGIN_DIR": str(tmp_path / "gone")}) is None
    with pytest.raises(TTRPCError) as e:
        plugin_dir_for(spec({"kybernate.io/criu-plugin-dir": str(tmp_path / "gone")}), "c", {})
    assert e.value.code == Code.INVALID_ARGUMENT


def test_prepare_bundle_writes_the_config_and_names_it_in_config_json(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    s0 = spec({"kybernate.io/criu-plugin-dir": str(plugins)})
    (bundle / "config.json").write_text(json.dumps(s0))
    settings = CheckpointSettings.from_spec(s0, None, "c1", environ={})
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
    s = CheckpointSettings({}, None, image_root=str(tmp_path / "root"))
    assert s.image_dir("/asked", "/containerd", "ns", "c1") == "/asked"
    d = s.image_dir("", "/containerd", "ns", "c1", now=0)
    assert d == str(tmp_path / "root" / "ns" / "c1" / "19700101T000000Z")
    (tmp_path / "root" / "ns" / "c1" / "19700101T000000Z").mkdir(parents=True)
    assert s.image_dir("", "/containerd", "ns", "c1", now=0).endswith("19700101T000000Z.2")
    assert CheckpointSettings({}, None).image_dir("", "/containerd", "ns", "c1") == "/containerd"
    assert CheckpointSettings({}, None, work_root="/w").work_dir("", "c1") == "/w/c1"
    assert CheckpointSettings({}, None).work_dir("", "c1") == ""


# ---- restore --------------------------------------------------------------------------------------
def test_restore_source_precedence_and_the_sandbox():
    assert restore_source("/ck", spec({"kybernate.io/restore-from": "/a"})) == ("/ck", "containerd checkpoint")
    assert restore_source("", spec({"kybernate.io/restore-from": "/a"}, ["RESTORE_FROM=/b"]))[0] == "/a"
    assert restore_source("", spec(env=["PATH=/bin", "RESTORE_FROM=/b"])) == ("/b", "env RESTORE_FROM")
    sandbox = spec({"kybernate.io/restore-from": "/a", "io.kubernetes.cri.container-type": "sandbox"})
    assert restore_source("", sandbox) == ("", "")
    assert restore_source("", spec()) == ("", "")


@pytest.mark.parametrize("kind,code,words", [
    ("missing", Code.INVALID_ARGUMENT, "does not exist"),
    ("file", Code.INVALID_ARGUMENT, "not a directory"),
    ("empty", Code.FAILED_PRECONDITION, "is empty"),
    ("corrupt", Code.FAILED_PRECONDITION, "corrupt"),
    ("relative", Code.INVALID_ARGUMENT, "not absolute"),
])
def test_bad_images_are_refused_with_the_right_code(tmp_path, kind, code, words):
    d = tmp_path / "img"
    if kind == "file":
        d.write_text("x")
    elif kind == "empty":
        d.mkdir()
    elif kind == "corrupt":
        d.mkdir()
        (d / "inventory.img").write_bytes(b"\0" * 16)
    path = "img" if kind == "relative" else str(d)
    with pytest.raises(TTRPCError) as e:
        resolve_image(path, "c1", "annotation kybernate.io/restore-from")
    assert e.value.code == code and words in e.value.message
    assert e.value.message.startswith("restore container c1 (annotation kybernate.io/restore-from): ")


def test_a_note_leads_to_the_image_it_names(tmp_path):
    image = fake_image(tmp_path / "elsewhere")
    scratch = tmp_path / "containerd-copy"
    scratch.mkdir()
    write_note(str(scratch), {"container_id": "c1", "image_path": str(image)})
    assert resolve_image(str(scratch), "c1", "containerd checkpoint") == str(image)
    assert resolve_image(str(image), "c1", "x") == str(image)
    assert (scratch / NOTE_NAME).is_file()


def test_recorded_options_come_from_the_completion_marker(tmp_path):
    image = fake_image(tmp_path / "img")
    assert recorded_options(str(image)) == {}
    mark_complete(image, {"options": {"open_tcp": True}})
    assert recorded_options(str(image)) == {"open_tcp": True}
