"""What the broker parked, on disk: a restarted broker finishes what the killed one began.

One JSON file, ``STATE_DIR/parked.json`` (root's, 0600, in a 0700 dir under /run: gone with the node's
containers at reboot), written atomically (`fsutil.atomic.atomic_write`) before and after each move:

    {"default/c1": {"namespace": "default", "id": "c1", "phase": "parked",
                    "vram": {"GPU-...": 2147483648}, "since": 1790000000.5, "reason": "idle 300 s"}}

A record's phase is the move the broker was making: ``parking`` (written before the Pause),
``parked`` (after it), ``waking`` (before the Resume; the record goes when the Resume returns). On
start, `service.Broker.rebuild` reads each record against containerd's task status: a paused task with
a parking/parked record is parked (its VRAM from the record); a paused task with a waking record was
left half-woken: it is resumed; a running task drops its record. The file holds the VRAM a wake must
bring back, which no one else knows once the driver has moved it to host RAM.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional

from fsutil.atomic import atomic_write
from fsutil.bounded import UnsafeFile, read_regular

from .core import Key

log = logging.getLogger("kybernate.broker")

RECORDS_NAME = "parked.json"
MAX_RECORDS_BYTES = 8 << 20


@dataclass(frozen=True)
class Record:
    namespace: str
    id: str
    phase: str                      # parking | parked | waking
    vram: Mapping[str, int] = field(default_factory=dict)
    since: float = 0.0
    reason: str = ""

    @property
    def key(self) -> Key:
        return (self.namespace, self.id)


class Records:
    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, RECORDS_NAME)
        self._records: dict[Key, Record] = {}

    def load(self) -> dict[Key, Record]:
        """The records on disk (an unreadable file is logged and taken as empty: the broker then
        treats paused tasks as paused by someone else, and never resumes what it does not know)."""
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        try:
            found = read_regular(self.path, MAX_RECORDS_BYTES)
        except (OSError, UnsafeFile) as exc:
            log.error("broker records %s: %s: starting without them", self.path, exc)
            found = None
        records: dict[Key, Record] = {}
        if found is not None:
            try:
                doc = json.loads(found[0].decode())
                for item in doc.values():
                    r = Record(str(item["namespace"]), str(item["id"]), str(item["phase"]),
                               {str(g): int(n) for g, n in dict(item.get("vram", {})).items()},
                               float(item.get("since", 0.0)), str(item.get("reason", "")))
                    records[r.key] = r
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.error("broker records %s are not readable (%s): starting without them", self.path, exc)
                records = {}
        self._records = records
        return dict(records)

    def get(self, key: Key) -> Optional[Record]:
        return self._records.get(key)

    def put(self, record: Record) -> None:
        self._records[record.key] = record
        self._save()

    def drop(self, key: Key) -> None:
        if self._records.pop(key, None) is not None:
            self._save()

    def _save(self) -> None:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        doc = {f"{r.namespace}/{r.id}": asdict(r) for r in self._records.values()}
        atomic_write(self.path, json.dumps(doc, indent=1, sort_keys=True) + "\n", mode=0o600)
