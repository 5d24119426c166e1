"""A container's broker annotations (untrusted: the pod's author writes them) -> its policy.

    kybernate.io/idle-release-after: 300s      park after this long with no GPU activity
                                               (Go-style duration: 1h30m, 5m, 90s, 1.5h; 1 s .. 30 days)
    kybernate.io/wake-port: "8080[,9090]"      TCP ports whose connections wake it when parked
                                               (default: every TCP port its processes listen on;
                                               "none": no wake on connect)
    kybernate.io/gpu-priority: "10"            make-room order: lower priorities are parked first
                                               (a whole number, -1000 .. 1000; default 0)

A malformed value is refused as the shim refuses one (`shim.policy.audit.refuse`: an audit line on
``kybernate.audit`` naming the container, the key and the value), and the broker then leaves the
container alone: no idle release, never parked to make room, its front off. The container runs on
untouched; `kybernate ps` shows why.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional

from ttrpc.codes import Code

from shim.policy.audit import refuse

from . import GPU_PRIORITY, IDLE_RELEASE_AFTER, WAKE_PORT

MIN_IDLE_S = 1.0
MAX_IDLE_S = 30 * 86400.0
MIN_PRIORITY, MAX_PRIORITY = -1000, 1000
MAX_WAKE_PORTS = 16
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h))+")
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_INTEGER = re.compile(r"[+-]?\d{1,6}")


@dataclass(frozen=True)
class Policy:
    """What the broker may do with one container. ``refused``: the refusal's sentence when an
    annotation was malformed (then nothing else here applies: the broker leaves it alone)."""

    idle_release_after: Optional[float] = None   # seconds; None: never parked, never evicted
    wake_ports: Optional[tuple[int, ...]] = None  # None: its listening ports; (): no front
    priority: int = 0
    refused: str = ""

    @property
    def managed(self) -> bool:
        """The broker may park it (idle release, or to make room)."""
        return self.idle_release_after is not None and not self.refused


def parse_duration(text: str) -> float:
    """Seconds in a Go-style duration ("300s", "5m", "1h30m", "250ms"); ValueError otherwise."""
    value = text.strip()
    if not _DURATION.fullmatch(value):
        raise ValueError("not a duration: write a number and a unit (ms, s, m, h), e.g. 300s or 1h30m")
    return sum(float(n) * _UNIT_S[unit] for n, unit in _PART.findall(value))


def policy_of(annotations: Mapping[str, object], container_id: str, namespace: str) -> Policy:
    """The container's policy from its annotations; a malformed one gives ``Policy(refused=...)``
    and an audit line (never an exception: the container keeps running as it is)."""
    try:
        return Policy(idle_release_after=_idle_after(annotations, container_id, namespace),
                      wake_ports=_wake_ports(annotations, container_id, namespace),
                      priority=_priority(annotations, container_id, namespace))
    except _Refused as exc:
        return Policy(refused=str(exc))


class _Refused(Exception):
    pass


def _refuse(container_id: str, namespace: str, key: str, value: object, why: str) -> _Refused:
    err = refuse(Code.INVALID_ARGUMENT, container_id, key, value, why, action="broker: manage",
                 namespace=namespace)
    return _Refused(err.message)


def _idle_after(ann: Mapping[str, object], cid: str, ns: str) -> Optional[float]:
    if IDLE_RELEASE_AFTER not in ann:
        return None
    value = ann[IDLE_RELEASE_AFTER]
    try:
        seconds = parse_duration(str(value))
    except ValueError as exc:
        raise _refuse(cid, ns, IDLE_RELEASE_AFTER, value, str(exc)) from None
    if not MIN_IDLE_S <= seconds <= MAX_IDLE_S:
        raise _refuse(cid, ns, IDLE_RELEASE_AFTER, value,
                      f"must be between {MIN_IDLE_S:g} s and {MAX_IDLE_S / 86400:g} days")
    return seconds


def _wake_ports(ann: Mapping[str, object], cid: str, ns: str) -> Optional[tuple[int, ...]]:
    if WAKE_PORT not in ann:
        return None
    value = ann[WAKE_PORT]
    text = str(value).strip()
    if text.lower() == "none":
        return ()
    ports: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise _refuse(cid, ns, WAKE_PORT, value,
                          "must be TCP port numbers (1-65535) separated by commas, or none")
        if int(item) not in ports:
            ports.append(int(item))
    if len(ports) > MAX_WAKE_PORTS:
        raise _refuse(cid, ns, WAKE_PORT, value, f"at most {MAX_WAKE_PORTS} ports")
    return tuple(ports)


def _priority(ann: Mapping[str, object], cid: str, ns: str) -> int:
    if GPU_PRIORITY not in ann:
        return 0
    value = ann[GPU_PRIORITY]
    text = str(value).strip()
    if not _INTEGER.fullmatch(text) or not MIN_PRIORITY <= int(text) <= MAX_PRIORITY:
        raise _refuse(cid, ns, GPU_PRIORITY, value,
                      f"must be a whole number from {MIN_PRIORITY} to {MAX_PRIORITY}")
    return int(text)
