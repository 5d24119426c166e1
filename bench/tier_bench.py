#!/usr/bin/env python3
"""Checkpoint tiers (issue 16) on a CPU container of --mib MiB (256 by default): what the tiers cost
at checkpoint time, how fast images move down and back, and restore time from each tier. One private
containerd (1.6), one real registry (Debian's docker-registry, distribution 2.8, filesystem driver on
this machine's disk, 127.0.0.1), one tmpfs (mounted by the bench) for tier 1 and for the plain RAM dir.

The container: busybox ``dd if=/dev/urandom bs=<mib>M count=1 | sleep``: dd holds <mib> MiB of random
bytes while blocked writing into the pipe (incompressible, unchanged between checkpoints).

Per sample, alternating so that drift hits both alike:
- ``checkpoint_plain``: Tasks.Checkpoint (leave running) with image_path in the tmpfs, on a node
  without tiers: what a checkpoint to a RAM dir costs today;
- ``checkpoint_tiers``: the same into tier 1 (image_path = <tier 1>/<scope>/<id>, as `kybernate
  checkpoint` names it), on a node with tiers: the shim also captures the rootfs diff and records the
  checkpoint and its copy-down job (the issue's bar: within 10 % of the plain one);
- ``copy_down``, ``push``: the worker's two steps right after (tier 1 -> tier 2 on this machine's disk;
  tier 2 -> registry), and ``to_registry`` = both: the time until the checkpoint is in the registry
  after the checkpoint returned; push GB/s over the image size;
- ``pull``: a pull of that checkpoint from the registry into a second node's tier 1 (another state
  dir and tmpfs dir), GB/s;
- ``restore_ram``, ``restore_disk``, ``restore_registry``: `ctr run -d` with kybernate.io/restore-from
  set to the id (Create resolves it, verifies the seal, Start restores), the image only in tier 1,
  only in tier 2, only in the registry (pulled into tier 1 inside Create); ``restore_plain``: the
  same from the plain RAM dir by path (a restore root);
- ``shared``: a second checkpoint of the same running container, pushed: the share of its bytes the
  registry already had.

Writes tier_bench.json and tier_bench.md into --out (bench/results/tiers/).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.checkpoint_support import (RESTORE_ANNOTATION, api_checkpoint, remove,  # noqa: E402
                                                  task_status, wait_until)
from tests.integration.harness import BUSYBOX_REF, KYBERNATE_RUNTIME, Containerd  # noqa: E402
from tests.registry_support import LocalRegistry  # noqa: E402


def rss_of_task(cd: Containerd, cid: str) -> int:
    total = 0
    for line in cd.ctr("tasks", "ps", cid, check=False).stdout.splitlines()[1:]:
        pid = line.split()[0]
        try:
            for row in Path(f"/proc/{pid}/status").read_text().splitlines():
                if row.startswith("VmRSS:"):
                    total += int(row.split()[1]) * 1024
        except OSError:
            pass
    return total


def start_holder(cd: Containerd, cid: str, mib: int) -> None:
    cd.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME, BUSYBOX_REF, cid, "sh", "-c",
           f"dd if=/dev/urandom bs={mib}M count=1 iflag=fullblock 2>/dev/null | sleep 100000")
    if not wait_until(lambda: rss_of_task(cd, cid) >= (mib << 20), 60, 0.2):
        raise RuntimeError(f"{cid} did not reach {mib} MiB")


def checkpoint(cd: Containerd, cid: str, image: str) -> None:
    """Tasks.Checkpoint (leave running) with image_path; containerd 1.6's "already exists" for its own
    scratch blob of a second checkpoint of one container, with a whole image in place, is a success
    (as `kybernate checkpoint` takes it)."""
    import grpc
    from kybernate.checkpoint import _duplicate_scratch_blob

    try:
        api_checkpoint(cd, cid, image_path=image)
    except grpc.RpcError as exc:
        if not _duplicate_scratch_blob(exc, Path(image)):
            raise


def timed(fn) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def restore_by(cd: Containerd, name: str, value: str) -> float:
    t = timed(lambda: cd.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME, "--annotation",
                             f"{RESTORE_ANNOTATION}={value}", BUSYBOX_REF, name, "sleep", "1", timeout=300))
    state = task_status(cd, name)
    remove(cd, name)
    if state != "RUNNING":
        raise RuntimeError(f"restored {name} is {state}")
    return t


def stats(values: list[float]) -> dict:
    return {"n": len(values), "median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--version", default="1.6")
    ap.add_argument("--out", default=str(REPO / "bench/results/tiers"))
    args = ap.parse_args()

    from shim.policy.node import NodeConfig
    from tiers import DISK, RAM
    from tiers.ids import new_id
    from tiers.store import TierStore
    from shim.policy.store import make_dirs

    work = Path(tempfile.mkdtemp(prefix="kyb-tier-bench-", dir="/var/tmp"))
    shm = work / "shm"
    shm.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={max(4, args.mib * 12 // 1024 + 2)}g,mode=0700", "tmpfs",
                    str(shm)], check=True)
    registry = LocalRegistry(work).start()
    cd = Containerd(args.version, work / "cd", restore_roots=[str(shm / "plain")])
    for d in ("plain", "tier1", "tier1-b"):
        (shm / d).mkdir(mode=0o700)
    disk = work / "cd" / "checkpoints"
    store = {"ram_dir": str(shm / "tier1"), "state_dir": str(work / "state"), "registry": registry.reference("kyb/bench"),
             "registry_plain_http": True, "credentials_file": str(registry.credentials_file), "min_idle_s": 0}
    samples: dict[str, list[float]] = {}
    sizes, shared = [], []

    def add(key: str, value: float) -> None:
        samples.setdefault(key, []).append(value)

    try:
        cd.start()
        cd.import_busybox()
        disk.mkdir(mode=0o700, exist_ok=True)
        node = NodeConfig(checkpoint_store=str(disk), seal_key_file=str(cd.seal_key_path),
                          store_ram_dir=store["ram_dir"], store_state_dir=store["state_dir"],
                          store_registry=store["registry"], store_registry_plain_http=True,
                          store_credentials_file=store["credentials_file"], store_min_idle_s=0)
        node_b = NodeConfig(**{**node.__dict__, "store_ram_dir": str(shm / "tier1-b"),
                               "store_state_dir": str(work / "state-b"), "checkpoint_store": str(work / "disk-b")})
        (work / "disk-b").mkdir(mode=0o700)
        tiers = TierStore(node)
        for run in range(args.runs):
            cid = f"tb-{secrets.token_hex(3)}"
            start_holder(cd, cid, args.mib)
            try:
                order = ("plain", "tiers") if run % 2 == 0 else ("tiers", "plain")
                for variant in order:
                    if variant == "plain":
                        plain = shm / "plain" / f"{cid}-{run}"
                        add("checkpoint_plain", timed(lambda: checkpoint(cd, cid, str(plain))))
                        add("restore_plain", restore_by(cd, f"{cid}-rp", str(plain)))
                        shutil.rmtree(plain)
                    else:
                        with cd.node_config(store=store):
                            parent = make_dirs(store["ram_dir"], [cd.namespace, "_", cid])
                            ckpt_id = new_id()
                            add("checkpoint_tiers", timed(lambda: checkpoint(
                                cd, cid, os.path.join(parent, ckpt_id))))
                            rec = tiers.catalog.get(ckpt_id)
                            sizes.append(rec.bytes)
                            job = tiers.catalog.job(ckpt_id)
                            add("copy_down", timed(lambda: tiers.copy_down(rec)))
                            pushed = tiers.push_to_registry(tiers.catalog.get(ckpt_id))
                            tiers.catalog.drop_job(job.id)
                            add("push", pushed.seconds)
                            add("to_registry", samples["copy_down"][-1] + pushed.seconds)
                            add("push_gbps", pushed.total_bytes / pushed.seconds / 1e9)
                            b = TierStore(node_b)
                            t0 = time.monotonic()
                            found = b.locate(ckpt_id, cd.namespace, "")
                            pull_s = time.monotonic() - t0
                            add("pull", pull_s)
                            add("pull_gbps", rec.bytes / pull_s / 1e9)
                            b.remove(b.catalog.get(ckpt_id), registry_too=False)
                            add("restore_ram", restore_by(cd, f"{cid}-r1", ckpt_id))
                            tiers.drop_tier(tiers.catalog.get(ckpt_id), RAM)
                            add("restore_disk", restore_by(cd, f"{cid}-r2", ckpt_id))
                            tiers.drop_tier(tiers.catalog.get(ckpt_id), DISK)
                            add("restore_registry", restore_by(cd, f"{cid}-r3", ckpt_id))
                            # a second checkpoint of the same running container: what the registry already has
                            again = new_id()
                            checkpoint(cd, cid, os.path.join(parent, again))
                            p2 = tiers.push_to_registry(tiers.catalog.get(again))
                            shared.append(p2.shared_bytes / p2.total_bytes)
                            for i in (ckpt_id, again):
                                r = tiers.catalog.get(i)
                                if r is not None:
                                    tiers.remove(r, registry_too=False)
            finally:
                remove(cd, cid)
    finally:
        cd.stop()
        registry.stop()
        subprocess.run(["umount", str(shm)], check=False)
        shutil.rmtree(work, ignore_errors=True)

    result = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "containerd": args.version},
              "container_mib": args.mib, "image_bytes_median": int(statistics.median(sizes)),
              "seconds": {k: stats(v) for k, v in samples.items() if not k.endswith("gbps")},
              "gbps": {k: stats(v) for k, v in samples.items() if k.endswith("gbps")},
              "shared_fraction_second_checkpoint": [round(s, 3) for s in shared]}
    plain, tiered = result["seconds"]["checkpoint_plain"]["median"], result["seconds"]["checkpoint_tiers"]["median"]
    result["checkpoint_overhead_pct"] = round((tiered / plain - 1) * 100, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tier_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Checkpoint tiers, CPU container of {args.mib} MiB ({args.runs} runs, containerd {args.version}, "
             f"{os.cpu_count()} CPUs)", "",
             f"Image: {result['image_bytes_median'] / 2**20:.0f} MiB. Medians (min-max) in seconds.", "",
             "| what | median s | min | max |", "| --- | --- | --- | --- |"]
    for k, v in result["seconds"].items():
        lines.append(f"| {k} | {v['median']} | {v['min']} | {v['max']} |")
    for k, v in result["gbps"].items():
        lines.append(f"| {k} (GB/s) | {v['median']} | {v['min']} | {v['max']} |")
    lines += ["", f"Checkpoint into tier 1 vs plain RAM dir: {result['checkpoint_overhead_pct']:+.1f} % (median).",
              f"Second checkpoint of the same container: {', '.join(f'{s:.0%}' for s in shared)} of its bytes "
              "already in the registry."]
    (out / "tier_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
