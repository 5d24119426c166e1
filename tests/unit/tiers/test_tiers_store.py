"""The tier store and its worker, against a real registry: placement (tier 1 full -> tier 2),
registration, restore by id from each tier, the bad ids, copy-down with retries while the registry
is down, a worker killed mid-upload and restarted, eviction by LRU and keep_last."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiers import DISK, RAM, REGISTRY, TierError
from tiers.ids import new_id
from tiers.store import TierStore
from tiers.worker import Worker

from conftest import make_image  # noqa: E402


def _checkpoint(tiers: TierStore, name=("c1",), ns="default", pod_ns="", mib=3, estimate=0):
    cid = new_id()
    placed = tiers.place(ns, pod_ns, name, cid, estimate or (mib << 20))
    make_image(Path(placed.path), os.urandom(mib << 20))
    rec = tiers.register(placed.path, ns, pod_ns, name, name[-1])
    return rec, placed


def test_a_checkpoint_lands_in_tier_1_and_the_worker_copies_it_down(tier_node):
    tiers = TierStore(tier_node())
    rec, placed = _checkpoint(tiers)
    assert placed.tier == RAM and placed.why == ""
    assert rec.tiers == (RAM,)
    assert tiers.catalog.job(rec.id).steps == (DISK, REGISTRY)
    assert Worker(tiers).run_once() == 1
    done = tiers.catalog.get(rec.id)
    assert done.tiers == (RAM, DISK, REGISTRY) and done.registry.startswith("sha256:")
    assert tiers.catalog.job(rec.id) is None
    assert sorted(os.listdir(tiers.dir_of(DISK, done))) == sorted(os.listdir(tiers.dir_of(RAM, done)))


def test_tier_1_full_sends_the_checkpoint_to_tier_2_and_says_so(tier_node):
    tiers = TierStore(tier_node(store_ram_cap_mib=4))
    first, p1 = _checkpoint(tiers)
    second, p2 = _checkpoint(tiers)
    assert p1.tier == RAM and p2.tier == DISK
    assert "tier 1 full" in p2.why and "cap" in p2.why
    assert second.tiers == (DISK,) and tiers.catalog.job(second.id).steps == (REGISTRY,)


def test_restore_by_id_from_each_tier(tier_node):
    tiers = TierStore(tier_node())
    rec, _ = _checkpoint(tiers)
    Worker(tiers).run_once()
    found = tiers.locate(rec.id, "default", "")
    assert (found.tier, found.pulled) == (RAM, False)
    assert os.path.isdir(os.path.join(found.root, found.name))
    tiers.drop_tier(tiers.catalog.get(rec.id), RAM)
    assert tiers.locate(rec.id, "default", "").tier == DISK
    tiers.drop_tier(tiers.catalog.get(rec.id), DISK)
    pulled = tiers.locate(rec.id, "default", "")
    assert pulled.pulled and pulled.tier == RAM
    assert tiers.catalog.get(rec.id).tiers == (RAM, REGISTRY)


def test_another_node_finds_the_checkpoint_in_the_registry_only(tier_node, tmp_path):
    a = TierStore(tier_node())
    rec, _ = _checkpoint(a, name=("web", "app"), ns="k8s.io", pod_ns="team-a")
    Worker(a).run_once()
    b_dirs = tmp_path / "node-b"
    for d in ("ram", "disk"):
        (b_dirs / d).mkdir(parents=True, mode=0o700)
    b = TierStore(tier_node(store_ram_dir=str(b_dirs / "ram"), checkpoint_store=str(b_dirs / "disk"),
                            store_state_dir=str(b_dirs / "state")))
    with pytest.raises(TierError) as err:
        b.locate(rec.id, "k8s.io", "team-b")
    assert err.value.kind == "foreign-scope" and err.value.tier == REGISTRY
    assert not any((b_dirs / "ram").rglob(rec.id))   # refused before anything was written
    found = b.locate(rec.id, "k8s.io", "team-a")
    assert found.pulled and found.name == f"web/app/{rec.id}"
    pulled = Path(found.root) / found.name
    original = Path(a.dir_of(RAM, rec))
    assert {p.name: p.read_bytes() for p in pulled.iterdir()} == {p.name: p.read_bytes() for p in original.iterdir()}


def test_unknown_ids_and_ids_of_another_namespace(tier_node):
    tiers = TierStore(tier_node(store_registry=""))
    unknown = new_id()
    with pytest.raises(TierError) as err:
        tiers.locate(unknown, "default", "")
    assert err.value.kind == "unknown" and unknown in str(err.value) and "ram" in str(err.value)
    rec, _ = _checkpoint(tiers, ns="other")
    with pytest.raises(TierError) as err:
        tiers.locate(rec.id, "default", "")
    assert err.value.kind == "foreign-scope" and err.value.tier == RAM and "other/_" in str(err.value)
    with pytest.raises(TierError) as err:
        tiers.locate("../../etc", "default", "")
    assert err.value.kind == "malformed"
    with_registry = TierStore(tier_node())
    with pytest.raises(TierError) as err:
        with_registry.locate(new_id(), "default", "")
    assert err.value.kind == "unknown" and err.value.tier == REGISTRY


def test_registry_down_the_copy_is_retried_and_the_checkpoint_stays_restorable(tier_node, registry):
    tiers = TierStore(tier_node())
    rec, _ = _checkpoint(tiers)
    worker = Worker(tiers)
    registry.stop()
    try:
        assert worker.run_once() == 0
        job = tiers.catalog.job(rec.id)
        assert job.steps == (REGISTRY,) and job.attempts == 1 and "unreachable" in job.last_error
        assert job.next_try > time.time()
        assert tiers.catalog.get(rec.id).tiers == (RAM, DISK)       # the disk step was done meanwhile
        assert tiers.locate(rec.id, "default", "").tier == RAM      # restorable from tier 1 meanwhile
        assert worker.run_once() == 0 and tiers.catalog.job(rec.id).attempts == 1   # not due yet
    finally:
        registry.start()
    assert worker.run_once(now=job.next_try + 1) == 1
    assert tiers.catalog.get(rec.id).registry


def _write_node_config(path: Path, node) -> None:
    values = {"ram_dir": node.store_ram_dir, "state_dir": node.store_state_dir, "registry": node.store_registry,
              "registry_plain_http": True, "credentials_file": node.store_credentials_file, "chunk_mib": 1,
              "parallel_transfers": 1}
    text = f"[checkpoint]\nstore = {json.dumps(node.checkpoint_store)}\n[store]\n" + "".join(
        f"{k} = {json.dumps(v)}\n" for k, v in values.items())
    path.write_text(text)
    path.chmod(0o644)


def test_a_worker_killed_mid_upload_resumes_and_uploads_nothing_twice(tier_node, registry, proxy, tmp_path):
    node = tier_node(store_registry=proxy.reference("kyb/killed"), store_parallel_transfers=1)
    tiers = TierStore(node)
    rec, _ = _checkpoint(tiers, mib=12)
    tiers.copy_down(rec)
    uploads: list[str] = []

    def slow_uploads(method, path):
        if method == "PUT" and "/blobs/uploads/" in path:
            time.sleep(0.15)
            uploads.append(path.split("digest=")[-1])
        return None
    proxy.fault = slow_uploads
    config = tmp_path / "node.toml"
    _write_node_config(config, node)
    env = {**os.environ, "KYBERNATE_CONFIG": str(config)}
    cmd = [sys.executable, "-m", "kybernate.cli", "store", "serve", "--poll", "0.2"]
    worker = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while len(uploads) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(uploads) >= 4, worker.stdout.read1().decode() if worker.poll() is not None else uploads
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        assert tiers.catalog.job(rec.id).steps == (REGISTRY,), "the job must survive the kill"
        assert not tiers.catalog.get(rec.id).registry
        worker = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert _wait(lambda: tiers.catalog.job(rec.id) is None, 30), tiers.catalog.job(rec.id)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(10)
    done = tiers.catalog.get(rec.id)
    assert done.registry and done.shared_bytes > 0   # what the killed worker sent was not sent again
    assert len(uploads) == len(set(uploads)), f"a blob was uploaded twice: {uploads}"
    pushes = [p for m, p in proxy.seen if m == "PUT" and "/manifests/" in p]
    assert len(pushes) == 1


def _wait(pred, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_eviction_takes_the_least_recently_used_that_a_lower_tier_holds(tier_node):
    tiers = TierStore(tier_node(store_ram_cap_mib=7, store_registry=""))
    old, _ = _checkpoint(tiers, name=("a",))
    new, _ = _checkpoint(tiers, name=("b",))
    tiers.catalog.update(old.id, last_used=100.0)
    tiers.catalog.update(new.id, last_used=200.0)
    third, _ = _checkpoint(tiers, name=("c",), estimate=1)  # placed by a tiny estimate: tier 1 is now over its cap
    assert tiers.catalog.get(third.id).ram
    assert tiers.evict(now=1000.0) == []       # no lower tier holds any of them yet: nothing goes
    Worker(tiers).run_once(evict=False)       # copies down to disk
    evicted = tiers.evict(now=1000.0)
    assert [(e.checkpoint_id, e.tier) for e in evicted] == [(old.id, RAM)]
    assert not os.path.exists(tiers.dir_of(RAM, old)) and os.path.isdir(tiers.dir_of(DISK, old))
    assert tiers.catalog.get(old.id).tiers == (DISK,)
    assert tiers.locate(old.id, "default", "").tier == DISK


def test_recently_used_checkpoints_are_not_evicted(tier_node):
    tiers = TierStore(tier_node(store_ram_cap_mib=4, store_registry="", store_min_idle_s=60))
    a, _ = _checkpoint(tiers, name=("a",))
    b, _ = _checkpoint(tiers, name=("b",), estimate=1)
    Worker(tiers).run_once(evict=False)
    assert tiers.evict(now=time.time()) == []


def test_keep_last_removes_older_checkpoints_of_a_container_from_every_tier(tier_node, registry):
    tiers = TierStore(tier_node(store_keep_last=1))
    old, _ = _checkpoint(tiers, name=("web",), mib=1)
    time.sleep(0.01)
    new, _ = _checkpoint(tiers, name=("web",), mib=1)
    other, _ = _checkpoint(tiers, name=("db",), mib=1)
    Worker(tiers).run_once(evict=False)
    digest = tiers.catalog.get(old.id).registry
    evicted = tiers.evict()
    assert {(e.checkpoint_id, e.tier) for e in evicted} == {(old.id, RAM), (old.id, DISK), (old.id, REGISTRY)}
    assert tiers.catalog.get(old.id) is None and tiers.catalog.get(new.id) and tiers.catalog.get(other.id)
    with pytest.raises(TierError) as err:
        tiers.locate(old.id, "default", "")
    assert err.value.kind == "unknown"


def test_a_pull_no_tier_has_room_for_is_refused_before_anything_is_written(tier_node, tmp_path):
    a = TierStore(tier_node())
    rec, _ = _checkpoint(a, mib=3)
    Worker(a).run_once()
    b_dirs = tmp_path / "node-b"
    for d in ("ram", "disk"):
        (b_dirs / d).mkdir(parents=True, mode=0o700)
    b = TierStore(tier_node(store_ram_dir=str(b_dirs / "ram"), checkpoint_store=str(b_dirs / "disk"),
                            store_state_dir=str(b_dirs / "state"), store_ram_cap_mib=1, store_disk_cap_mib=2))
    with pytest.raises(TierError) as err:
        b.locate(rec.id, "default", "")
    assert err.value.kind == "full" and rec.id in str(err.value) and "cap" in str(err.value), str(err.value)
    assert not list(b_dirs.rglob(rec.id)) and not list(b_dirs.rglob(".pull-*"))


def test_a_new_checkpoint_evicts_from_tier_1_what_a_lower_tier_holds_to_stay_there(tier_node):
    tiers = TierStore(tier_node(store_ram_cap_mib=7, store_registry=""))
    old, _ = _checkpoint(tiers, name=("a",))
    mid, _ = _checkpoint(tiers, name=("b",))
    tiers.catalog.update(old.id, last_used=100.0)
    tiers.catalog.update(mid.id, last_used=200.0)
    pinned, p = _checkpoint(tiers, name=("c",))
    assert p.tier == DISK, "nothing below tier 1 holds a or b yet: the new one goes to tier 2"
    Worker(tiers).run_once(evict=False)
    new, placed = _checkpoint(tiers, name=("d",))
    assert placed.tier == RAM and placed.why == ""
    assert not tiers.catalog.get(old.id).ram and tiers.catalog.get(mid.id).ram
    assert tiers.locate(old.id, "default", "").tier == DISK


def test_checkpoints_push_pull_rm_commands(tier_node, tmp_path, monkeypatch, capsys):
    from kybernate.cli import main

    node = tier_node()
    a = TierStore(node)
    rec, _ = _checkpoint(a, mib=2)
    config = tmp_path / "node-a.toml"
    _write_node_config(config, node)
    monkeypatch.setenv("KYBERNATE_CONFIG", str(config))
    assert main(["checkpoints", "push", rec.id, "-q"]) == 0
    assert "pushed " + rec.id in capsys.readouterr().out
    assert a.catalog.get(rec.id).registry and a.catalog.job(rec.id).steps == (DISK,)   # the disk step still owed
    b_dirs = tmp_path / "node-b"
    for d in ("ram", "disk"):
        (b_dirs / d).mkdir(parents=True, mode=0o700)
    b_node = tier_node(store_ram_dir=str(b_dirs / "ram"), checkpoint_store=str(b_dirs / "disk"),
                       store_state_dir=str(b_dirs / "state"))
    config_b = tmp_path / "node-b.toml"
    _write_node_config(config_b, b_node)
    monkeypatch.setenv("KYBERNATE_CONFIG", str(config_b))
    assert main(["checkpoints", "pull", rec.id, "-q"]) == 0
    out = capsys.readouterr().out
    assert f"{rec.id} pulled into the ram tier" in out and "GB/s" in out
    assert list((b_dirs / "ram").rglob(rec.id))
    assert main(["checkpoints", "rm", rec.id, "--keep-registry"]) == 0
    assert not list((b_dirs / "ram").rglob(rec.id)) and TierStore(b_node).catalog.get(rec.id) is None
    assert main(["checkpoints", "rm", rec.id]) == 1
    assert "no checkpoint" in capsys.readouterr().err
