"""`kybernate store serve` and the tier half of `kybernate checkpoints` (ls, rm, push, pull).

    kybernate store serve [--once]            the node's tier worker (`tiers.worker`): copies down,
                                              retries, evicts; run by systemd or the DaemonSet
    kybernate checkpoints ls                  every checkpoint the tiers hold: id, container, size,
                                              tiers, what is still owed (with a progress bar)
    kybernate checkpoints rm ID [--keep-registry]   every copy of a checkpoint, and its record
    kybernate checkpoints push ID             copy to the registry now (the worker's registry step)
    kybernate checkpoints pull ID             fetch from the registry into tier 1 or 2 (the node's operator
                                              is trusted: the checkpoint's own scope is taken)

Only the node's config says where the tiers are (`shim.policy.node`, KYBERNATE_CONFIG).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict

from . import OperatorError
from .checkpoints import human


def tier_store(required: bool = True):
    from shim.policy.node import NodeConfig, NodeConfigError
    from tiers.store import TierStore

    try:
        node = NodeConfig.load()
    except NodeConfigError as exc:
        raise OperatorError(str(exc)) from None
    if not node.tiers:
        if required:
            raise OperatorError(f"the node keeps no checkpoint tiers (node config {node.source}: [store] ram_dir "
                                "and registry are unset)")
        return None
    return TierStore(node)


def bar(done: int, total: int, width: int = 20) -> str:
    frac = 0.0 if total <= 0 else min(1.0, done / total)
    full = int(frac * width)
    return "[" + "#" * full + "." * (width - full) + f"] {frac * 100:3.0f}%"


class ProgressLine:
    """A progress bar on stderr: rewritten on a terminal, a line every 10 s otherwise."""

    def __init__(self, label: str, quiet: bool = False):
        self.label = label
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if not self.tty and now - self.last < 10 and done < total:
            return
        if self.tty and now - self.last < 0.2 and done < total:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-6)
        line = f"{self.label} {bar(done, total)} {human(done)}/{human(total)} {human(rate)}/s"
        if self.tty:
            sys.stderr.write("\r" + line + "\033[K")
            if done >= total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _owed(job, now: float) -> str:
    if job is None:
        return "done"
    step = job.steps[0] if job.steps else "?"
    if job.phase and job.total_bytes:
        return f"copying to {job.phase} {bar(job.done_bytes, job.total_bytes, 10)}"
    if job.last_error:
        wait = max(0, job.next_try - now)
        return f"{step}: retry {job.attempts} in {wait:.0f}s ({job.last_error[:80]})"
    return f"queued: {', '.join(job.steps)}"


def ls(args) -> int:
    tiers = tier_store()
    records = tiers.catalog.records()
    jobs = {j.id: j for j in tiers.catalog.jobs()}
    if args.json:
        print(json.dumps([{**asdict(r), "name": list(r.name), "tiers": list(r.tiers),
                           "job": asdict(jobs[r.id]) if r.id in jobs else None} for r in records], indent=1))
        return 0
    if not records:
        print(f"no checkpoints in the tiers ({', '.join(tiers.describe(t) for t in tiers.tier_names)})")
        return 0
    now = time.time()
    rows = [(r.id, f"{r.scope_text}/{'/'.join(r.name)}", human(r.bytes), ",".join(r.tiers) or "-",
             human(r.shared_bytes) if r.shared_bytes else "-", _owed(jobs.get(r.id), now)) for r in records]
    head = ("ID", "CONTAINER", "SIZE", "TIERS", "SHARED", "STATE")
    widths = [max(len(str(x[i])) for x in rows + [head]) for i in range(5)]
    for row in [head] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row[:5], widths)) + "  " + row[5])
    for t in ("ram", "disk"):
        if tiers.roots[t]:
            cap = tiers.caps[t]
            print(f"{t} tier {tiers.roots[t]}: {human(tiers.used_bytes(t, records))}"
                  + (f" of {human(cap)}" if cap else ""))
    return 0


def _record(tiers, checkpoint_id: str):
    rec = tiers.catalog.get(checkpoint_id)
    if rec is None:
        raise OperatorError(f"no checkpoint {checkpoint_id!r} in this node's tier catalog "
                            f"({tiers.catalog.records_dir})")
    return rec


def rm(args) -> int:
    tiers = tier_store()
    rec = _record(tiers, args.id)
    gone = tiers.remove(rec, registry_too=not args.keep_registry)
    print(f"removed {rec.id} ({human(rec.bytes)}) from {', '.join(gone) or 'no tier'}")
    return 0


def push(args) -> int:
    from tiers import TierError

    tiers = tier_store()
    rec = _record(tiers, args.id)
    if tiers.registry() is None:
        raise OperatorError("the node has no registry tier ([store] registry)")
    try:
        pushed = tiers.push_to_registry(rec, ProgressLine(f"push {rec.id}", args.quiet))
    except TierError as exc:
        raise OperatorError(str(exc)) from None
    job = tiers.catalog.job(rec.id)
    if job is not None:
        rest = tuple(s for s in job.steps if s != "registry")
        if rest:
            from dataclasses import replace
            tiers.catalog.put_job(replace(job, steps=rest))
        else:
            tiers.catalog.drop_job(rec.id)
    print(f"pushed {rec.id} to {tiers.node.store_registry}: {human(pushed.total_bytes)} in {pushed.blobs} blobs, "
          f"{human(pushed.sent_bytes)} sent, {human(pushed.shared_bytes)} already there, {pushed.seconds:.1f} s "
          f"({pushed.total_bytes / max(pushed.seconds, 1e-6) / 1e9:.2f} GB/s)")
    return 0


def pull(args) -> int:
    from tiers import TierError
    from tiers.transfer import inspect

    tiers = tier_store()
    reg = tiers.registry()
    if reg is None:
        raise OperatorError("the node has no registry tier ([store] registry)")
    try:
        image = inspect(reg, args.id)
        t0 = time.monotonic()
        found = tiers.locate(args.id, image.namespace, image.pod_namespace,
                             ProgressLine(f"pull {args.id}", args.quiet))
    except TierError as exc:
        raise OperatorError(str(exc)) from None
    seconds = time.monotonic() - t0
    what = "pulled into" if found.pulled else "already in"
    print(f"{args.id} {what} the {found.tier} tier: {found.root}/{found.name} ({human(image.total_bytes)}"
          + (f", {seconds:.1f} s, {image.total_bytes / max(seconds, 1e-6) / 1e9:.2f} GB/s)" if found.pulled else ")"))
    return 0


NO_TIERS_RECHECK_S = 30.0  # how often a worker on a node without tiers reads the node config again


def serve(args) -> int:
    from tiers.worker import Worker, WorkerBusy, serve_forever

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    tiers = tier_store(required=bool(args.once))
    if tiers is None:
        # a node without tiers (yet): the worker of a DaemonSet or a unit stays up and waits for them
        # rather than exit (and be restarted over and over)
        logging.getLogger("kybernate.tiers").info(
            "tier worker %d: the node keeps no checkpoint tiers ([store] ram_dir and registry are unset): "
            "waiting for them in the node config", os.getpid())
        while tiers is None:
            time.sleep(NO_TIERS_RECHECK_S)
            tiers = tier_store(required=False)
    try:
        if args.once:
            worker = Worker(tiers)
            worker.acquire()
            try:
                n = worker.run_once()
            finally:
                worker.release()
            print(f"{n} job(s) finished, {len(tiers.catalog.jobs())} left")
            return 0
        return serve_forever(tiers, args.poll)
    except WorkerBusy as exc:
        raise OperatorError(str(exc)) from None
