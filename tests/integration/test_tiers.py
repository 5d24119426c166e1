"""Checkpoint tiers across two nodes (issue 16): two containerd instances on this machine with their
own roots, sockets, tier 1/2 dirs and tier state, each in its own network namespace (pyroute2: a veth
pair per node, link-local addresses), sharing only a real registry (Debian's docker-registry,
distribution 2.8, with Basic auth, listening on the host side of node A's pair; node B reaches it
through its own pair) and the cluster's seal key, in one containerd namespace (as two Kubernetes
nodes share k8s.io). Their shims, and their tier workers, talk to the registry from their node's
network namespace.

- a CPU counter checkpointed on node A by `kybernate checkpoint` lands in A's tier 1 with an id;
  A's worker (`kybernate store serve --once`) copies it to tier 2 and the registry; node B restores
  it by id (kybernate.io/restore-from), pulling it from the registry into B's tier 1, its rootfs
  diff applied (the counter's /tmp files travel), and it counts on from where it stopped;
- on node B, a blob of that checkpoint corrupted in the registry: the restore is refused naming the
  id, the tier and the blob, and nothing is left (no task, no half pull in B's tiers);
- an unknown id, and an id of another containerd namespace: refused naming the id, with an audit line.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.registry_support import LocalRegistry, unavailable_reason as registry_unavailable

from .checkpoint_support import (RESTORE_ANNOTATION, NetPair, audit_lines, bundle_dir, counting_past, hold_counter,
                                 log_counts, read_count, remove, run_counter, task_status, wait_until)
from .conftest import _selected_versions
from .harness import KYBERNATE_RUNTIME, VENV_BIN, Containerd, unavailable_reason

KYBERNATE = VENV_BIN / "kybernate"
VERSION = (_selected_versions() or ["1.6"])[0]


def kybernate(cd: Containerd, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """`kybernate` as on the node: in its network namespace (the worker and pulls reach the registry
    from there)."""
    enter = ["nsenter", f"--net=/var/run/netns/{cd.netns}"] if cd.netns else []
    return subprocess.run([*enter, str(KYBERNATE), "--address", cd.address, "-n", cd.namespace, *args],
                          capture_output=True, text=True, timeout=timeout, env=cd.env)


class Node:
    def __init__(self, name: str, workdir: Path, namespace: str, registry: LocalRegistry, seal_key: bytes | None,
                 net: NetPair):
        self.net = net
        # no restore roots: what restores here is found through the tiers (or containerd's note into them)
        self.cd = Containerd(VERSION, workdir, namespace=namespace, netns=net.name, restore_roots=[])
        self.ram = workdir / "ram"
        self.state = workdir / "tier-state"
        self.ram.mkdir(parents=True, mode=0o700, exist_ok=True)
        if seal_key is not None:   # the cluster's key: every node verifies every node's seals
            fd = os.open(self.cd.seal_key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, seal_key + b"\n")
            os.close(fd)
        self.cd.write_node_config(store={
            "ram_dir": str(self.ram), "state_dir": str(self.state), "registry": registry.reference("kyb/tiers"),
            "registry_plain_http": True, "credentials_file": str(registry.credentials_file), "chunk_mib": 1,
            "min_idle_s": 0})

    def tier_files(self) -> list[str]:
        return sorted(str(p.relative_to(self.ram)) for p in self.ram.rglob("*"))


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    for reason in (unavailable_reason(VERSION), registry_unavailable()):
        if reason:
            pytest.skip(reason)
    base = tmp_path_factory.mktemp("tiers")
    namespace = f"kybtest-mig-{secrets.token_hex(3)}"
    with contextlib.ExitStack() as stack:
        net_a, net_b = stack.enter_context(NetPair()), stack.enter_context(NetPair())
        _route(net_b, net_a.host_ip)   # node B reaches the registry through its own pair
        registry = LocalRegistry(base, host=net_a.host_ip).start()
        stack.callback(registry.stop)
        a = Node("a", base / "node-a", namespace, registry, None, net_a)
        b = Node("b", base / "node-b", namespace, registry, a.cd.seal_key, net_b)
        for node in (a, b):
            stack.callback(node.cd.stop)
            node.cd.start()
            node.cd.import_busybox()
            own = os.stat(f"/var/run/netns/{node.net.name}").st_ino
            assert os.stat(f"/proc/{node.cd.pid}/ns/net").st_ino == own != os.stat("/proc/self/ns/net").st_ino
        yield a, b, registry


def _route(net: NetPair, address: str) -> None:
    """A host route in ``net``'s namespace to one of the host's own addresses, through ``net``'s pair:
    the host takes it as local traffic (no forwarding between the pairs)."""
    from pyroute2 import NetNS

    with NetNS(net.name) as ns:
        ns.route("add", dst=f"{address}/32", gateway=net.host_ip)


@pytest.fixture(scope="module")
def migrated(nodes, tmp_path_factory):
    """A counter checkpointed on A, pushed by A's worker: (checkpoint id, its last count)."""
    a, b, registry = nodes
    log = tmp_path_factory.mktemp("logs") / "a.log"
    run_counter(a.cd, "mig-src", KYBERNATE_RUNTIME, log=log)
    try:
        assert counting_past(a.cd, "mig-src", 3) is not None
        last = hold_counter(a.cd, "mig-src")   # parked: /tmp/hold and /tmp/count are in its rootfs diff
        r = kybernate(a.cd, "checkpoint", "mig-src", "--exit", "-q")
        assert r.returncode == 0, r.stderr + r.stdout
        checkpoint_id = re.search(r"checkpoint id (\S+) \(in the ram tier", r.stdout).group(1)
        worker = kybernate(a.cd, "store", "serve", "--once")
        assert worker.returncode == 0 and "1 job(s) finished, 0 left" in worker.stdout, worker.stderr
        listing = kybernate(a.cd, "checkpoints", "ls", "--json")
        rec = next(r for r in json.loads(listing.stdout) if r["id"] == checkpoint_id)
        assert rec["tiers"] == ["ram", "disk", "registry"] and rec["rootfs_diff"] and rec["sealed"], rec
        yield checkpoint_id, last
    finally:
        remove(a.cd, "mig-src")


def test_a_counter_moves_from_node_a_to_node_b_through_the_registry(nodes, migrated, tmp_path):
    a, b, registry = nodes
    checkpoint_id, last = migrated
    assert not b.tier_files()
    log = tmp_path / "b.log"
    run_counter(b.cd, "mig-dst", KYBERNATE_RUNTIME, "--annotation", f"{RESTORE_ANNOTATION}={checkpoint_id}", log=log)
    try:
        assert task_status(b.cd, "mig-dst") == "RUNNING"
        assert any(checkpoint_id in f for f in b.tier_files()), "pulled into node B's tier 1"
        rootfs = bundle_dir(b.cd, "mig-dst") / "rootfs"
        assert (rootfs / "tmp" / "hold").exists(), "the rootfs diff travelled with the image"
        assert read_count(b.cd, "mig-dst") == last
        (rootfs / "tmp" / "hold").unlink()
        assert counting_past(b.cd, "mig-dst", last, 15) is not None
        assert wait_until(lambda: log_counts(log), 10)[0] == last + 1, log.read_text()[:200]
        assert "pulled from" in b.cd.log_text() and checkpoint_id in b.cd.log_text()
    finally:
        remove(b.cd, "mig-dst")


def test_a_corrupted_blob_in_the_registry_is_never_restored(nodes, migrated, tmp_path):
    a, b, registry = nodes
    checkpoint_id, _ = migrated
    rm = kybernate(b.cd, "checkpoints", "rm", checkpoint_id, "--keep-registry")
    assert rm.returncode == 0 or "no checkpoint" in rm.stderr, rm.stderr
    shutil.rmtree(b.ram / b.cd.namespace, ignore_errors=True)
    # the largest blob is the counter's pages: flip a byte of it where the registry keeps it
    victim = max(registry.blobs(), key=lambda d: registry.blob_data(d).stat().st_size)
    data = registry.blob_data(victim)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x5A
    data.write_bytes(bytes(raw))
    try:
        r = b.cd.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME, "--annotation",
                     f"{RESTORE_ANNOTATION}={checkpoint_id}", "docker.io/kybernate/busybox:test", "mig-bad",
                     "sh", "-c", "sleep 100", check=False)
        assert r.returncode != 0
        text = r.stderr + r.stdout
        assert checkpoint_id in text and "registry tier" in text and "do not match their digest" in text, text
        assert task_status(b.cd, "mig-bad") in (None, "STOPPED")
        assert not [f for f in b.tier_files() if checkpoint_id in f], b.tier_files()
        assert audit_lines(b.cd, RESTORE_ANNOTATION, checkpoint_id)
    finally:
        raw[len(raw) // 2] ^= 0x5A
        data.write_bytes(bytes(raw))
        remove(b.cd, "mig-bad")


@pytest.mark.parametrize("case", ["unknown", "other-namespace"])
def test_unknown_ids_and_other_namespaces_are_refused_naming_the_id(nodes, migrated, case):
    """The other namespace is a Kubernetes one: the CRI plugin's own annotations put the container in
    scope <ns>/team-x, where the checkpoint (of <ns>/_) is not its to restore."""
    a, b, registry = nodes
    checkpoint_id, _ = migrated
    wanted, extra, expect = {
        "unknown": ("20200101T000000Z-00000000", [], "no such checkpoint in registry"),
        "other-namespace": (checkpoint_id, ["--annotation", "io.kubernetes.cri.sandbox-namespace=team-x",
                                            "--annotation", "io.kubernetes.cri.sandbox-name=pod",
                                            "--annotation", "io.kubernetes.cri.container-name=app"],
                            "not to this container's"),
    }[case]
    try:
        r = b.cd.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME, "--annotation", f"{RESTORE_ANNOTATION}={wanted}",
                     *extra, "docker.io/kybernate/busybox:test", "mig-refused", "sh", "-c", "sleep 100", check=False)
        text = r.stderr + r.stdout
        assert r.returncode != 0 and wanted in text and expect in text, text
        assert audit_lines(b.cd, RESTORE_ANNOTATION, wanted)
        assert task_status(b.cd, "mig-refused") in (None, "STOPPED")
    finally:
        remove(b.cd, "mig-refused")


def _checkpoint_on(node: Node, cid: str, log: Path) -> tuple[str, int, str]:
    """Run a counter on ``node``, park it, `kybernate checkpoint --exit`: (id, last count, output)."""
    run_counter(node.cd, cid, KYBERNATE_RUNTIME, log=log)
    assert counting_past(node.cd, cid, 2) is not None
    last = hold_counter(node.cd, cid)
    r = kybernate(node.cd, "checkpoint", cid, "--exit", "-q")
    assert r.returncode == 0, r.stderr + r.stdout
    return re.search(r"checkpoint id (\S+)", r.stdout).group(1), last, r.stdout


def test_tier_1_full_sends_the_checkpoint_to_tier_2(nodes, tmp_path):
    a, b, registry = nodes
    with a.cd.node_config(store={"ram_cap_mib": 1}):
        try:
            checkpoint_id, _, out = _checkpoint_on(a, "full-src", tmp_path / "a.log")
        finally:
            remove(a.cd, "full-src")
    assert "in the disk tier" in out and "tier 1 full" in out, out
    assert "tier 1 full" in a.cd.log_text()
    assert not [f for f in a.tier_files() if checkpoint_id in f]
    assert list(a.cd.checkpoint_store.rglob(checkpoint_id))


def test_registry_down_during_the_upload_the_checkpoint_stays_restorable(nodes, tmp_path):
    a, b, registry = nodes
    registry.stop()
    try:
        checkpoint_id, last, _ = _checkpoint_on(a, "down-src", tmp_path / "a.log")
        remove(a.cd, "down-src")
        worker = kybernate(a.cd, "store", "serve", "--once")
        assert "1 job(s) left" in worker.stdout or "0 job(s) finished" in worker.stdout, worker.stdout
        ls = kybernate(a.cd, "checkpoints", "ls")
        line = next(x for x in ls.stdout.splitlines() if x.startswith(checkpoint_id))
        assert "ram,disk" in line and "registry: retry 1" in line and "unreachable" in line, ls.stdout
        # restorable from the node's own tiers meanwhile
        run_counter(a.cd, "down-dst", KYBERNATE_RUNTIME, "--annotation", f"{RESTORE_ANNOTATION}={checkpoint_id}",
                    log=tmp_path / "dst.log")
        assert task_status(a.cd, "down-dst") == "RUNNING"
        assert read_count(a.cd, "down-dst") == last
    finally:
        remove(a.cd, "down-dst")
        registry.start()
    push = kybernate(a.cd, "checkpoints", "push", checkpoint_id, "-q")
    assert push.returncode == 0 and "pushed" in push.stdout, push.stderr
    listing = json.loads(kybernate(a.cd, "checkpoints", "ls", "--json").stdout)
    rec = next(r for r in listing if r["id"] == checkpoint_id)
    assert rec["registry"] and rec["job"] is None


def test_kybernate_restore_by_id_on_the_node_that_made_it(nodes, migrated):
    """`kybernate restore ID --from CHECKPOINT-ID`: the id goes to the shim as kybernate.io/restore-from,
    which serves it from node A's tier 1."""
    a, b, registry = nodes
    checkpoint_id, last = migrated
    try:
        r = kybernate(a.cd, "restore", "mig-src", "--from", checkpoint_id, "--new-id", "mig-cli")
        assert r.returncode == 0, r.stderr + r.stdout
        assert f"from {checkpoint_id}" in r.stdout
        assert task_status(a.cd, "mig-cli") == "RUNNING"
        assert read_count(a.cd, "mig-cli") == last
        assert "found in the ram tier" in a.cd.log_text()
    finally:
        remove(a.cd, "mig-cli")


def test_ctr_container_checkpoint_and_restore_on_a_node_with_tiers(nodes):
    """containerd's own flow on a tiers node: the image goes to tier 1 (a checkpoint id, registered),
    containerd's copy holds the note, and `ctr c restore` follows it into tier 1."""
    a, b, registry = nodes
    cid, ref = "ctr-src", "kybtest/ctr-src:checkpoint"
    run_counter(a.cd, cid, KYBERNATE_RUNTIME)
    try:
        assert counting_past(a.cd, cid, 2) is not None
        before = {f for f in a.tier_files() if "/ctr-src/" in f}
        a.cd.ctr("containers", "checkpoint", "--task", "--rw", cid, ref, timeout=120)
        made = [f for f in a.tier_files() if "/ctr-src/" in f and f not in before and f.count("/") == 3]
        assert len(made) == 1, made
        at_checkpoint = read_count(a.cd, cid)
        remove(a.cd, cid)
        a.cd.ctr("containers", "restore", "--live", "--rw", cid, ref, timeout=120)
        assert wait_until(lambda: task_status(a.cd, cid) == "RUNNING", 10)
        first = wait_until(lambda: (lambda n: n if n > 0 else None)(read_count(a.cd, cid)), 10)
        assert first is not None and first >= at_checkpoint
        assert counting_past(a.cd, cid, first, 10) is not None
    finally:
        remove(a.cd, cid)
        a.cd.ctr("images", "rm", ref, check=False)
