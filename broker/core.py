"""The broker's decisions, sans IO: given a snapshot of the node, who is parked, who makes room.

Nothing here reads a clock, a socket or the GPU: `Snapshot` holds what the broker saw (its GPUs'
free VRAM, each container's phase, VRAM and last GPU activity, and its policy) and the functions
answer with plain values. The service (`broker.service`) takes the locks and does the moves.

- `due_for_release(snapshot)`: resident containers with idle release whose GPUs have done no work
  for at least that long, least recently active first.
- `plan_room(snapshot, key, min_idle)`: what a wake of ``key`` needs: nothing when its VRAM fits in
  what is free on each of its GPUs; else the idle containers to park first, lowest
  ``kybernate.io/gpu-priority`` first and, within a priority, least recently used first, never one
  without idle release, never one that did GPU work in the last ``min_idle`` seconds; else `NoRoom`,
  which names what holds the GPU and why each holder stays.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

Key = tuple[str, str]   # (containerd namespace, container id)

GiB = 1 << 30


class Phase(str, enum.Enum):
    RESIDENT = "resident"   # running, its VRAM on the GPU
    PARKING = "parking"     # a pause through containerd under way
    PARKED = "parked"       # paused by the broker: VRAM in host RAM, process frozen
    WAKING = "waking"       # a resume under way
    PAUSED = "paused"       # paused by someone else (ctr task pause): the broker leaves it alone


@dataclass(frozen=True)
class Gpu:
    uuid: str
    total: int      # bytes
    free: int       # bytes, as the driver reports them now


@dataclass(frozen=True)
class Member:
    """One container as the broker sees it."""

    namespace: str
    id: str
    phase: Phase
    vram: Mapping[str, int] = field(default_factory=dict)  # GPU uuid -> bytes: held now (resident),
    #                                                         held when parked (what a wake brings back)
    last_active: float = 0.0        # when its GPUs last did work (a wake counts as work)
    since: float = 0.0              # when it entered its phase
    idle_release_after: Optional[float] = None   # None: never parked, never evicted
    priority: int = 0
    label: str = ""                 # NS/POD/CONTAINER for Kubernetes containers

    @property
    def key(self) -> Key:
        return (self.namespace, self.id)

    @property
    def name(self) -> str:
        return self.label or f"{self.namespace}/{self.id}"

    @property
    def gpus(self) -> tuple[str, ...]:
        return tuple(sorted(g for g, n in self.vram.items() if n > 0))

    @property
    def total_vram(self) -> int:
        return sum(self.vram.values())

    def idle_for(self, now: float) -> float:
        return max(0.0, now - self.last_active)


@dataclass(frozen=True)
class Snapshot:
    now: float
    gpus: Mapping[str, Gpu]
    members: Mapping[Key, Member]


def due_for_release(snapshot: Snapshot) -> list[Member]:
    """Resident containers whose idle time has reached their idle-release-after."""
    due = [m for m in snapshot.members.values()
           if m.phase is Phase.RESIDENT and m.idle_release_after is not None and m.total_vram > 0
           and m.idle_for(snapshot.now) >= m.idle_release_after]
    return sorted(due, key=lambda m: (m.last_active, m.namespace, m.id))


def eviction_order(members) -> list[Member]:
    """Lowest priority first; within a priority the least recently used first."""
    return sorted(members, key=lambda m: (m.priority, m.last_active, m.namespace, m.id))


def why_it_stays(member: Member, now: float, min_idle: float) -> str:
    """Why ``member`` may not be parked to make room ("" when it may)."""
    if member.idle_release_after is None:
        return "no idle release"
    if member.phase is not Phase.RESIDENT:
        return member.phase.value
    if member.idle_for(now) < min_idle:
        return f"busy: GPU work {member.idle_for(now):.0f} s ago"
    return ""


@dataclass(frozen=True)
class Holder:
    """Something that holds VRAM on a GPU a wake needs."""

    name: str           # a container's name, or "other processes"
    gpu: str
    bytes: int
    stays: str          # why it is not parked ("" for those the plan would park)


@dataclass(frozen=True)
class RoomPlan:
    """Park ``evict`` (in this order), then wake ``target``."""

    target: Member
    evict: tuple[Member, ...]
    needed: Mapping[str, int]
    free: Mapping[str, int]


@dataclass(frozen=True)
class NoRoom:
    target: Member
    gpu: str
    needed: int
    free: int
    freeable: int
    holders: tuple[Holder, ...]
    missing_gpu: bool = False

    def message(self) -> str:
        if self.missing_gpu:
            return f"cannot wake {self.target.name}: its GPU {self.gpu} is not on this node"
        held = ", ".join(f"{h.name} ({_gib(h.bytes)}" + (f", {h.stays})" if h.stays else ")")
                         for h in self.holders) or "nothing the broker knows"
        return (f"cannot wake {self.target.name}: it needs {_gib(self.needed)} on GPU {self.gpu}, "
                f"{_gib(self.free)} is free and parking idle containers would free {_gib(self.freeable)} more; "
                f"the GPU is held by {held}")


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def plan_room(snapshot: Snapshot, key: Key, min_idle: float,
              reserved: Optional[Mapping[str, int]] = None) -> Union[RoomPlan, NoRoom]:
    """What a wake of ``key`` takes (see the module docstring). ``reserved``: VRAM per GPU that
    wakes under way will take and the driver does not show as used yet."""
    target = snapshot.members[key]
    reserved = reserved or {}
    needed = {g: n for g, n in target.vram.items() if n > 0}
    free: dict[str, int] = {}
    for g in sorted(needed):
        if g not in snapshot.gpus:
            return NoRoom(target, g, needed[g], 0, 0, (), missing_gpu=True)
        free[g] = snapshot.gpus[g].free - reserved.get(g, 0)
    deficit = {g: needed[g] - free[g] for g in needed if needed[g] > free[g]}
    if not deficit:
        return RoomPlan(target, (), needed, free)

    now = snapshot.now
    others = [m for m in snapshot.members.values() if m.key != key]
    candidates = eviction_order(m for m in others
                                if not why_it_stays(m, now, min_idle) and any(m.vram.get(g, 0) > 0 for g in deficit))
    chosen: list[Member] = []
    left = dict(deficit)
    for m in candidates:
        if all(v <= 0 for v in left.values()):
            break
        if not any(left[g] > 0 and m.vram.get(g, 0) > 0 for g in left):
            continue
        chosen.append(m)
        for g in left:
            left[g] -= m.vram.get(g, 0)
    if all(v <= 0 for v in left.values()):
        return RoomPlan(target, tuple(chosen), needed, free)

    # No room: name what holds the GPU that is short.
    gpu = next(g for g in sorted(left) if left[g] > 0)
    freeable = sum(m.vram.get(gpu, 0) for m in candidates)
    holders = [Holder(m.name, gpu, m.vram[gpu], why_it_stays(m, now, min_idle))
               for m in sorted(others, key=lambda m: -m.vram.get(gpu, 0)) if m.vram.get(gpu, 0) > 0
               and m.phase in (Phase.RESIDENT, Phase.WAKING, Phase.PARKING)]
    known = sum(h.bytes for h in holders)
    info = snapshot.gpus[gpu]
    other = info.total - info.free - known
    if other > 0:
        holders.append(Holder("other processes", gpu, other, "not a kybernate container"))
    return NoRoom(target, gpu, needed[gpu], free[gpu], freeable, tuple(holders))
