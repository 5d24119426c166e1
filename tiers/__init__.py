"""Checkpoint tiers: where a checkpoint image lives after the dump, and how it comes back.

    tier 1 "ram"       a tmpfs directory ([store] ram_dir, capped by ram_cap_mib): restore in about a second
    tier 2 "disk"      a local disk directory ([store] disk_dir, else checkpoint.store; disk_cap_mib)
    tier 3 "registry"  an OCI repository ([store] registry): for surviving the node, and for moving a
                       workload to another node

Both directory tiers are laid out like the checkpoint store (`shim.policy.store`): ``ROOT/<containerd
namespace>/<Kubernetes namespace or _>/<name...>/<checkpoint id>``, so a pod's scope is the same
directory in each, and the store's resolution (openat2 beneath the scope) finds an image in either.
A checkpoint id (`tiers.ids`) is unique across nodes (a UTC time and 32 random bits) and is the
registry tag too, so one id names a checkpoint in every tier and on every node.

Who does what:
- the shim, once a checkpoint is whole and sealed in tier 1 (or tier 2 when tier 1 has no room, said
  in its log), records it in the catalog and queues a copy-down job (`tiers.catalog`): a few small
  files, so the checkpoint returns as fast as a plain one;
- the node's worker (`kybernate store serve`, `tiers.worker`) copies each queued checkpoint down
  (RAM -> disk -> registry), retries with back-off, resumes after a crash from the state on disk
  (jobs are files; blobs already in the registry are not sent again), and evicts by LRU once a lower
  tier holds an image (never one that no lower tier holds), keeping the last N per container;
- a restore by id (kybernate.io/restore-from, `kybernate restore --from ID`) finds it in the fastest
  tier that holds it; from the registry it is pulled in parallel chunks into tier 1 or 2 first
  (`tiers.transfer`), each blob checked against its sha256 digest, and then the restore's usual
  checks run on it: the seal first (`shim.checkpoint.seal`), then the CRIU image check.

Trust: the node config is trusted; a checkpoint id from a pod is not (checked against `tiers.ids.ID`,
resolved in the pod's own scope only); the registry's answers are not (a manifest is size-capped and
shape-checked, file names are single components, every blob's digest is checked while it streams,
and the seal decides whether the image is restored at all).

This package imports the shim's policy (node config, store layout, audit) and `criu` and `fsutil`,
never `shim.task` or `shim.checkpoint`: the worker runs without the shim.
"""
from __future__ import annotations

RAM, DISK, REGISTRY = "ram", "disk", "registry"
TIER_NAMES = (RAM, DISK, REGISTRY)


class TierError(Exception):
    """Something about one checkpoint in one tier: ``kind`` says what (unknown, foreign-scope,
    unreachable, unauthorized, not-found, server-error, missing-blob, corrupt, malformed, full,
    io, config: the node's registry settings or credentials file are unusable), the message names
    the id and the tier."""

    def __init__(self, checkpoint_id: str, tier: str, kind: str, why: str):
        self.checkpoint_id = checkpoint_id
        self.tier = tier
        self.kind = kind
        self.why = why
        super().__init__(f"checkpoint {checkpoint_id} ({tier} tier): {why}")
