"""`kybernate checkpoints`: what the node's checkpoint store holds, and which of it cannot be restored.

A checkpoint directory is "complete" (our completion marker and CRIU's inventory), "in-progress" (a
shim is writing it now), "abandoned" (the shim writing it was killed: a half image, never restorable)
or "incomplete" (a failed dump, or not ours). `kybernate restore` picks the newest complete one and
says which newer ones it skipped; `prune` removes abandoned ones (never one in progress, never one
outside the store).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from . import OperatorError


@dataclass(frozen=True)
class StoredCheckpoint:
    path: str
    scope: str       # <containerd ns>/<k8s ns or _>/<name...>
    status: str      # complete | in-progress | abandoned | incomplete
    why: str
    size_bytes: int


def tree_size(path) -> int:
    """Bytes of the regular files below `path` (or of the file `path`), links not followed."""
    if os.path.isfile(path) and not os.path.islink(path):
        return os.lstat(path).st_size
    total = 0
    for root, _dirs, files in os.walk(path, followlinks=False):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _candidates(store: Path) -> list[Path]:
    """Directories that hold a checkpoint (a marker of ours or CRIU's inventory), deepest first found."""
    from criu.images import COMPLETE_MARKER, IN_PROGRESS_MARKER, INVENTORY

    out = []
    for root, dirs, files in os.walk(store, followlinks=False):
        if {COMPLETE_MARKER, IN_PROGRESS_MARKER, INVENTORY} & set(files):
            out.append(Path(root))
            dirs[:] = []  # a checkpoint has no checkpoints below it
    return sorted(out)


def list_store(store: str) -> list[StoredCheckpoint]:
    from criu.images import checkpoint_status

    root = Path(store)
    if not root.is_dir():
        return []
    out = []
    for d in _candidates(root):
        status, why = checkpoint_status(d)
        out.append(StoredCheckpoint(str(d), str(d.parent.relative_to(root)), status, why, tree_size(d)))
    return out


def newest_complete(parent: Path) -> tuple[Path, list[tuple[Path, str, str]]]:
    """The newest complete checkpoint directly under `parent` (names sort by time), and the newer ones
    skipped on the way: (dir, status, why)."""
    from criu.images import checkpoint_status

    skipped = []
    for d in sorted((p for p in parent.glob("*") if p.is_dir() and not p.is_symlink()), key=lambda p: p.name,
                    reverse=True):
        status, why = checkpoint_status(d)
        if status == "complete":
            return d, skipped
        skipped.append((d, status, why))
    raise OperatorError(f"no complete checkpoint under {parent}" + (
        ": " + "; ".join(f"{d.name} is {status} ({why})" for d, status, why in skipped) if skipped else ""))


def _remove_on_one_device(path: str) -> None:
    """Delete a checkpoint directory without descending into anything on another device (a mount)."""
    root_dev = os.lstat(path).st_dev
    for top, dirs, files in os.walk(path, topdown=False, followlinks=False):
        for name in files:
            os.unlink(os.path.join(top, name))
        for name in dirs:
            p = os.path.join(top, name)
            if os.path.islink(p):
                os.unlink(p)
            elif os.lstat(p).st_dev == root_dev:
                os.rmdir(p)
    os.rmdir(path)


def prune(store: str) -> list[StoredCheckpoint]:
    """Remove the abandoned half images of the store; returns what was removed."""
    removed = []
    for cp in list_store(store):
        if cp.status == "abandoned":
            _remove_on_one_device(cp.path)
            removed.append(cp)
    return removed


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def checkpoint_store() -> str:
    """The node's checkpoint store, from the node config the shim reads too (KYBERNATE_CONFIG)."""
    from shim.policy.node import NodeConfig, NodeConfigError

    try:
        return NodeConfig.load().checkpoint_store
    except NodeConfigError as exc:
        raise OperatorError(str(exc)) from None


def main(args) -> int:
    store = checkpoint_store()
    if args.action == "prune":
        removed = prune(store)
        for cp in removed:
            print(f"removed {cp.path} ({human(cp.size_bytes)}, {cp.why})")
        print(f"{len(removed)} abandoned checkpoint(s) removed from {store}")
        return 0
    rows = list_store(store)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1))
        return 0
    if not rows:
        print(f"no checkpoints in {store}")
        return 0
    width = max(len(r.scope) for r in rows)
    print(f"{'SCOPE':<{width}}  {'CHECKPOINT':<24} {'STATUS':<12} {'SIZE':>10}  NOTE")
    for r in rows:
        print(f"{r.scope:<{width}}  {os.path.basename(r.path):<24} {r.status:<12} {human(r.size_bytes):>10}  {r.why}")
    bad = [r for r in rows if r.status in ("abandoned", "incomplete")]
    if bad:
        print(f"{len(bad)} checkpoint(s) cannot be restored; `kybernate checkpoints prune` removes the abandoned ones")
    return 0

