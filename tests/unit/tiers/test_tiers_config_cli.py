"""[store] in the node config, the registry credentials file, checkpoint ids as untrusted input,
the seam's refusal of ids it cannot serve, and `kybernate checkpoints ls` over a tier catalog."""
from __future__ import annotations

import json
import logging

import pytest

from shim.policy.node import NodeConfig, NodeConfigError
from shim.policy.store import Scope
from tiers import DISK, REGISTRY
from tiers.catalog import Catalog, Job, Record
from tiers.ids import is_id, new_id
from tiers.registry import load_credentials
from ttrpc.codes import Code
from ttrpc.errors import TTRPCError


def _config(tmp_path, text: str) -> str:
    path = tmp_path / "node.toml"
    path.write_text(text)
    path.chmod(0o644)
    return str(path)


def test_store_section_is_read_and_checked(tmp_path):
    path = _config(tmp_path, '[store]\nram_dir = "/run/t1"\nram_cap_mib = 512\nregistry = "reg.example:5000/kyb/ckpt"\n'
                             'credentials_file = "/etc/kybernate/reg.json"\nkeep_last = 2\n')
    node = NodeConfig.load({}, path)
    assert (node.tiers, node.store_ram_dir, node.store_ram_cap_mib, node.store_keep_last) == (True, "/run/t1", 512, 2)
    assert node.disk_tier_dir == node.checkpoint_store
    assert not NodeConfig.load({}, _config(tmp_path, "[store]\nkeep_last = 1\n")).tiers


@pytest.mark.parametrize("line, words", [
    ('registry = "https://reg.example/kyb"', "scheme"),
    ('registry = "reg.example"', "HOST[:PORT]/REPOSITORY"),
    ('registry = "reg.example/Upper"', "lower-case"),
    ('ram_dir = "relative"', "not absolute"),
    ('ram_cap_mib = -1', ">= 0"),
    ('ram_cap_mib = "1g"', "whole number"),
    ('chunk_mib = 0', "> 0"),
    ('bogus = 1', "unknown setting"),
])
def test_bad_store_settings_are_refused_naming_them(tmp_path, line, words):
    with pytest.raises(NodeConfigError) as err:
        NodeConfig.load({}, _config(tmp_path, f"[store]\n{line}\n"))
    assert words in str(err.value)


def test_credentials_file_must_be_roots_alone_and_is_never_quoted(tmp_path):
    creds = tmp_path / "reg.json"
    creds.write_text(json.dumps({"username": "u", "password": "s3cret"}))
    creds.chmod(0o644)
    with pytest.raises(ValueError) as err:
        load_credentials(str(creds))
    assert "0600" in str(err.value) and "s3cret" not in str(err.value)
    creds.chmod(0o600)
    assert load_credentials(str(creds)).password == "s3cret"
    creds.write_text("not json s3cret")
    with pytest.raises(ValueError) as err:
        load_credentials(str(creds))
    assert "s3cret" not in str(err.value)


@pytest.mark.parametrize("value", ["../x", "c1/20261128T120000Z", "20261128T120000Z", "20261128T120000Z-ABCDEF01",
                                   "20261128T120000Z-abcdef01/..", "", None])
def test_only_checkpoint_ids_are_ids(value):
    assert not is_id(value)
    assert is_id(new_id())


def _tier_node(tmp_path, **over):
    for d in ("ram", "disk"):
        (tmp_path / d).mkdir(mode=0o700, exist_ok=True)
    return NodeConfig(**{"checkpoint_store": str(tmp_path / "disk"), "store_ram_dir": str(tmp_path / "ram"),
                         "store_state_dir": str(tmp_path / "state"), **over})


def test_the_seam_refuses_an_unknown_id_naming_it_and_the_key(tmp_path, caplog):
    from shim.checkpoint.seam import _locate_by_id

    node = _tier_node(tmp_path)
    unknown = new_id()
    scope = Scope("default", "", ("c1",))
    assert _locate_by_id("c1/20261128T120000Z", scope, "kybernate.io/restore-from", node=node,
                         container_id="web", namespace="default") is None   # a store name: not the tiers'
    with caplog.at_level(logging.WARNING, logger="kybernate.audit"):
        with pytest.raises(TTRPCError) as err:
            _locate_by_id(unknown, scope, "kybernate.io/restore-from", node=node, container_id="web",
                          namespace="default")
    assert err.value.code == Code.NOT_FOUND
    assert unknown in str(err.value) and "kybernate.io/restore-from" in str(err.value) and "ram" in str(err.value)
    assert any("AUDIT refused" in r.getMessage() and unknown in r.getMessage() for r in caplog.records)


def test_the_seam_refuses_an_id_of_another_scope(tmp_path):
    from shim.checkpoint.seam import _locate_by_id

    node = _tier_node(tmp_path)
    cid = new_id()
    Catalog(node.store_state_dir).put(Record(id=cid, namespace="k8s.io", pod_namespace="team-a", name=("p", "c"),
                                             ram=True))
    with pytest.raises(TTRPCError) as err:
        _locate_by_id(cid, Scope("k8s.io", "team-b", ("p", "c")), "kybernate.io/restore-from", node=node,
                      container_id="web", namespace="k8s.io")
    assert err.value.code == Code.PERMISSION_DENIED and cid in str(err.value) and "ram tier" in str(err.value)


def test_checkpoints_ls_shows_tiers_and_progress(tmp_path, monkeypatch, capsys):
    from kybernate.cli import main

    path = _config(tmp_path, f'[checkpoint]\nstore = "{tmp_path / "disk"}"\n[store]\nram_dir = "{tmp_path / "ram"}"\n'
                             f'state_dir = "{tmp_path / "state"}"\nram_cap_mib = 100\n')
    monkeypatch.setenv("KYBERNATE_CONFIG", path)
    catalog = Catalog(str(tmp_path / "state")).ensure()
    done, busy, failing = new_id(), new_id(), new_id()
    catalog.put(Record(id=done, namespace="default", pod_namespace="", name=("c1",), bytes=3 << 20, ram=True,
                       disk=True, registry="sha256:" + "0" * 64, shared_bytes=1 << 20))
    catalog.put(Record(id=busy, namespace="k8s.io", pod_namespace="ns", name=("p", "c"), bytes=8 << 20, ram=True))
    catalog.put_job(Job(id=busy, steps=(DISK, REGISTRY), phase=DISK, done_bytes=4 << 20, total_bytes=8 << 20))
    catalog.put(Record(id=failing, namespace="default", pod_namespace="", name=("c2",), bytes=1 << 20, disk=True))
    catalog.put_job(Job(id=failing, steps=(REGISTRY,), attempts=3, next_try=0, last_error="unreachable: refused"))
    assert main(["checkpoints", "ls"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line and is_id(line.split()[0])}
    assert "ram,disk,registry" in rows[done] and "1.0 MiB" in rows[done] and "done" in rows[done]
    assert "k8s.io/ns/p/c" in rows[busy] and "[#####.....]  50%" in rows[busy]
    assert "retry 3" in rows[failing] and "unreachable" in rows[failing]
    assert "of 100.0 MiB" in out


def test_doctor_checks_the_tiers(tmp_path, monkeypatch):
    from kybernate.doctor import FAIL, PASS, WARN, _fs_type, check_tiers

    for d in ("ram", "disk"):
        (tmp_path / d).mkdir(mode=0o700)
    path = _config(tmp_path, f'[checkpoint]\nstore = "{tmp_path / "disk"}"\n[store]\nram_dir = "{tmp_path / "ram"}"\n'
                             f'state_dir = "{tmp_path / "state"}"\nregistry = "127.0.0.1:9/kyb/none"\n'
                             'registry_plain_http = true\n')
    monkeypatch.setenv("KYBERNATE_CONFIG", path)
    Catalog(str(tmp_path / "state")).ensure().put_job(Job(id=new_id(), steps=(REGISTRY,)))
    checks = {c.name: c for c in check_tiers()}
    ram = checks["tier 1 (ram)"]
    assert ram.status == (PASS if _fs_type(str(tmp_path)) == "tmpfs" else WARN), ram
    assert checks["tier 2 (disk)"].status == PASS
    assert checks["tier worker"].status == WARN and "no worker serves them" in checks["tier worker"].detail
    assert checks["tier 3 (registry)"].status == FAIL and "unreachable" in checks["tier 3 (registry)"].detail
    (tmp_path / "disk").chmod(0o777)
    assert {c.name: c for c in check_tiers()}["tier 2 (disk)"].status == FAIL


def test_store_serve_on_a_node_without_tiers_waits_for_them(monkeypatch, caplog):
    """The DaemonSet's `store` container and the systemd unit must not crash-loop on a node that keeps
    no tiers: the worker says so and reads the node config again until tiers appear."""
    import argparse
    import logging

    from kybernate import store_cmd

    answers = [None, None, "tiers"]
    served = []
    monkeypatch.setattr(store_cmd, "tier_store", lambda required=True: answers.pop(0))
    monkeypatch.setattr(store_cmd, "NO_TIERS_RECHECK_S", 0.01)
    import tiers.worker as worker
    monkeypatch.setattr(worker, "serve_forever", lambda tiers, poll: served.append(tiers) or 0)
    with caplog.at_level(logging.INFO):
        assert store_cmd.serve(argparse.Namespace(once=False, poll=1.0)) == 0
    assert served == ["tiers"] and answers == []
    assert "keeps no checkpoint tiers" in caplog.text


def test_store_serve_once_on_a_node_without_tiers_is_an_error(monkeypatch):
    import argparse

    import pytest

    from kybernate import OperatorError, store_cmd

    def none(required=True):
        if required:
            raise OperatorError("the node keeps no checkpoint tiers")
        return None

    monkeypatch.setattr(store_cmd, "tier_store", none)
    with pytest.raises(OperatorError, match="no checkpoint tiers"):
        store_cmd.serve(argparse.Namespace(once=True, poll=1.0))
