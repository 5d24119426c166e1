"""The broker's moves and locks, interleaved on purpose: a stand-in containerd whose Pause and Resume
can be held open (gates) or made to fail, and GPU readings computed from it (a paused task holds no
VRAM). What the integration tests show end to end, here in the orders that are hard to hit by timing:
a wake during a pause, two wakes of one container, two wakes on one GPU, a make-room that fails half
way, a restart with records in each phase."""
from __future__ import annotations

import asyncio
import time
from typing import Optional

import grpc
import pytest

from broker import IDLE_RELEASE_AFTER, GPU_PRIORITY, BrokerError
from broker import service as service_mod
from broker.containerd import ContainerInfo, TaskInfo
from broker.core import Gpu, Phase
from broker.notify import Notifier
from broker.readings import ProcessUse, Reading
from broker.records import Record, Records
from broker.service import Broker, BrokerConfig

GiB = 1 << 30
G0 = "GPU-0"
NS = "default"


class RpcFailure(grpc.RpcError):
    def __init__(self, code=grpc.StatusCode.INTERNAL, details="it broke"):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


class FakeContainerd:
    def __init__(self):
        self.containers: dict[str, ContainerInfo] = {}
        self.status: dict[str, str] = {}
        self.pids: dict[str, int] = {}
        self.calls: list[tuple[str, str]] = []
        self.gates: dict[tuple[str, str], asyncio.Event] = {}
        self.entered: dict[tuple[str, str], asyncio.Event] = {}
        self.fail: dict[tuple[str, str], Exception] = {}
        self.published: list[tuple[str, dict]] = []

    def add(self, cid: str, annotations: Optional[dict] = None, status: str = "running") -> int:
        pid = 1000 + len(self.containers)
        self.containers[cid] = ContainerInfo(NS, cid, {}, {"annotations": annotations or {}})
        self.status[cid] = status
        self.pids[cid] = pid
        return pid

    def gate(self, op: str, cid: str) -> tuple[asyncio.Event, asyncio.Event]:
        self.gates[(op, cid)] = asyncio.Event()
        self.entered[(op, cid)] = asyncio.Event()
        return self.entered[(op, cid)], self.gates[(op, cid)]

    async def namespaces(self):
        return [NS]

    async def kybernate_containers(self, ns):
        return list(self.containers.values())

    async def task(self, ns, cid):
        if cid not in self.status:
            return None
        return TaskInfo(self.pids[cid], self.status[cid])

    async def _op(self, op, cid, new_status):
        self.calls.append((op, cid))
        if (op, cid) in self.entered:
            self.entered[(op, cid)].set()
            await self.gates[(op, cid)].wait()
        if (op, cid) in self.fail:
            raise self.fail.pop((op, cid))
        await asyncio.sleep(0)
        self.status[cid] = new_status

    async def pause(self, ns, cid, timeout):
        await self._op("pause", cid, "paused")

    async def resume(self, ns, cid, timeout):
        await self._op("resume", cid, "running")

    async def publish(self, ns, topic, event):
        from proto.containerd.events import container_pb2
        msg = container_pb2.ContainerUpdate()
        msg.ParseFromString(event.value)
        self.published.append((topic, dict(msg.labels, id=msg.id)))

    async def subscribe(self, filters):
        await asyncio.Event().wait()
        yield None


class FakeGpus:
    """Readings from the fake containerd: a running task holds its VRAM, a paused one nothing."""

    def __init__(self, cd: FakeContainerd, total: int, others: int = 0):
        self.cd, self.total, self.others = cd, total, others
        self.vram: dict[str, int] = {}
        self.active: set[str] = set()
        self.lowest_free: Optional[int] = None

    def read(self) -> Reading:
        procs = tuple(ProcessUse(self.cd.pids[c], G0, n) for c, n in self.vram.items()
                      if self.cd.status.get(c) == "running")
        free = self.total - self.others - sum(p.used for p in procs)
        self.lowest_free = free if self.lowest_free is None else min(self.lowest_free, free)
        active = frozenset(self.cd.pids[c] for c in self.active)
        return Reading(time.time(), {G0: Gpu(G0, self.total, free)}, procs, active)

    def close(self):
        pass


@pytest.fixture(autouse=True)
def no_host_lookups(monkeypatch):
    monkeypatch.setattr(service_mod, "cgroup_of", lambda pid: f"/cg/{pid}")
    monkeypatch.setattr(service_mod, "cgroup_pids_of", lambda cg: [])
    monkeypatch.setattr(service_mod, "find_listeners", lambda pids, ports: [])


def make(tmp_path, total=10 * GiB, others=0, **cfg):
    cd = FakeContainerd()
    gpus = FakeGpus(cd, total, others)
    config = BrokerConfig(**{"poll_s": 0.01, "min_idle_s": 0.0, **cfg})
    broker = Broker(cd, gpus, Records(str(tmp_path / "state")), Notifier(cd), config=config)
    return cd, gpus, broker


def idle(after="1h", prio=0):
    return {IDLE_RELEASE_AFTER: after, GPU_PRIORITY: str(prio)}


async def park_now(broker, cid):
    t = broker.members[(NS, cid)]
    assert await broker.park(t, "test", reason="test")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


# ---- a wake during a pause, two wakes of one container ----------------------------------------------
def test_a_wake_during_a_pause_waits_for_it_then_resumes(tmp_path):
    async def scenario():
        cd, gpus, broker = make(tmp_path)
        cd.add("a", idle())
        gpus.vram["a"] = 2 * GiB
        await broker.refresh()
        entered, release = cd.gate("pause", "a")
        park = asyncio.create_task(park_now(broker, "a"))
        await entered.wait()                     # the Pause is in containerd now
        wake = asyncio.create_task(broker.wake((NS, "a"), "test"))
        await asyncio.sleep(0.05)
        assert not wake.done() and cd.calls == [("pause", "a")], "the wake waits for the pause"
        release.set()
        await park
        result = await wake
        assert cd.calls == [("pause", "a"), ("resume", "a")]
        assert cd.status["a"] == "running" and broker.members[(NS, "a")].phase is Phase.RESIDENT
        assert result.bytes == 2 * GiB and not result.already
    run(scenario())


def test_two_wakes_of_one_container_resume_it_once(tmp_path):
    async def scenario():
        cd, gpus, broker = make(tmp_path)
        cd.add("a", idle())
        gpus.vram["a"] = 2 * GiB
        await broker.refresh()
        await park_now(broker, "a")
        entered, release = cd.gate("resume", "a")
        first = asyncio.create_task(broker.wake((NS, "a"), "one"))
        second = asyncio.create_task(broker.wake((NS, "a"), "two"))
        await entered.wait()
        release.set()
        r1, r2 = await asyncio.gather(first, second)
        assert cd.calls.count(("resume", "a")) == 1
        assert sorted([r1.already, r2.already]) == [False, True]
        assert [t for t, _ in cd.published].count("/kybernate/broker/wake") == 1
    run(scenario())


def test_two_wakes_on_one_gpu_plan_one_after_the_other_and_never_over_commit(tmp_path):
    async def scenario():
        cd, gpus, broker = make(tmp_path, total=10 * GiB, others=2 * GiB)
        for c in ("a", "b", "spare"):
            cd.add(c, idle())
        gpus.vram.update(a=4 * GiB, b=4 * GiB)
        await broker.refresh()
        await park_now(broker, "a")
        await park_now(broker, "b")
        gpus.vram["spare"] = 4 * GiB
        await broker.refresh()
        gpus.lowest_free = None
        results = await asyncio.gather(broker.wake((NS, "a"), "x"), broker.wake((NS, "b"), "y"))
        assert cd.status == {"a": "running", "b": "running", "spare": "paused"}
        assert sorted(r.evicted for r in results) == [(), (f"{NS}/spare",)]
        assert gpus.lowest_free >= 0, f"over-committed: {gpus.lowest_free / GiB} GiB free"
    run(scenario())


# ---- making room that fails half way ------------------------------------------------------------------
def test_a_failed_resume_after_making_room_resumes_what_it_parked(tmp_path):
    async def scenario():
        cd, gpus, broker = make(tmp_path, total=8 * GiB)
        for c in ("t", "x", "y"):
            cd.add(c, idle())
        gpus.vram.update(t=4 * GiB)
        await broker.refresh()
        await park_now(broker, "t")
        gpus.vram.update(x=3 * GiB, y=3 * GiB)
        await broker.refresh()
        cd.fail[("resume", "t")] = RpcFailure(details="CUDA restore failed")
        with pytest.raises(BrokerError, match="wake of default/t failed: resume: INTERNAL: CUDA restore failed; "
                                              "it stays parked"):
            await broker.wake((NS, "t"), "test")
        assert cd.status == {"t": "paused", "x": "running", "y": "running"}, "the parked-for-room one is back"
        assert broker.members[(NS, "t")].phase is Phase.PARKED
        assert broker.records.get((NS, "t")).phase == "parked"
        assert broker.records.get((NS, "x")) is None
    run(scenario())


def test_a_failed_pause_while_making_room_leaves_nothing_half_done(tmp_path):
    async def scenario():
        cd, gpus, broker = make(tmp_path, total=8 * GiB)
        for c in ("t", "x", "y"):
            cd.add(c, idle())
        gpus.vram.update(t=6 * GiB)
        await broker.refresh()
        await park_now(broker, "t")
        gpus.vram.update(x=3 * GiB, y=3 * GiB)
        await broker.refresh()
        broker.members[(NS, "x")].last_active = 0.0      # x is the least recently used: parked first
        cd.fail[("pause", "y")] = RpcFailure(details="freeze failed")
        with pytest.raises(BrokerError, match="release of default/y failed: pause: INTERNAL: freeze failed"):
            await broker.wake((NS, "t"), "test")
        assert cd.status == {"t": "paused", "x": "running", "y": "running"}
        assert {k[1]: t.phase for k, t in broker.members.items()} == {
            "t": Phase.PARKED, "x": Phase.RESIDENT, "y": Phase.RESIDENT}
    run(scenario())


def test_make_room_skips_one_that_got_busy_after_the_plan(tmp_path):
    async def scenario():
        cd, gpus, broker = make(tmp_path, total=8 * GiB, min_idle_s=5.0)
        for c in ("t", "x"):
            cd.add(c, idle())
        gpus.vram.update(t=4 * GiB)
        await broker.refresh()
        await park_now(broker, "t")
        gpus.vram.update(x=6 * GiB)
        await broker.refresh()
        broker.members[(NS, "x")].last_active = time.time() - 60
        entered, release = cd.gate("pause", "x")
        wake = asyncio.create_task(broker.wake((NS, "t"), "test"))
        await entered.wait()
        release.set()
        await wake
        assert cd.status == {"t": "running", "x": "paused"}
    run(scenario())


# ---- idle release -------------------------------------------------------------------------------------
def test_idle_release_rechecks_under_the_lock(tmp_path):
    async def scenario():
        cd, gpus, broker = make(tmp_path)
        cd.add("a", idle("1s"))
        gpus.vram["a"] = GiB
        await broker.refresh()
        t = broker.members[(NS, "a")]
        t.last_active = time.time()                # just worked: not due
        assert not await broker.park(t, "idle", require_idle=True)
        t.last_active = time.time() - 2
        assert await broker.park(t, "idle", require_idle=True)
        assert cd.status["a"] == "paused"
        topic, facts = cd.published[-1]
        assert topic == "/kybernate/broker/release" and facts["trigger"] == "idle" and facts["bytes"] == str(GiB)
    run(scenario())


def test_a_container_without_idle_release_is_never_parked(tmp_path):
    async def scenario():
        cd, gpus, broker = make(tmp_path)
        cd.add("pinned", {})
        gpus.vram["pinned"] = GiB
        await broker.refresh()
        assert not await broker.park(broker.members[(NS, "pinned")], "make-room")
        assert cd.calls == []
    run(scenario())


def test_someone_elses_pause_is_left_alone(tmp_path):
    async def scenario():
        cd, gpus, broker = make(tmp_path)
        cd.add("a", idle("1s"))
        gpus.vram["a"] = GiB
        await broker.refresh()
        cd.status["a"] = "paused"                  # ctr task pause
        await broker.refresh()
        assert broker.members[(NS, "a")].phase is Phase.PAUSED
        with pytest.raises(BrokerError, match="paused by someone else"):
            await broker.wake((NS, "a"), "test")
        assert cd.calls == []
    run(scenario())


# ---- restart -------------------------------------------------------------------------------------------
def test_rebuild_from_records_and_containerd(tmp_path):
    async def scenario():
        cd, gpus, broker = make(tmp_path)
        for c, status in (("parked", "paused"), ("waking", "paused"), ("parking-done", "paused"),
                          ("parking-not-done", "running"), ("resumed-by-hand", "running"), ("other", "paused")):
            cd.add(c, idle(), status=status)
        records = Records(str(tmp_path / "state"))
        records.load()
        for c, phase in (("parked", "parked"), ("waking", "waking"), ("parking-done", "parking"),
                         ("parking-not-done", "parking"), ("resumed-by-hand", "parked"), ("gone", "parked")):
            records.put(Record(NS, c, phase, {G0: GiB}, 1.0, "idle"))
        await broker.rebuild()
        for _ in range(100):
            if cd.status["waking"] == "running" and not broker.tasks:
                break
            await asyncio.sleep(0.01)
        phases = {k[1]: t.phase for k, t in broker.members.items()}
        assert phases == {"parked": Phase.PARKED, "waking": Phase.RESIDENT, "parking-done": Phase.PARKED,
                          "parking-not-done": Phase.RESIDENT, "resumed-by-hand": Phase.RESIDENT,
                          "other": Phase.PAUSED}
        assert cd.status["waking"] == "running", "a broken-off wake is finished: nothing left frozen"
        assert cd.calls == [("resume", "waking")]
        kept = Records(str(tmp_path / "state")).load()
        assert sorted(k[1] for k in kept) == ["parked", "parking-done"]
        assert all(r.phase == "parked" for r in kept.values())
        assert broker.members[(NS, "parked")].vram == {G0: GiB}
    run(scenario())


def test_unknown_and_non_gpu_wakes(tmp_path):
    async def scenario():
        cd, gpus, broker = make(tmp_path)
        cd.add("cpu", idle())
        await broker.refresh()
        with pytest.raises(BrokerError, match="no running container nosuch in namespace default") as info:
            await broker.wake((NS, "nosuch"), "test")
        assert info.value.code == "not-found"
        with pytest.raises(BrokerError, match="default/cpu is not a GPU container") as info:
            await broker.wake((NS, "cpu"), "test")
        assert info.value.code == "invalid"
    run(scenario())
