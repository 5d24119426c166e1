"""The node's tier worker: `kybernate store serve`.

A checkpoint returns once its image is whole in the first tier; the copies down (tier 1 -> tier 2
-> registry) are owed by the node, not by the pod's short-lived shim. The shim leaves a job file
(`tiers.catalog`); this worker, one per node (run by systemd or the installer's DaemonSet), works
through them:

- a job's steps run in order (disk, then registry); each finished step is written back to the job
  file before the next starts, and the job file is removed only when every step is done, so a
  worker killed at any point finds on restart exactly what is still owed;
- a copy to disk goes through a hidden directory renamed into place (a half copy is never taken for
  a whole one, and the next try removes it); a push sends only blobs the registry lacks and tags the
  manifest last, so a push broken off by a crash or an unreachable registry resumes where it
  stopped, and nothing is uploaded twice;
- a failed step is retried with exponential back-off (2 s doubling, at most `MAX_BACKOFF_S`); the
  error is kept in the job for `kybernate checkpoints ls`; the image stays restorable from the tier
  that holds it meanwhile;
- after each round, `TierStore.evict` applies keep_last and the caps.

Only one worker serves a state dir at a time (flock on STATE/worker.lock).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import threading
import time
from dataclasses import replace
from typing import Callable, Optional

from tiers import DISK, REGISTRY, TierError
from tiers.catalog import Job
from tiers.store import TierStore

log = logging.getLogger("kybernate.tiers")

MAX_BACKOFF_S = 300.0
FIRST_BACKOFF_S = 2.0
POLL_S = 1.0
PROGRESS_EVERY_S = 0.5


class WorkerBusy(Exception):
    """Another worker holds the state dir."""


class Worker:
    def __init__(self, tiers: TierStore, clock: Callable[[], float] = time.time):
        self.tiers = tiers
        self.catalog = tiers.catalog
        self.clock = clock
        self._lock_fd: Optional[int] = None

    def acquire(self) -> None:
        self.catalog.ensure()
        fd = os.open(os.path.join(self.catalog.state_dir, "worker.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise WorkerBusy(f"another worker serves {self.catalog.state_dir}") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- one job --------------------------------------------------------------------------------
    def run_job(self, job: Job) -> bool:
        """Do what the job still owes; True when it is done (the job file is gone)."""
        rec = self.catalog.get(job.id)
        if rec is None:
            self.catalog.drop_job(job.id)
            return True
        try:
            for step in job.steps:
                job = replace(job, phase=step, done_bytes=0, total_bytes=rec.bytes)
                self.catalog.put_job(job)
                if step == DISK and not rec.disk:
                    rec = self.tiers.copy_down(rec)
                    log.info("checkpoint %s: copied to the disk tier", rec.id)
                elif step == REGISTRY and not rec.registry:
                    pushed = self.tiers.push_to_registry(rec, self._progress(job))
                    rec = self.catalog.get(rec.id) or rec
                    log.info("checkpoint %s: in registry %s (%d bytes, %d blobs: %d sent, %d already there) "
                             "in %.2fs", rec.id, self.tiers.node.store_registry, pushed.total_bytes, pushed.blobs,
                             pushed.sent_bytes, pushed.shared_bytes, pushed.seconds)
                job = replace(job, steps=job.steps[1:], attempts=0, last_error="")
                if job.steps:
                    self.catalog.put_job(job)
        except (TierError, OSError, ValueError) as exc:
            attempts = job.attempts + 1
            delay = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (attempts - 1))
            why = f"{exc.kind}: {exc.why}" if isinstance(exc, TierError) else str(exc)
            job = replace(job, attempts=attempts, next_try=self.clock() + delay, last_error=why[:500], phase="")
            self.catalog.put_job(job)
            log.warning("checkpoint %s: %s step failed (attempt %d, next in %.0fs): %s", job.id,
                        job.steps[0] if job.steps else "?", attempts, delay, exc)
            return False
        self.catalog.drop_job(job.id)
        return True

    def _progress(self, job: Job):
        last = [0.0]

        def report(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S or done == total:
                last[0] = now
                try:
                    self.catalog.put_job(replace(job, done_bytes=done, total_bytes=total))
                except OSError:
                    pass
        return report

    # ---- the loop -----------------------------------------------------------------------------
    def run_once(self, now: Optional[float] = None, evict: bool = True) -> int:
        """Every job that is due, oldest first; then eviction. Returns the number of jobs finished."""
        now = self.clock() if now is None else now
        done = 0
        for job in sorted(self.catalog.jobs(), key=lambda j: (j.queued, j.id)):
            if job.next_try <= now and self.run_job(job):
                done += 1
        if evict:
            try:
                self.tiers.evict(now)
            except (TierError, OSError) as exc:
                log.warning("eviction: %s", exc)
        return done

    def serve(self, stop: Optional[threading.Event] = None, poll_s: float = POLL_S) -> None:
        stop = stop or threading.Event()
        self.acquire()
        try:
            log.info("tier worker %d serving %s (tiers: %s)", os.getpid(), self.catalog.state_dir,
                     ", ".join(self.tiers.describe(t) for t in self.tiers.tier_names))
            while not stop.is_set():
                self.run_once()
                stop.wait(poll_s)
        finally:
            self.release()


def serve_forever(tiers: TierStore, poll_s: float = POLL_S) -> int:
    """The command's loop: SIGTERM and SIGINT end it after the step under way."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    Worker(tiers).serve(stop, poll_s)
    return 0
