"""What a pod or an image says, made into checkpoint settings or refused (shim.policy.untrusted): the
option annotations, the CRIU plugin dir (the node's only), kybernate.io/restore-from resolved in the
container's scope of the store, RESTORE_FROM in the env; and containerd's own checkpoint with its note
(shim.checkpoint.settings.containerd_checkpoint_source), and which wins (shim.checkpoint.seam)."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import struct
from pathlib import Path

import pytest

from criu.images import IMG_COMMON_MAGIC, INVENTORY_MAGIC, PSTREE_MAGIC
from proto.containerd.runc.v1 import options_pb2
from shim.checkpoint import seam
from shim.checkpoint.settings import (NOTE_NAME, CheckpointSettings, containerd_checkpoint_source, image_problem,
                                      write_note)
from shim.policy import untrusted
from shim.policy.node import NodeConfig
from shim.policy.untrusted import RESTORE_REFUSED, checkpoint_settings, pod_restore_source
from shim.runtime.options import RuntimeOptions
from ttrpc import Code, TTRPCError

CRI = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-namespace": "team-a",
       "io.kubernetes.cri.sandbox-name": "web-0", "io.kubernetes.cri.container-name": "app"}


def spec(annotations=None, env=()):
    return {"ociVersion": "1.0.2", "process": {"args": ["sh"], "env": list(env)},
            "annotations": dict(annotations or {})}


def fake_image(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "inventory.img").write_bytes(struct.pack("<I", INVENTORY_MAGIC) + b"\0" * 12)
    (d / "pstree.img").write_bytes(struct.pack("<II", IMG_COMMON_MAGIC, PSTREE_MAGIC) + b"\0" * 8)
    return d


def settings_for(node, annotations=None, ns="default", cid="c1", options=None):
    return CheckpointSettings.from_pod(checkpoint_settings(spec(annotations), node, cid, ns), options)


# ---- annotations -> options ---------------------------------------------------------------------
def test_annotations_are_ored_into_the_request_options():
    s = settings_for(NodeConfig(), {"kybernate.io/checkpoint-exit": "true",
                                    "kybernate.io/checkpoint-tcp-established": "1"})
    merged = s.merged(options_pb2.CheckpointOptions(file_locks=True, image_path="/x"))
    assert merged["exit"] and merged["open_tcp"] and merged["file_locks"]
    assert not merged["external_unix_sockets"] and merged["image_path"] == "/x"
    assert s.merged(None)["exit"] is True


def test_false_annotations_and_no_annotations_change_nothing():
    s = settings_for(NodeConfig(), {"kybernate.io/checkpoint-exit": "false"})
    assert s.merged(options_pb2.CheckpointOptions(exit=True))["exit"] is True
    assert s.merged(None)["exit"] is False


def test_a_bad_annotation_value_is_refused_at_create_with_an_audit_line(caplog):
    with caplog.at_level(logging.WARNING, logger="kybernate.audit"):
        with pytest.raises(TTRPCError) as e:
            settings_for(NodeConfig(), {"kybernate.io/checkpoint-exit": "maybe"})
    assert e.value.code == Code.INVALID_ARGUMENT
    assert e.value.message == "create container c1: kybernate.io/checkpoint-exit='maybe': must be true or false"
    assert "AUDIT refused container=c1 namespace=default key=kybernate.io/checkpoint-exit" in caplog.text


def test_runtime_options_and_scope(tmp_path):
    s = settings_for(NodeConfig(), CRI, ns="k8s.io",
                     options=RuntimeOptions(criu_image_path="/img", criu_work_path="/work"))
    assert (s.image_root, s.work_root) == ("/img", "/work")
    assert s.scope.directory("/store") == "/store/k8s.io/team-a"


# ---- plugin dir ------------------------------------------------------------------------------------
def test_the_plugin_dir_annotation_is_refused_whatever_it_names(tmp_path, caplog):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    for value in (str(plugins), "/usr/local/lib/criu", ""):
        with caplog.at_level(logging.WARNING, logger="kybernate.audit"):
            with pytest.raises(TTRPCError) as e:
                settings_for(NodeConfig(criu_plugin_dir="/usr/local/lib/criu"),
                             {"kybernate.io/criu-plugin-dir": value})
        assert e.value.code == Code.PERMISSION_DENIED
        assert e.value.message.startswith(f"create container c1: kybernate.io/criu-plugin-dir={value!r}: ")
        assert "node's config" in e.value.message
    assert caplog.text.count("AUDIT refused container=c1 namespace=default key=kybernate.io/criu-plugin-dir") == 3


def test_the_plugin_dir_is_the_nodes_or_none(tmp_path, monkeypatch):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    assert settings_for(NodeConfig()).plugin_dir is None   # CRIU's built-in default
    assert settings_for(NodeConfig(criu_plugin_dir=str(plugins))).plugin_dir == str(plugins)
    assert settings_for(NodeConfig(criu_plugin_dir=str(tmp_path / "gone"))).plugin_dir is None
    # the node's environment (containerd's, which the shim inherits) counts as node config
    monkeypatch.setenv("KYBERNATE_CRIU_PLUGIN_DIR", str(plugins))
    node = NodeConfig.load(path=str(tmp_path / "no-config.toml"))
    assert settings_for(node).plugin_dir == str(plugins)


@pytest.mark.skipif(os.geteuid() != 0, reason="the node config must be owned by root")
def test_the_node_config_is_checked_at_every_load_and_parsed_again_when_it_changed(tmp_path, monkeypatch):
    """Every Create loads the node config: the file is read and its owner and mode checked each time;
    the TOML parser runs again only when its bytes changed (a daemon forked from the warm template
    finds the template's parse)."""
    import tomllib

    from shim.policy.node import NodeConfigError

    path = tmp_path / "config.toml"
    path.write_text(f'[criu]\nplugin_dir = "{tmp_path}/a"\n')
    os.chmod(path, 0o644)
    parses = []
    real_loads = tomllib.loads
    monkeypatch.setattr(tomllib, "loads", lambda text: parses.append(text) or real_loads(text))
    assert [NodeConfig.load(path=str(path)).criu_plugin_dir for _ in range(3)] == [f"{tmp_path}/a"] * 3
    assert len(parses) == 1
    path.write_text(f'[criu]\nplugin_dir = "{tmp_path}/b"\n')
    assert NodeConfig.load(path=str(path)).criu_plugin_dir == f"{tmp_path}/b" and len(parses) == 2
    os.chmod(path, 0o664)  # the same bytes, now writable by its group: refused all the same
    with pytest.raises(NodeConfigError, match="not writable by group or others"):
        NodeConfig.load(path=str(path))


# ---- restore-from --------------------------------------------------------------------------------
@pytest.fixture
def node(tmp_path):
    """A store with this container's own checkpoint, another namespace's, and a restore root."""
    store_dir = tmp_path / "store"
    store_dir.mkdir(mode=0o700)
    fake_image(store_dir / "default" / "_" / "c0" / "ck1")
    fake_image(store_dir / "other" / "_" / "victim" / "ck")
    fake_image(store_dir / "k8s.io" / "team-a" / "web-0" / "app" / "ck")
    fake_image(store_dir / "k8s.io" / "team-b" / "db-0" / "db" / "ck")
    roots = tmp_path / "roots"
    fake_image(roots / "shared" / "ck")
    return NodeConfig(checkpoint_store=str(store_dir), restore_roots=(str(roots),))


def restore(node, value, annotations=None, ns="default", env=()):
    ann = {**(annotations or {}), **({"kybernate.io/restore-from": value} if value is not None else {})}
    s = checkpoint_settings(spec(ann, env), node, "c1", ns)
    return pod_restore_source(spec(ann, env), s.scope, node, "c1", ns, image_problem)


def test_a_name_in_the_containers_own_scope_is_found(node):
    store_dir = Path(node.checkpoint_store)
    src = restore(node, "c0/ck1")
    assert src.path == str(store_dir / "default" / "_" / "c0" / "ck1") and not src.trusted
    assert restore(node, str(store_dir / "default" / "_" / "c0" / "ck1")).path == src.path  # absolute, in scope
    # a Kubernetes container: its namespace's checkpoints, whichever pod made them
    cri = restore(node, "web-0/app/ck", CRI, ns="k8s.io")
    assert cri.path == str(store_dir / "k8s.io" / "team-a" / "web-0" / "app" / "ck")
    fd = cri.open("c1")
    os.close(fd)


def test_an_absolute_path_beneath_a_restore_root_is_found(node, tmp_path):
    assert restore(node, str(tmp_path / "roots" / "shared" / "ck")).path == str(tmp_path / "roots" / "shared" / "ck")


def refused(node, value, caplog, **kw):
    with caplog.at_level(logging.WARNING, logger="kybernate.audit"):
        with pytest.raises(TTRPCError) as e:
            restore(node, value, **kw)
    return e.value


@pytest.mark.parametrize("case", ["etc", "dotdot", "dotdot-abs", "other-namespace", "other-namespace-relative",
                                  "other-k8s-namespace", "link-out", "link-in", "missing", "not-a-dir",
                                  "not-an-image", "root-itself", "restore-root-into-store"])
def test_every_refusal_is_the_same_sentence_with_the_reason_in_the_audit_line(node, tmp_path, caplog, case):
    store_dir = Path(node.checkpoint_store)
    own = store_dir / "default" / "_" / "c0"
    (own / "out").symlink_to(tmp_path / "roots" / "shared" / "ck")
    (own / "in").symlink_to("ck1")
    (own / "file").write_text("x")
    (own / "junk").mkdir()
    (own / "junk" / "inventory.img").write_bytes(b"\0" * 16)
    kw = {}
    value = {"etc": "/etc", "dotdot": "../other/_/victim/ck", "dotdot-abs": str(own / ".." / ".." / ".." / "other"),
             "other-namespace": str(store_dir / "other" / "_" / "victim" / "ck"),
             "other-namespace-relative": "victim/ck",
             "other-k8s-namespace": "db-0/db/ck", "link-out": "c0/out", "link-in": "c0/in", "missing": "c0/nope",
             "not-a-dir": "c0/file", "not-an-image": "c0/junk", "root-itself": ".",
             "restore-root-into-store": str(store_dir / "other" / "_" / "victim" / "ck")}[case]
    if case == "other-k8s-namespace":
        kw = {"annotations": CRI, "ns": "k8s.io"}
    if case == "restore-root-into-store":   # a root that holds the store does not open other scopes
        node = NodeConfig(checkpoint_store=node.checkpoint_store, restore_roots=(str(tmp_path),))
    err = refused(node, value, caplog, **kw)
    assert err.code == Code.PERMISSION_DENIED
    assert err.message == f"restore container c1: kybernate.io/restore-from={value!r}: {RESTORE_REFUSED}"
    line = [r for r in caplog.text.splitlines() if "AUDIT refused" in r]
    assert len(line) == 1 and "key=kybernate.io/restore-from" in line[0] and "detail=" in line[0], caplog.text


def test_the_store_must_be_roots_alone_for_a_restore(node, caplog):
    os.chmod(node.checkpoint_store, 0o777)
    err = refused(node, "c0/ck1", caplog)
    assert err.code == Code.PERMISSION_DENIED and "not writable by group or others" in caplog.text


def test_restore_from_env_is_ignored_unless_the_node_accepts_it(node, caplog):
    with caplog.at_level(logging.WARNING, logger="kybernate.audit"):
        assert restore(node, None, env=["PATH=/bin", "RESTORE_FROM=c0/ck1"]) is None
    assert "AUDIT ignored container=c1 namespace=default key=env RESTORE_FROM value='c0/ck1'" in caplog.text
    accepting = NodeConfig(checkpoint_store=node.checkpoint_store, accept_restore_from_env=True)
    assert restore(accepting, None, env=["RESTORE_FROM=c0/ck1"]).origin == "env RESTORE_FROM"
    # accepted, it is held to the same scope
    err = refused(accepting, None, caplog, env=["RESTORE_FROM=/etc"])
    assert err.code == Code.PERMISSION_DENIED and "env RESTORE_FROM='/etc'" in err.message


def test_the_annotation_wins_over_the_env_and_the_sandbox_never_restores(node, caplog):
    src = restore(node, "c0/ck1", env=["RESTORE_FROM=/etc"])
    assert src.key == "kybernate.io/restore-from"
    assert restore(node, "/etc", {"io.kubernetes.cri.container-type": "sandbox"}) is None
    assert restore(node, None) is None


def test_a_checkpoint_removed_between_create_and_start_is_the_same_refusal(node, caplog):
    src = restore(node, "c0/ck1")
    ck = Path(src.path)
    ck.rename(ck.parent / "moved")
    (ck.parent / "ck1").symlink_to("/etc")
    with caplog.at_level(logging.WARNING, logger="kybernate.audit"):
        with pytest.raises(TTRPCError) as e:
            src.open("c1")
    assert e.value.code == Code.PERMISSION_DENIED and RESTORE_REFUSED in e.value.message
    assert "at start" in caplog.text


# ---- containerd's own checkpoint (a trusted client) and its note ---------------------------------------
def ctr_restore(node, path, options=None, ns="default"):
    return containerd_checkpoint_source(path, settings_for(node, ns=ns, options=options), node, "c1", ns)


@pytest.mark.parametrize("kind,code,words", [
    ("missing", Code.INVALID_ARGUMENT, "does not exist"),
    ("file", Code.INVALID_ARGUMENT, "not a directory"),
    ("empty", Code.FAILED_PRECONDITION, "is empty"),
    ("corrupt", Code.FAILED_PRECONDITION, "corrupt"),
    ("relative", Code.INVALID_ARGUMENT, "not absolute"),
])
def test_containerds_checkpoint_gets_the_detailed_errors(node, tmp_path, kind, code, words):
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
        ctr_restore(node, path)
    assert e.value.code == code and words in e.value.message
    assert e.value.message.startswith("restore container c1 (containerd checkpoint): ")


def test_containerds_checkpoint_wins_and_is_trusted(node, tmp_path):
    """At Create (seam.prepare_create): containerd's checkpoint, from anywhere (a trusted client),
    over the annotation; the CRIU config names the node's plugin dir."""
    image = fake_image(tmp_path / "anywhere")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    s0 = spec({"kybernate.io/restore-from": "/etc"})
    (bundle / "config.json").write_text(json.dumps(s0))

    class Req:
        id = "c1"
        checkpoint = str(image)

    # (the seal is test_checkpoint_seal.py's: here a node that does not require one)
    node = dataclasses.replace(node, require_seal=False, seal_key_file=str(tmp_path / "no-key"))
    settings, path = asyncio.run(seam.prepare_create(Req(), s0, None, str(bundle), node, "default"))
    assert path == str(image) and settings.restore.trusted and settings.restore.origin == "containerd checkpoint"
    assert settings.scope.directory("/s") == "/s/default/_" and settings.plugin_dir is None
    Req.checkpoint = ""
    with pytest.raises(TTRPCError) as e:
        asyncio.run(seam.prepare_create(Req(), s0, None, str(bundle), node, "default"))
    assert e.value.code == Code.PERMISSION_DENIED


def test_a_note_leads_only_into_allowed_places(node, tmp_path, caplog):
    store_dir = Path(node.checkpoint_store)
    scratch = tmp_path / "containerd-copy"
    scratch.mkdir()
    for target in (store_dir / "default" / "_" / "c0" / "ck1", tmp_path / "roots" / "shared" / "ck"):
        write_note(str(scratch), {"container_id": "c0", "image_path": str(target)})
        assert ctr_restore(node, str(scratch)).path == str(target)
    crit = tmp_path / "criu-images"
    fake_image(crit / "default" / "_" / "c0" / "stamp")
    fake_image(crit / "other" / "_" / "victim" / "stamp")
    write_note(str(scratch), {"image_path": str(crit / "default" / "_" / "c0" / "stamp")})
    assert ctr_restore(node, str(scratch), RuntimeOptions(criu_image_path=str(crit))).path.endswith("c0/stamp")
    fake_image(tmp_path / "elsewhere")
    for target in ("/etc", str(store_dir / "other" / "_" / "victim" / "ck"), str(tmp_path / "elsewhere"),
                   str(crit / "other" / "_" / "victim" / "stamp"), "relative/x"):
        write_note(str(scratch), {"image_path": target})
        with caplog.at_level(logging.WARNING, logger="kybernate.audit"):
            with pytest.raises(TTRPCError) as e:
                ctr_restore(node, str(scratch), RuntimeOptions(criu_image_path=str(crit)))
        assert e.value.code == Code.PERMISSION_DENIED and NOTE_NAME in e.value.message, e.value
    assert (scratch / NOTE_NAME).is_file()


def test_a_note_is_read_as_an_untrusted_record(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (tmp_path / "target.json").write_text('{"image_path": "/x"}')
    (d / NOTE_NAME).symlink_to(tmp_path / "target.json")
    assert untrusted.read_note(str(d)) is None
    (d / NOTE_NAME).unlink()
    (d / NOTE_NAME).write_text("[1, 2]")
    assert untrusted.read_note(str(d)) is None
    os.unlink(d / NOTE_NAME)
    os.mkfifo(d / NOTE_NAME)   # a fifo would block a plain open
    assert untrusted.read_note(str(d)) is None
