"""The tier store's state on disk: what each checkpoint is, which tiers hold it, and the worker's jobs.

    STATE/catalog/<id>.json   a `Record`: whose checkpoint (scope, container), its size, GPU record,
                              seal, rootfs diff, the tiers that hold it, when it was last used
    STATE/queue/<id>.json     a `Job`: the copies still owed (disk, registry), attempts, the next try,
                              the last error, progress (for `kybernate checkpoints ls`)
    STATE/lock                flock(2) around every read-modify-write (shims and the worker share it)

One small file per checkpoint, each replaced atomically (`fsutil.atomic`): a shim registers a
checkpoint with two writes and no scan, a crash leaves every file whole, and a worker that restarts
finds its jobs where it left them. STATE is root's alone (0700): it names where images are.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Iterator, Optional

from fsutil.atomic import atomic_write
from fsutil.bounded import UnsafeFile, read_regular

from tiers import DISK, RAM, REGISTRY
from tiers.ids import is_id

MAX_RECORD_BYTES = 1 << 20


@dataclass(frozen=True)
class Record:
    id: str
    namespace: str                 # containerd namespace
    pod_namespace: str             # Kubernetes namespace, "" for a plain containerd container
    name: tuple[str, ...]          # (pod, container) or (container id,): the store layout below the scope
    container_id: str = ""
    created: float = 0.0
    last_used: float = 0.0
    bytes: int = 0
    gpu: bool = False
    sealed: bool = False
    rootfs_diff: bool = False
    ram: bool = False              # tier 1 holds a whole copy
    disk: bool = False             # tier 2 holds a whole copy
    registry: str = ""             # the manifest's digest once the registry holds it ("" = not there)
    shared_bytes: int = 0          # of its registry blobs, bytes already there from earlier checkpoints

    def holds(self, tier: str) -> bool:
        return {RAM: self.ram, DISK: self.disk, REGISTRY: bool(self.registry)}[tier]

    @property
    def tiers(self) -> tuple[str, ...]:
        return tuple(t for t in (RAM, DISK, REGISTRY) if self.holds(t))

    @property
    def scope_text(self) -> str:
        return f"{self.namespace}/{self.pod_namespace or '_'}"

    @property
    def container_key(self) -> tuple:
        """Checkpoints of one container (for keep_last): its scope and name."""
        return (self.namespace, self.pod_namespace, self.name)

    def to_json(self) -> str:
        doc = asdict(self)
        doc["name"] = list(self.name)
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_doc(cls, doc: dict) -> "Record":
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in doc.items() if k in known}
        values["name"] = tuple(values.get("name") or ())
        return cls(**values)


@dataclass(frozen=True)
class Job:
    """Copies owed for one checkpoint. ``steps``: what is left, in order (disk, registry)."""

    id: str
    steps: tuple[str, ...]
    attempts: int = 0
    next_try: float = 0.0
    last_error: str = ""
    phase: str = ""                # what the worker does now: "disk", "registry"
    done_bytes: int = 0
    total_bytes: int = 0
    queued: float = field(default_factory=time.time)

    def to_json(self) -> str:
        doc = asdict(self)
        doc["steps"] = list(self.steps)
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_doc(cls, doc: dict) -> "Job":
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in doc.items() if k in known}
        values["steps"] = tuple(values.get("steps") or ())
        return cls(**values)


class Catalog:
    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.records_dir = os.path.join(state_dir, "catalog")
        self.queue_dir = os.path.join(state_dir, "queue")

    def ensure(self) -> "Catalog":
        for d in (self.state_dir, self.records_dir, self.queue_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        return self

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.ensure()
        fd = os.open(os.path.join(self.state_dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ---- records ------------------------------------------------------------------------------
    def _path(self, directory: str, checkpoint_id: str) -> str:
        if not is_id(checkpoint_id):
            raise ValueError(f"{checkpoint_id!r} is not a checkpoint id")
        return os.path.join(directory, checkpoint_id + ".json")

    def _read(self, path: str) -> Optional[dict]:
        try:
            found = read_regular(path, MAX_RECORD_BYTES)
        except (OSError, UnsafeFile):
            return None
        if found is None:
            return None
        try:
            doc = json.loads(found[0])
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    def get(self, checkpoint_id: str) -> Optional[Record]:
        if not is_id(checkpoint_id):
            return None
        doc = self._read(self._path(self.records_dir, checkpoint_id))
        try:
            return Record.from_doc(doc) if doc else None
        except TypeError:
            return None

    def put(self, record: Record) -> None:
        self.ensure()
        atomic_write(self._path(self.records_dir, record.id), record.to_json(), mode=0o600)

    def update(self, checkpoint_id: str, **changes) -> Optional[Record]:
        """Change fields of a record under the lock; None when it is gone."""
        with self.lock():
            rec = self.get(checkpoint_id)
            if rec is None:
                return None
            rec = replace(rec, **changes)
            self.put(rec)
            return rec

    def remove(self, checkpoint_id: str) -> None:
        for d in (self.records_dir, self.queue_dir):
            try:
                os.unlink(self._path(d, checkpoint_id))
            except FileNotFoundError:
                pass

    def _ids(self, directory: str) -> list[str]:
        try:
            names = os.listdir(directory)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return []
            raise
        return sorted(n[:-5] for n in names if n.endswith(".json") and is_id(n[:-5]))

    def records(self) -> list[Record]:
        out = []
        for i in self._ids(self.records_dir):
            rec = self.get(i)
            if rec is not None:
                out.append(rec)
        return out

    # ---- jobs ---------------------------------------------------------------------------------
    def job(self, checkpoint_id: str) -> Optional[Job]:
        doc = self._read(self._path(self.queue_dir, checkpoint_id))
        try:
            return Job.from_doc(doc) if doc else None
        except TypeError:
            return None

    def put_job(self, job: Job) -> None:
        self.ensure()
        atomic_write(self._path(self.queue_dir, job.id), job.to_json(), mode=0o600)

    def drop_job(self, checkpoint_id: str) -> None:
        try:
            os.unlink(self._path(self.queue_dir, checkpoint_id))
        except FileNotFoundError:
            pass

    def jobs(self) -> list[Job]:
        out = []
        for i in self._ids(self.queue_dir):
            job = self.job(i)
            if job is not None:
                out.append(job)
        return out
