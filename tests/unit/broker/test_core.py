"""The sans-IO decisions: idle release, and making room for a wake (priority, then LRU; never a
container without idle release nor a busy one; no room: a sentence naming what holds the GPU)."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from broker.core import (GiB, Gpu, Member, NoRoom, Phase, RoomPlan, Snapshot, due_for_release,
                         eviction_order, plan_room, why_it_stays)

G0, G1 = "GPU-0", "GPU-1"


def member(cid, phase=Phase.RESIDENT, vram=None, last_active=0.0, idle=60.0, priority=0, ns="default"):
    return Member(ns, cid, phase, vram if vram is not None else {G0: GiB}, last_active=last_active,
                  idle_release_after=idle, priority=priority)


def snap(now, members, gpus=None):
    gpus = gpus or {G0: Gpu(G0, 10 * GiB, 0)}
    return Snapshot(now, gpus, {m.key: m for m in members})


# ---- idle release -------------------------------------------------------------------------------
def test_released_only_after_its_own_idle_time():
    a = member("a", last_active=100.0, idle=30.0)
    b = member("b", last_active=100.0, idle=60.0)
    assert due_for_release(snap(129.9, [a, b])) == []
    assert [m.id for m in due_for_release(snap(130.0, [a, b]))] == ["a"]
    assert [m.id for m in due_for_release(snap(160.0, [a, b]))] == ["a", "b"]


def test_never_released_without_idle_release_parked_or_holding_no_vram():
    now = 10_000.0
    members = [member("none", idle=None), member("parked", phase=Phase.PARKED),
               member("waking", phase=Phase.WAKING), member("parking", phase=Phase.PARKING),
               member("paused", phase=Phase.PAUSED), member("novram", vram={})]
    assert due_for_release(snap(now, members)) == []


def test_least_recently_active_released_first():
    ms = [member("x", last_active=50.0, idle=1.0), member("y", last_active=10.0, idle=1.0)]
    assert [m.id for m in due_for_release(snap(100.0, ms))] == ["y", "x"]


# ---- making room -------------------------------------------------------------------------------
def test_a_wake_that_fits_parks_nobody():
    target = member("t", phase=Phase.PARKED, vram={G0: 2 * GiB})
    plan = plan_room(snap(100.0, [target, member("r")], {G0: Gpu(G0, 10 * GiB, 3 * GiB)}), target.key, 5.0)
    assert isinstance(plan, RoomPlan) and plan.evict == ()
    assert plan.needed == {G0: 2 * GiB} and plan.free == {G0: 3 * GiB}


def test_least_recently_used_first():
    target = member("t", phase=Phase.PARKED, vram={G0: 2 * GiB})
    old, mid, new = (member("old", last_active=10.0), member("mid", last_active=20.0), member("new", last_active=30.0))
    s = snap(100.0, [target, new, old, mid], {G0: Gpu(G0, 10 * GiB, int(0.5 * GiB))})
    plan = plan_room(s, target.key, 5.0)
    assert [m.id for m in plan.evict] == ["old", "mid"]


def test_priority_orders_before_recency():
    target = member("t", phase=Phase.PARKED, vram={G0: GiB})
    keep = member("keep", last_active=1.0, priority=10)
    go = member("go", last_active=50.0, priority=-1)
    plain = member("plain", last_active=20.0)
    s = snap(100.0, [target, keep, go, plain], {G0: Gpu(G0, 10 * GiB, 0)})
    assert [m.id for m in plan_room(s, target.key, 5.0).evict] == ["go"]
    s2 = snap(100.0, [target, keep, go, plain], {G0: Gpu(G0, 10 * GiB, -GiB)})   # over-committed by 1 GiB
    assert [m.id for m in plan_room(s2, target.key, 5.0).evict] == ["go", "plain"]
    assert [m.id for m in eviction_order([keep, go, plain])] == ["go", "plain", "keep"]


def test_never_parks_one_without_idle_release_nor_a_busy_one():
    target = member("t", phase=Phase.PARKED, vram={G0: 4 * GiB})
    pinned = member("pinned", idle=None, vram={G0: 3 * GiB}, last_active=0.0)
    busy = member("busy", vram={G0: 3 * GiB}, last_active=98.0)
    idle = member("idle", vram={G0: GiB}, last_active=0.0)
    s = snap(100.0, [target, pinned, busy, idle], {G0: Gpu(G0, 10 * GiB, 2 * GiB)})
    room = plan_room(s, target.key, 5.0)
    assert isinstance(room, NoRoom)
    assert room.needed == 4 * GiB and room.free == 2 * GiB and room.freeable == GiB
    by_name = {h.name: h for h in room.holders}
    assert by_name["default/pinned"].stays == "no idle release"
    assert by_name["default/busy"].stays.startswith("busy")
    assert by_name["default/idle"].stays == ""
    assert by_name["other processes"].bytes == 10 * GiB - 2 * GiB - 7 * GiB
    text = room.message()
    assert text.startswith("cannot wake default/t: it needs 4.00 GiB on GPU GPU-0, 2.00 GiB is free")
    assert "default/pinned (3.00 GiB, no idle release)" in text and "default/busy (3.00 GiB, busy" in text


def test_the_busy_one_becomes_a_candidate_once_idle_long_enough():
    target = member("t", phase=Phase.PARKED, vram={G0: 4 * GiB})
    busy = member("busy", vram={G0: 3 * GiB}, last_active=98.0)
    s = snap(103.0, [target, busy], {G0: Gpu(G0, 10 * GiB, 2 * GiB)})
    assert [m.id for m in plan_room(s, target.key, 5.0).evict] == ["busy"]


def test_reservations_of_wakes_under_way_count_as_used():
    target = member("t", phase=Phase.PARKED, vram={G0: 2 * GiB})
    s = snap(100.0, [target], {G0: Gpu(G0, 10 * GiB, 3 * GiB)})
    assert isinstance(plan_room(s, target.key, 5.0, reserved={G0: GiB}), RoomPlan)
    room = plan_room(s, target.key, 5.0, reserved={G0: 2 * GiB})
    assert isinstance(room, NoRoom) and room.free == GiB


def test_only_containers_on_the_short_gpu_are_parked():
    target = member("t", phase=Phase.PARKED, vram={G1: 2 * GiB})
    on0 = member("on0", vram={G0: 5 * GiB}, last_active=0.0)
    on1 = member("on1", vram={G1: 3 * GiB}, last_active=50.0)
    gpus = {G0: Gpu(G0, 10 * GiB, 0), G1: Gpu(G1, 10 * GiB, GiB)}
    assert [m.id for m in plan_room(snap(100.0, [target, on0, on1], gpus), target.key, 5.0).evict] == ["on1"]


def test_a_two_gpu_wake_makes_room_on_both():
    target = member("t", phase=Phase.PARKED, vram={G0: 2 * GiB, G1: 2 * GiB})
    both = member("both", vram={G0: GiB, G1: GiB}, last_active=10.0)
    only1 = member("only1", vram={G1: 4 * GiB}, last_active=20.0)
    gpus = {G0: Gpu(G0, 10 * GiB, GiB), G1: Gpu(G1, 10 * GiB, 0)}
    plan = plan_room(snap(100.0, [target, both, only1], gpus), target.key, 5.0)
    assert [m.id for m in plan.evict] == ["both", "only1"]


def test_a_gpu_the_node_lacks_is_named():
    target = member("t", phase=Phase.PARKED, vram={"GPU-gone": GiB})
    room = plan_room(snap(100.0, [target]), target.key, 5.0)
    assert isinstance(room, NoRoom) and room.missing_gpu
    assert room.message() == "cannot wake default/t: its GPU GPU-gone is not on this node"


def test_why_it_stays():
    assert why_it_stays(member("a", phase=Phase.WAKING), 100.0, 5.0) == "waking"
    assert why_it_stays(member("a", idle=None), 100.0, 5.0) == "no idle release"
    assert why_it_stays(member("a", last_active=99.0), 100.0, 5.0) == "busy: GPU work 1 s ago"
    assert why_it_stays(member("a", last_active=0.0), 100.0, 5.0) == ""


# ---- properties --------------------------------------------------------------------------------
@st.composite
def nodes(draw):
    n = draw(st.integers(1, 6))
    members = []
    for i in range(n):
        members.append(Member(
            "ns", f"c{i}", draw(st.sampled_from([Phase.RESIDENT, Phase.RESIDENT, Phase.PARKED, Phase.WAKING])),
            {G0: draw(st.integers(1, 8)) * GiB}, last_active=float(draw(st.integers(0, 100))),
            idle_release_after=draw(st.sampled_from([None, 10.0])), priority=draw(st.integers(-2, 2))))
    target = Member("ns", "target", Phase.PARKED, {G0: draw(st.integers(1, 8)) * GiB})
    free = draw(st.integers(0, 8)) * GiB
    return snap(100.0, members + [target], {G0: Gpu(G0, 80 * GiB, free)}), target.key


@settings(max_examples=300, deadline=None)
@given(nodes())
def test_a_plan_fits_and_parks_only_what_may_be_parked_in_order(node):
    s, key = node
    result = plan_room(s, key, 5.0)
    target = s.members[key]
    candidates = [m for m in s.members.values() if m.key != key and not why_it_stays(m, s.now, 5.0)]
    if isinstance(result, RoomPlan):
        freed = sum(m.vram[G0] for m in result.evict)
        assert s.gpus[G0].free + freed >= target.vram[G0], "the plan does not make enough room"
        assert all(not why_it_stays(m, s.now, 5.0) for m in result.evict)
        order = eviction_order(candidates)
        assert list(result.evict) == order[:len(result.evict)], "parked out of priority/LRU order"
        if result.evict:   # no spare eviction: without the last one it would not fit
            assert s.gpus[G0].free + freed - result.evict[-1].vram[G0] < target.vram[G0]
    else:
        assert s.gpus[G0].free + sum(m.vram[G0] for m in candidates) < target.vram[G0]
        assert result.freeable == sum(m.vram[G0] for m in candidates)
