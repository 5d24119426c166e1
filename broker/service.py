"""The broker: one loop per node that parks idle GPU containers and wakes them on demand.

Every ``poll_s`` it lists the kybernate containers of every containerd namespace and their tasks,
takes a GPU reading (`broker.readings`), charges each GPU process's VRAM and activity to the container
whose cgroup holds it, and parks the containers `core.due_for_release` names. Wakes come from the
control socket (`kybernate wake`), from a parked container's front (`broker.front`: a connection),
and from containerd's ``/tasks/exec-added`` events (an exec into a parked container; the shim holds
the exec's start until the resume, ``[broker] exec_wait_s``).

Moves and their locks (all in one asyncio loop):
- a container's moves (park, wake) hold its own lock; a park re-checks under it that the container
  is still resident and still due;
- a wake first holds the lock of each GPU it will use (sorted: two wakes never wait on each other
  in a circle), then its container's lock, then plans with a fresh reading (`core.plan_room`), parks
  what the plan names (each under that container's lock), waits until the driver shows the room,
  and resumes. A second wake of the same container waits for the first and finds it resident; a
  wake that comes during a park waits for the park, then resumes. A park never takes a GPU lock, so
  nothing waits in a circle.
- a wake that fails after parking others resumes those others again: nothing is left half-made.
  A wake's VRAM counts as taken (``reserved``) until the driver shows the container holding it.
- every move is written to `broker.records` before and after, so a restarted broker finishes a wake
  it was killed in (`rebuild`): no container is left frozen by a broker that died.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import grpc

from shim.runtime.gpu_request import gpu_requests

from . import BrokerError
from .containerd import ContainerInfo, describe
from .core import Key, Member, NoRoom, Phase, Snapshot, due_for_release, plan_room, why_it_stays
from .front import Front, find_listeners
from .notify import Move, Notifier
from .readings import GpuReadings, Reading
from .records import Record, Records
from .settings import Policy, policy_of

log = logging.getLogger("kybernate.broker")

LABEL_POD_NAMESPACE = "io.kubernetes.pod.namespace"
LABEL_POD_NAME = "io.kubernetes.pod.name"
LABEL_CONTAINER_NAME = "io.kubernetes.container.name"
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
RESERVE_S = 15.0      # a wake's VRAM counts as taken this long at most, until the driver shows it


@dataclass(frozen=True)
class BrokerConfig:
    poll_s: float = 1.0
    min_idle_s: float = 10.0
    silent_wake_s: float = 1.0
    wake_timeout_s: float = 120.0
    pause_timeout_s: float = 120.0


@dataclass
class Tracked:
    """One kybernate container and what the broker knows of it."""

    namespace: str
    id: str
    label: str
    labels: dict
    policy: Policy
    gpu_requested: bool
    sandbox: bool = False
    pid: int = 0
    cgroup: str = ""
    status: str = ""
    phase: Phase = Phase.RESIDENT
    vram: dict = field(default_factory=dict)      # resident: now; parked: what it held when parked
    last_active: float = 0.0
    since: float = 0.0
    reason: str = ""                              # of its last move
    woken_at: float = 0.0
    woken_vram: dict = field(default_factory=dict)  # what its last wake brought back (reserved until shown)
    moves: int = 0                                # bumped by every move: a look taken before one is stale
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    front: Optional[Front] = None
    front_note: str = ""

    @property
    def key(self) -> Key:
        return (self.namespace, self.id)

    @property
    def name(self) -> str:
        return self.label or f"{self.namespace}/{self.id}"

    @property
    def is_gpu(self) -> bool:
        return self.gpu_requested or any(v > 0 for v in self.vram.values())

    def member(self) -> Member:
        return Member(self.namespace, self.id, self.phase, dict(self.vram), self.last_active, self.since,
                      self.policy.idle_release_after if self.policy.managed else None, self.policy.priority,
                      self.label)

    def view(self, now: float) -> dict:
        """What `kybernate ps` shows."""
        return {"namespace": self.namespace, "id": self.id, "name": self.name, "phase": self.phase.value,
                "since": self.since, "vram": dict(self.vram), "gpus": sorted(g for g, n in self.vram.items() if n),
                "idle_s": round(max(0.0, now - self.last_active), 1), "reason": self.reason,
                "idle_release_after": self.policy.idle_release_after, "priority": self.policy.priority,
                "wake_ports": self.front.ports if self.front is not None and self.front.armed else [],
                "refused": self.policy.refused, "front": self.front_note, "pid": self.pid,
                "gpu": self.is_gpu}


@dataclass(frozen=True)
class WakeResult:
    name: str
    latency_s: float
    bytes: int
    evicted: tuple[str, ...] = ()
    already: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "latency_s": round(self.latency_s, 4), "bytes": self.bytes,
                "evicted": list(self.evicted), "already_resident": self.already}


def label_of(labels: dict) -> str:
    ns, pod, name = labels.get(LABEL_POD_NAMESPACE), labels.get(LABEL_POD_NAME), labels.get(LABEL_CONTAINER_NAME)
    if ns and pod:
        return f"{ns}/{pod}/{name}" if name else f"{ns}/{pod}"
    return ""


def cgroup_of(pid: int) -> str:
    from cuda_bindings import cgroup_dir_of
    try:
        return str(cgroup_dir_of(pid))
    except (OSError, ValueError):
        return ""


def cgroup_pids_of(cgroup: str) -> list[int]:
    from cuda_bindings import cgroup_pids
    try:
        return cgroup_pids(cgroup)
    except OSError:
        return []


class Broker:
    def __init__(self, containerd, readings: GpuReadings, records: Records, notifier: Optional[Notifier] = None,
                 config: BrokerConfig = BrokerConfig(), clock=time.time):
        self.containerd = containerd
        self.readings = readings
        self.records = records
        self.notifier = notifier or Notifier()
        self.config = config
        self.clock = clock
        self.members: dict[Key, Tracked] = {}
        self.gpu_locks: dict[str, asyncio.Lock] = {}
        self.reading: Optional[Reading] = None
        self.tasks: set[asyncio.Task] = set()
        self._pid_cgroups: dict[int, str] = {}
        self._refreshing = asyncio.Lock()
        self._reading_lock = asyncio.Lock()
        self.started = asyncio.Event()
        self.stopping = False

    # ---- the loop -----------------------------------------------------------------------------------
    async def run(self) -> None:
        await self.rebuild()
        self.started.set()
        self._spawn(self._watch_exec_events(), "exec events")
        while not self.stopping:
            try:
                await self.tick()
            except Exception as exc:   # noqa: BLE001 - the loop goes on
                log.error("broker round failed: %s", exc, exc_info=True)
            await asyncio.sleep(self.config.poll_s)

    async def close(self) -> None:
        self.stopping = True
        for t in list(self.tasks):
            t.cancel()
        for t in list(self.tasks):
            with contextlib.suppress(BaseException):
                await t
        for m in self.members.values():
            if m.front is not None:
                await m.front.close()
        await asyncio.to_thread(self.readings.close)

    async def tick(self) -> None:
        """One round: containers, readings, idle releases."""
        await self.refresh()
        snapshot = self.snapshot()
        for due in due_for_release(snapshot):
            t = self.members[due.key]
            if not t.lock.locked():
                self._spawn(self._idle_release(t), f"release {t.name}")
        counts: dict[str, int] = {p.value: 0 for p in Phase}
        for t in self.members.values():
            counts[t.phase.value] += 1
        self.notifier.phases(counts)

    def _spawn(self, coro, what: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=what)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # ---- what is there -------------------------------------------------------------------------------
    async def _list(self) -> list[ContainerInfo]:
        found = []
        for ns in await self.containerd.namespaces():
            found += await self.containerd.kybernate_containers(ns)
        return found

    async def refresh(self) -> None:
        """Containers and tasks from containerd, then a GPU reading charged to them."""
        async with self._refreshing:
            infos = await self._list()
            seen = set()
            for info in infos:
                key = (info.namespace, info.id)
                annotations = info.spec.get("annotations") if isinstance(info.spec.get("annotations"), dict) else {}
                if annotations.get(CONTAINER_TYPE) == "sandbox":
                    continue    # the pod's pause container: pod annotations reach it too, it holds no GPU
                known = self.members.get(key)
                moves = known.moves if known is not None else 0
                task = await self.containerd.task(info.namespace, info.id)
                if task is None or task.status in ("stopped", "unknown", "created"):
                    continue
                seen.add(key)
                now = self.clock()
                t = self.members.get(key)
                if t is None:
                    t = Tracked(info.namespace, info.id, label_of(info.labels), dict(info.labels),
                                policy_of(annotations, info.id, info.namespace), bool(gpu_requests(info.spec)),
                                last_active=now, since=now)
                    self.members[key] = t
                    log.info("container %s: %s", t.name, _describe_policy(t.policy))
                if t.pid != task.pid:
                    t.pid, t.cgroup = task.pid, cgroup_of(task.pid)
                if t.lock.locked() or t.moves != moves:
                    continue            # a move is (or was meanwhile) under way: it sets the phase
                t.status = task.status
                self._settle(t, now)
            for key in [k for k in self.members if k not in seen]:
                t = self.members[key]
                if t.lock.locked():
                    continue
                del self.members[key]
                if t.front is not None:
                    await t.front.close()
                self.records.drop(key)
                log.info("container %s: gone", t.name)
        await self._read_gpus()

    def _settle(self, t: Tracked, now: float) -> None:
        """Make the phase agree with containerd where no move of ours is under way. A paused task
        the records name is ours (rebuild decides what to do with it), any other was paused by
        someone else."""
        paused = t.status in ("paused", "pausing")
        if paused and t.phase is Phase.RESIDENT and self.records.get(t.key) is not None:
            return
        if t.phase in (Phase.PARKED, Phase.PAUSED) and not paused:
            log.info("container %s: running again (resumed by someone else)", t.name)
            if t.front is not None:
                t.front.disarm()
            t.phase, t.since, t.last_active = Phase.RESIDENT, now, now
            t.moves += 1
            self.records.drop(t.key)
        elif t.phase is Phase.RESIDENT and paused:
            log.info("container %s: paused by someone else: the broker leaves it alone", t.name)
            t.phase, t.since = Phase.PAUSED, now
            t.moves += 1

    async def _read_gpus(self) -> Reading:
        async with self._reading_lock:
            moves = {k: t.moves for k, t in self.members.items()}
            reading = await asyncio.to_thread(self.readings.read)
        for p in reading.problems:
            log.warning("GPU readings: %s", p)
        self.reading = reading
        now = reading.at
        usage: dict[Key, dict[str, int]] = {}
        active: set[Key] = set()
        by_cgroup = {t.cgroup: t for t in self.members.values() if t.cgroup}
        pids_now = set()
        for p in reading.processes:
            pids_now.add(p.pid)
            cg = self._pid_cgroups.get(p.pid)
            if cg is None:
                cg = self._pid_cgroups[p.pid] = cgroup_of(p.pid)
            t = _owner(cg, by_cgroup)
            if t is None:
                continue
            usage.setdefault(t.key, {})
            usage[t.key][p.gpu] = usage[t.key].get(p.gpu, 0) + p.used
            if p.pid in reading.active_pids or p.gpu in reading.busy_gpus:
                active.add(t.key)
        for pid in [p for p in self._pid_cgroups if p not in pids_now]:
            del self._pid_cgroups[pid]
        for t in self.members.values():
            if t.moves != moves.get(t.key, -1) or t.lock.locked():
                continue            # moved while the reading was taken: the reading is older than its phase
            if t.phase is Phase.RESIDENT:
                t.vram = usage.get(t.key, {})
            if t.key in active:
                t.last_active = now
        return reading

    def reserved(self) -> dict[str, int]:
        """VRAM that recent wakes will take and the driver does not show yet."""
        out: dict[str, int] = {}
        now = self.clock()
        shown: dict[Key, dict[str, int]] = {}
        if self.reading is not None:
            by_cgroup = {t.cgroup: t for t in self.members.values() if t.cgroup}
            for p in self.reading.processes:
                t = _owner(self._pid_cgroups.get(p.pid, ""), by_cgroup)
                if t is not None:
                    shown.setdefault(t.key, {})
                    shown[t.key][p.gpu] = shown[t.key].get(p.gpu, 0) + p.used
        for t in self.members.values():
            if t.phase in (Phase.RESIDENT, Phase.WAKING) and t.woken_at and now - t.woken_at < RESERVE_S:
                for g, n in t.woken_vram.items():
                    missing = n - shown.get(t.key, {}).get(g, 0)
                    if missing > 0:
                        out[g] = out.get(g, 0) + missing
        return out

    def snapshot(self) -> Snapshot:
        gpus = dict(self.reading.gpus) if self.reading is not None else {}
        return Snapshot(self.clock(), gpus, {k: t.member() for k, t in self.members.items()})

    # ---- start: rebuild from containerd, the records and the driver ------------------------------
    async def rebuild(self) -> None:
        """After a (re)start: the records against containerd's task status. A parked container stays
        parked (its front armed again); one whose wake was broken off is resumed now; a record whose
        task runs or is gone is dropped."""
        records = self.records.load()
        await self.refresh()
        now = self.clock()
        for key, record in records.items():
            t = self.members.get(key)
            if t is None:
                self.records.drop(key)
                continue
            paused = t.status in ("paused", "pausing")
            if not paused:
                t.phase, t.since = Phase.RESIDENT, now
                self.records.drop(key)
                log.info("container %s: running (record %s dropped)", t.name, record.phase)
                continue
            t.phase, t.vram, t.since, t.reason = Phase.PARKED, dict(record.vram), record.since, record.reason
            if record.phase == "waking":
                log.warning("container %s: its wake was broken off (broker restarted): resuming it", t.name)
                self._spawn(self._finish_wake(t), f"finish wake {t.name}")
            else:
                if record.phase != "parked":     # killed after the Pause, before writing "parked"
                    self.records.put(Record(t.namespace, t.id, "parked", dict(record.vram), record.since,
                                            record.reason))
                log.info("container %s: parked since %.0f (%s)", t.name, record.since, record.reason)
                self._arm(t)

    async def _finish_wake(self, t: Tracked) -> None:
        try:
            await self.wake(t.key, "the broker restarted during its wake", trigger="restart")
        except BrokerError as exc:
            log.error("container %s: the broken-off wake could not be finished: %s", t.name, exc)

    # ---- idle release -------------------------------------------------------------------------------
    async def _idle_release(self, t: Tracked) -> None:
        try:
            await self.park(t, "idle", require_idle=True)
        except BrokerError as exc:
            log.error("%s", exc)

    async def park(self, t: Tracked, trigger: str, reason: str = "", require_idle: bool = False) -> bool:
        """Pause ``t`` through containerd (the shim moves its VRAM to host RAM first). False when it
        was no longer to be parked (not resident, no longer idle)."""
        async with t.lock:
            now = self.clock()
            if t.phase is not Phase.RESIDENT or not t.policy.managed:
                return False
            if require_idle and t.member().idle_for(now) < t.policy.idle_release_after:
                return False
            reason = reason or f"idle {t.member().idle_for(now):.0f} s"
            vram = {g: n for g, n in t.vram.items() if n > 0}
            self.records.put(Record(t.namespace, t.id, "parking", vram, now, reason))
            t.phase = Phase.PARKING
            t.moves += 1
            started = time.monotonic()
            try:
                await self.containerd.pause(t.namespace, t.id, self.config.pause_timeout_s)
            except grpc.RpcError as exc:
                task = await _quiet(self.containerd.task(t.namespace, t.id))
                if task is None or task.status != "paused":
                    t.phase = Phase.RESIDENT
                    self.records.drop(t.key)
                    self.notifier.failed("release")
                    raise BrokerError(f"release of {t.name} failed: pause: {describe(exc)}") from None
                log.info("container %s: pause answered %s but the task is paused", t.name, describe(exc))
            took = time.monotonic() - started
            t.phase, t.vram, t.since, t.reason, t.status = Phase.PARKED, vram, self.clock(), reason, "paused"
            self.records.put(Record(t.namespace, t.id, "parked", vram, t.since, reason))
            self._arm(t)
            log.info("container %s: parked (%s): %d bytes of VRAM to host RAM in %.3f s", t.name, reason,
                     sum(vram.values()), took)
        await self.notifier.moved(Move("release", t.namespace, t.id, t.name, trigger, reason, took,
                                       sum(vram.values()), tuple(sorted(vram)), t.labels))
        return True

    def _arm(self, t: Tracked) -> None:
        """The parked container's front: its listening sockets on its wake ports."""
        if t.front is not None:
            t.front.disarm()
            t.front = None
        ports = t.policy.wake_ports
        if ports == ():
            t.front_note = "off (wake-port none)"
            return
        pids = cgroup_pids_of(t.cgroup) if t.cgroup else [t.pid]
        listeners = find_listeners(pids or [t.pid], ports)
        if not listeners:
            t.front_note = ("no listening socket on port(s) " + ",".join(map(str, ports))) if ports else ""
            if ports:
                log.warning("container %s: %s: no wake on connect", t.name, t.front_note)
            return
        key = t.key

        async def wake(reason: str) -> None:
            """A client waits: while the GPU has no room (the holders are busy), try again until
            wake_timeout_s; `kybernate wake` instead answers at once."""
            deadline = time.monotonic() + self.config.wake_timeout_s
            while True:
                try:
                    await self.wake(key, reason, trigger="connection")
                    return
                except BrokerError as exc:
                    if exc.code != "no-room" or time.monotonic() > deadline:
                        raise
                await asyncio.sleep(0.5)

        t.front = Front(t.name, t.pid, listeners, wake, self.config.silent_wake_s, self.notifier.probe)
        problems = t.front.arm()
        t.front_note = "; ".join(problems)
        if t.front.armed:
            log.info("container %s: wakes on connect to port(s) %s", t.name, ",".join(map(str, t.front.ports)))

    # ---- wake -----------------------------------------------------------------------------------------
    def _gpu_lock(self, gpu: str) -> asyncio.Lock:
        if gpu not in self.gpu_locks:
            self.gpu_locks[gpu] = asyncio.Lock()
        return self.gpu_locks[gpu]

    def find(self, key: Key) -> Tracked:
        t = self.members.get(key)
        if t is None:
            raise BrokerError(f"no running container {key[1]} in namespace {key[0]} run by the kybernate runtime",
                              "not-found")
        return t

    async def wake(self, key: Key, reason: str, trigger: str = "command") -> WakeResult:
        """Make ``key`` resident: room first where need be (see the module docstring)."""
        if key not in self.members:
            await self.refresh()        # a container made since the last round
        t = self.find(key)
        if not t.is_gpu and t.phase is not Phase.PARKED:
            raise BrokerError(f"{t.name} is not a GPU container (no GPU in its spec, no VRAM held): "
                              "the broker only wakes GPU containers", "invalid")
        return await self._wake(t, reason, trigger, time.monotonic())

    async def _wake(self, t: Tracked, reason: str, trigger: str, started: float) -> WakeResult:
        async with contextlib.AsyncExitStack() as stack:
            for gpu in sorted(t.vram):
                await stack.enter_async_context(self._gpu_lock(gpu))
            await stack.enter_async_context(t.lock)
            if t.phase is Phase.RESIDENT:
                return WakeResult(t.name, time.monotonic() - started, 0, already=True)
            if t.phase is Phase.PAUSED:
                raise BrokerError(f"{t.name} was paused by someone else, not parked by the broker: "
                                  "resume it as it was paused (ctr task resume)", "invalid")
            await self._read_gpus()
            plan = plan_room(self.snapshot(), t.key, self.config.min_idle_s, self.reserved())
            if isinstance(plan, NoRoom):
                self.notifier.failed("wake")
                log.warning("%s", plan.message())
                raise BrokerError(plan.message(), "no-room")
            evicted: list[Tracked] = []
            try:
                for m in plan.evict:
                    other = self.members[m.key]
                    if await self._park_for(other, t):
                        evicted.append(other)
                if plan.evict:
                    await self._wait_for_room(t, plan.needed)
                return await self._resume(t, reason, trigger, started, evicted)
            except BaseException as exc:
                if evicted:
                    await self._undo(evicted, t, exc)
                raise

    async def _park_for(self, other: Tracked, target: Tracked) -> bool:
        """Park ``other`` to make room for ``target``, if it still may be (re-checked under its lock)."""
        if why_it_stays(other.member(), self.clock(), self.config.min_idle_s):
            return False
        return await self.park(other, "make-room", reason=f"make room for {target.name}")

    async def _wait_for_room(self, t: Tracked, needed: dict) -> None:
        """Until the driver shows the room the parks made (its numbers follow the pause shortly)."""
        deadline = time.monotonic() + min(30.0, self.config.wake_timeout_s)
        while True:
            reading = await self._read_gpus()
            reserved = self.reserved()
            short = {g: n - (reading.gpus[g].free - reserved.get(g, 0)) for g, n in needed.items()
                     if g in reading.gpus and reading.gpus[g].free - reserved.get(g, 0) < n}
            if not short:
                return
            if time.monotonic() > deadline:
                raise BrokerError(f"cannot wake {t.name}: after parking to make room the driver still shows "
                                  + ", ".join(f"{n} bytes short on GPU {g}" for g, n in sorted(short.items())),
                                  "no-room")
            await asyncio.sleep(0.05)

    async def _resume(self, t: Tracked, reason: str, trigger: str, started: float,
                      evicted: list[Tracked]) -> WakeResult:
        vram = {g: n for g, n in t.vram.items() if n > 0}
        self.records.put(Record(t.namespace, t.id, "waking", vram, t.since, reason))
        t.phase = Phase.WAKING
        t.moves += 1
        if t.front is not None:
            t.front.disarm()        # from here the container's own accept takes the queue
        try:
            await self.containerd.resume(t.namespace, t.id, self.config.wake_timeout_s)
        except grpc.RpcError as exc:
            task = await _quiet(self.containerd.task(t.namespace, t.id))
            if task is None or task.status != "running":
                t.phase = Phase.PARKED
                self.records.put(Record(t.namespace, t.id, "parked", vram, t.since, t.reason))
                self._arm(t)
                self.notifier.failed("wake")
                raise BrokerError(f"wake of {t.name} failed: resume: {describe(exc)}; it stays parked") from None
            log.info("container %s: resume answered %s but the task runs", t.name, describe(exc))
        now = self.clock()
        t.phase, t.status, t.since, t.last_active, t.woken_at, t.reason = (Phase.RESIDENT, "running", now, now,
                                                                           now, reason)
        t.woken_vram = dict(vram)
        self.records.drop(t.key)
        latency = time.monotonic() - started
        moved = sum(vram.values())
        log.info("container %s: woken (%s): %d bytes of VRAM back in %.3f s%s", t.name, reason, moved, latency,
                 f", parked {', '.join(e.name for e in evicted)} to make room" if evicted else "")
        await self.notifier.moved(Move("wake", t.namespace, t.id, t.name, trigger, reason, latency, moved,
                                       tuple(sorted(vram)), t.labels))
        return WakeResult(t.name, latency, moved, tuple(e.name for e in evicted))

    async def _undo(self, evicted: list[Tracked], target: Tracked, cause: BaseException) -> None:
        """The wake failed after parking ``evicted`` for it: resume them again."""
        for e in evicted:
            try:
                async with e.lock:
                    if e.phase is Phase.PARKED:
                        await self._resume(e, f"wake of {target.name} failed: undone", "make-room",
                                           time.monotonic(), [])
            except Exception as exc:   # noqa: BLE001 - report both
                log.error("container %s: parked to make room for %s, which failed (%s), and could not be "
                          "resumed again: %s", e.name, target.name, cause, exc)

    # ---- exec into a parked container ------------------------------------------------------------------
    async def _watch_exec_events(self) -> None:
        from proto.containerd.events import task_pb2
        backoff = 0.5
        while not self.stopping:
            try:
                async for envelope in self.containerd.subscribe(['topic=="/tasks/exec-added"']):
                    backoff = 0.5
                    msg = task_pb2.TaskExecAdded()
                    msg.ParseFromString(envelope.event.value)
                    key = (envelope.namespace, msg.container_id)
                    t = self.members.get(key)
                    if t is not None and t.phase in (Phase.PARKED, Phase.PARKING):
                        self._spawn(self._exec_wake(key, msg.exec_id), f"exec wake {t.name}")
            except asyncio.CancelledError:
                raise
            except Exception as exc:   # noqa: BLE001 - resubscribe
                log.warning("containerd event stream: %s: subscribing again", exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _exec_wake(self, key: Key, exec_id: str) -> None:
        try:
            await self.wake(key, f"exec {exec_id}", trigger="exec")
        except BrokerError as exc:
            log.error("exec %s into %s/%s: %s", exec_id, key[0], key[1], exc)

    # ---- what `kybernate ps` shows ---------------------------------------------------------------------
    def status(self) -> dict:
        now = self.clock()
        gpus = {}
        if self.reading is not None:
            gpus = {g: {"total": info.total, "free": info.free} for g, info in self.reading.gpus.items()}
        return {"now": now, "gpus": gpus, "containers": [t.view(now) for t in sorted(
            self.members.values(), key=lambda t: (t.namespace, t.id))]}


def _owner(cgroup: str, by_cgroup: dict) -> Optional[Tracked]:
    """The container whose cgroup is ``cgroup`` or holds it."""
    if not cgroup:
        return None
    while cgroup and cgroup != "/":
        t = by_cgroup.get(cgroup)
        if t is not None:
            return t
        cgroup = os.path.dirname(cgroup)
    return None


async def _quiet(coro):
    try:
        return await coro
    except Exception:   # noqa: BLE001 - a best-effort look
        return None


def _describe_policy(p: Policy) -> str:
    if p.refused:
        return f"left alone: {p.refused}"
    if p.idle_release_after is None:
        return "no idle release"
    ports = "its listening ports" if p.wake_ports is None else (",".join(map(str, p.wake_ports)) or "none")
    return f"idle release after {p.idle_release_after:g} s, wake on connect: {ports}, priority {p.priority}"
