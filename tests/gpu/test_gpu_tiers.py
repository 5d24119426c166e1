"""Checkpoint tiers on the GPU machine (issue 16): a GPU container checkpointed into tier 1, copied to
tier 2 and the registry by the tier worker, restored by id from tier 1, then evicted from tiers 1 and
2 and restored from the registry (pulled into tier 1 inside Create), every byte of its VRAM checked
by the workload itself (bad=0) and its count going on.

The environment and the container are tests/gpu/test_gpu_containers.py's (containerd 1.6, the CUDA
workload image). The registry is Debian's docker-registry (distribution 2.8) on 127.0.0.1 with its
filesystem driver under the test's tmp dir: on a machine without apt, carry a copy of the binary and
name it in KYB_REGISTRY_BINARY. Tier 1 is a directory in SCRATCH (/dev/shm where it has room).

KYB_GPU_OUT: tiers_gpu.json (times: checkpoint, copy to disk, push, restore from tier 1 and from the
registry, image size, push GB/s).
"""
from __future__ import annotations

import json
import secrets
import shutil
from pathlib import Path

import pytest

from tests.gpu.test_gpu_containers import (  # noqa: F401 - env and results are fixtures, used by name
    GiB, MiB, OUT, RESTORE_ANNOTATION, SCRATCH, SKIP, GpuContainer, assert_running_intact, env, grpc_checkpoint, results,
    ticks, timed)
from tests.registry_support import LocalRegistry, has_basic_auth, unavailable_reason

REGISTRY_SKIP = unavailable_reason()
pytestmark = pytest.mark.skipif(SKIP is not None or REGISTRY_SKIP is not None, reason=SKIP or REGISTRY_SKIP or "")
NBYTES = 2 * GiB


def _restore(env, name: str, checkpoint_id: str, before: int) -> dict:
    r = GpuContainer(env, name, NBYTES)
    _, seconds = timed(r.ctr, *r.run_args({RESTORE_ANNOTATION: checkpoint_id}), timeout=600)
    env.containers.append(r)
    first = r.wait_tick(0, timeout=60)
    assert first.n > before, f"{name}: count {first.n} does not go on from {before}: a fresh start"
    seen = assert_running_intact(r, {0: first.n}, f"{name} restored by id", NBYTES // MiB)
    r.remove()
    return {"restore_s": seconds, "first_tick": first.n, "ticks_later": seen[0]}


def test_gpu_checkpoint_in_the_registry_restores_with_every_byte(env, tmp_path):
    from shim.policy.node import NodeConfig
    from shim.policy.store import make_dirs
    from tiers import DISK, RAM
    from tiers.ids import new_id
    from tiers.store import TierStore
    from tiers.worker import Worker

    results: dict = {}
    registry = LocalRegistry(tmp_path, auth=has_basic_auth()).start()
    ram = SCRATCH / f"kyb-tier1-{secrets.token_hex(3)}"
    ram.mkdir(mode=0o700)
    store = {"ram_dir": str(ram), "state_dir": str(tmp_path / "tier-state"), "registry": registry.reference("kyb/gpu"),
             "registry_plain_http": True, "min_idle_s": 0}
    if registry.auth:
        store["credentials_file"] = str(registry.credentials_file)
    try:
        with env.cd.node_config(store=store) as config_path:
            tiers = TierStore(NodeConfig.load(path=str(config_path)))
            c = GpuContainer(env, "tier-src", NBYTES).start()
            before = ticks(c)[0]
            checkpoint_id = new_id()
            image = Path(make_dirs(str(ram), [env.cd.namespace, "_", c.id])) / checkpoint_id
            results["checkpoint_s"] = grpc_checkpoint(env, c.id, image, exit=True)
            c.remove()
            rec = tiers.catalog.get(checkpoint_id)
            assert rec is not None and rec.tiers == (RAM,) and rec.gpu and rec.sealed, rec
            results["image_bytes"] = rec.bytes
            results["copy_down_s"] = timed(tiers.copy_down, rec)[1]
            pushed = tiers.push_to_registry(tiers.catalog.get(checkpoint_id))
            tiers.catalog.drop_job(checkpoint_id)
            results.update(push_s=round(pushed.seconds, 3), push_gbps=round(pushed.total_bytes / pushed.seconds / 1e9, 3),
                           blobs=pushed.blobs)
            results["from_ram"] = _restore(env, "tier-r-ram", checkpoint_id, before)
            tiers.drop_tier(tiers.catalog.get(checkpoint_id), RAM)
            tiers.drop_tier(tiers.catalog.get(checkpoint_id), DISK)
            assert tiers.catalog.get(checkpoint_id).tiers == ("registry",)
            results["from_registry"] = _restore(env, "tier-r-reg", checkpoint_id, before)
            assert tiers.catalog.get(checkpoint_id).ram, "pulled into tier 1"
            assert Worker(tiers).run_once(evict=False) >= 0
    finally:
        registry.stop()
        shutil.rmtree(ram, ignore_errors=True)
        if OUT:
            Path(OUT).mkdir(parents=True, exist_ok=True)
            (Path(OUT) / "tiers_gpu.json").write_text(json.dumps(results, indent=1) + "\n")
