"""What one CUDA suspend did, and the GPU record (``kybernate-gpu.json``) kept in a checkpoint image.

The record says which GPUs (UUIDs) the checkpointed processes used, the container's GPUs in its
spec's order, their models and the driver's versions, so that a restore elsewhere can decide its
placement (`shim.gpu.placement`). A record read back from an image is untrusted: it is read as a
regular file only (no symlink), size-capped, and it never names anything the shim loads or runs.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from fsutil.atomic import atomic_write
from fsutil.bounded import UnsafeFile, read_regular

RECORD_NAME = "kybernate-gpu.json"
RECORD_FORMAT = 1
MAX_RECORD_BYTES = 1 << 20


@dataclass
class SuspendedProcess:
    pid: int
    name: str
    before: str  # the driver's state when we found it: running, locked, checkpointed
    steps: tuple[str, ...]
    gpus: list[str]
    gpus_source: str  # "device-files": the /dev/nvidiaN it held open; "all-visible": could not tell

    def to_dict(self) -> dict:
        return {"pid": self.pid, "name": self.name, "state_before": self.before, "steps": list(self.steps),
                "gpus": self.gpus, "gpus_source": self.gpus_source}


@dataclass
class Suspension:
    """The CUDA processes one suspend moved to CHECKPOINTED, and the state each is to go back to."""

    reason: str  # "checkpoint" or "pause"
    processes: list[SuspendedProcess]
    seconds: float
    lock_timeout_ms: int
    driver_version: int
    visible_gpus: list[str]
    timings: dict = field(default_factory=dict)
    placement: dict = field(default_factory=dict)  # container GPUs, models, driver release (gpu_placement)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    @property
    def gpus(self) -> list[str]:
        return sorted({g for p in self.processes for g in p.gpus})

    def record(self, container_id: str, extra: Optional[dict] = None) -> dict:
        out = {"format": RECORD_FORMAT, "container": container_id,
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "suspended_by": self.reason, "driver_version": self.driver_version,
               "visible_gpus": self.visible_gpus, "gpus": self.gpus,
               "lock_timeout_ms": self.lock_timeout_ms, "suspend_seconds": round(self.seconds, 6),
               "processes": [p.to_dict() for p in self.processes], "timings": self.timings}
        out.update(self.placement)
        out.update(extra or {})
        return out


class RecordError(ValueError):
    """A GPU record that is there but cannot be trusted to be one (a link, too big, not JSON)."""


def write_record(image_dir: str, record: dict) -> str:
    path = os.path.join(image_dir, RECORD_NAME)
    atomic_write(path, json.dumps(record, indent=1).encode(), mode=0o600)
    return path


def has_record(image_dir: str) -> bool:
    """Whether the image holds a GPU record at all (a link counts: read_record refuses it)."""
    return os.path.lexists(os.path.join(image_dir, RECORD_NAME))


def read_record(image_dir: str) -> Optional[dict]:
    """The image's GPU record; None where it has none. A record that is a symlink, not a regular
    file, over MAX_RECORD_BYTES or not a JSON object raises RecordError (the image is untrusted)."""
    path = os.path.join(image_dir, RECORD_NAME)
    try:
        found = read_regular(path, MAX_RECORD_BYTES)
    except UnsafeFile as exc:
        raise RecordError(f"{exc} (a GPU record must be a small regular file)") from exc
    except OSError as exc:
        raise RecordError(f"{path}: {exc.strerror}") from exc
    if found is None:
        return None
    data, _ = found
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise RecordError(f"{path}: not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise RecordError(f"{path}: not a JSON object")
    return doc
