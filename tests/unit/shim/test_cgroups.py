"""shim.cgroups: detection, stats readers on fixture trees, proto mapping, OOM watching, freeze state,
and once for real on this host's cgroup v1 hierarchies (root only)."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from shim.cgroups import Cgroup, CgroupError, CgroupMounts, FreezeState, OomWatcher
from shim.cgroups.files import MAX, size_name
from shim.cgroups.mounts import parse_proc_cgroup
from shim.cgroups.stats_v1 import read_v1
from shim.cgroups.stats_v2 import read_v2

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""
UNIFIED_MOUNTINFO = """\
25 23 0:22 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
"""


# --------------------------------------------------------------------------------- detection
def test_hybrid_is_read_as_v1_and_comounted_controllers_share_a_dir():
    m = CgroupMounts.parse(HYBRID_MOUNTINFO)
    assert m.version == 1
    assert m.v1["cpu"].mountpoint == m.v1["cpuacct"].mountpoint == Path("/sys/fs/cgroup/cpu,cpuacct")
    assert "xattr" not in m.v1 and "name=systemd" in m.v1
    cg = Cgroup.from_proc_cgroup("5:pids:/k8s/c1\n4:memory:/k8s/c1\n2:cpu,cpuacct:/k8s/c1\n"
                                 "1:name=systemd:/k8s/c1\n0::/k8s/c1\n", m)
    assert cg.version == 1 and cg.path == "/k8s/c1"
    assert cg.dir("cpuacct") == Path("/sys/fs/cgroup/cpu,cpuacct/k8s/c1")
    assert cg.dir("memory") == Path("/sys/fs/cgroup/memory/k8s/c1")


def test_unified_only_is_v2():
    m = CgroupMounts.parse(UNIFIED_MOUNTINFO)
    assert m.version == 2
    cg = Cgroup.from_proc_cgroup("0::/system.slice/c1.scope\n", m)
    assert (cg.version, cg.dir("memory")) == (2, Path("/sys/fs/cgroup/system.slice/c1.scope"))


def test_only_named_v1_hierarchy_does_not_make_v1():
    m = CgroupMounts.parse(UNIFIED_MOUNTINFO + "40 31 0:37 / /run/x rw - cgroup cgroup rw,name=systemd\n")
    assert m.version == 2


def test_escaped_mountpoint_and_mounted_subtree():
    m = CgroupMounts.parse("1 0 0:1 /kubepods /mnt/cg\\040x rw - cgroup cgroup rw,memory\n")
    cg = Cgroup.from_proc_cgroup("3:memory:/kubepods/pod1/c1\n", m)
    assert cg.dir("memory") == Path("/mnt/cg x/pod1/c1")


def test_nothing_mounted_and_missing_process(tmp_path):
    with pytest.raises(CgroupError):
        Cgroup.from_proc_cgroup("0::/\n", CgroupMounts.parse(""))
    with pytest.raises(CgroupError):
        Cgroup.for_pid(12345, proc=tmp_path)


def test_parse_proc_cgroup():
    assert parse_proc_cgroup("2:cpu,cpuacct:/a\n0::/b\n") == {"cpu": "/a", "cpuacct": "/a", "": "/b"}


# --------------------------------------------------------------------------------- v1 fixtures
def write(d: Path, files: dict[str, str]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)
    return d


@pytest.fixture
def v1_tree(tmp_path):
    root = tmp_path / "cg"
    dirs = {
        "cpuacct": write(root / "cpuacct", {
            "cpuacct.usage": "3000000000\n", "cpuacct.stat": "user 150\nsystem 50\n",
            "cpuacct.usage_percpu": "1000000000 2000000000 \n"}),
        "cpu": write(root / "cpu", {"cpu.stat": "nr_periods 10\nnr_throttled 3\nthrottled_time 777\n"
                                                "nr_bursts 0\n"}),
        "memory": write(root / "memory", {
            "memory.stat": "cache 4096\nrss 8192\npgpgin 5\npgmajfault 1\nhierarchical_memory_limit 1048576\n"
                           "hierarchical_memsw_limit 2097152\ntotal_pgfault 9\nswap 0\nshmem 12\n",
            "memory.usage_in_bytes": "12288\n", "memory.max_usage_in_bytes": "20000\n",
            "memory.limit_in_bytes": "1048576\n", "memory.failcnt": "2\n",
            "memory.kmem.usage_in_bytes": "100\n", "memory.kmem.limit_in_bytes": "9223372036854771712\n",
            "memory.kmem.max_usage_in_bytes": "200\n", "memory.kmem.failcnt": "0\n",
            "memory.oom_control": "oom_kill_disable 0\nunder_oom 1\noom_kill 4\n"}),
        "pids": write(root / "pids", {"pids.current": "3\n", "pids.max": "max\n"}),
        "blkio": write(root / "blkio", {
            "blkio.throttle.io_service_bytes_recursive": "8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 0\n"
                                                         "9:1 Read 1\nTotal 12289\n",
            "blkio.throttle.io_serviced_recursive": "8:0 Read 1\n8:0 Write 2\nTotal 3\n"}),
        "hugetlb": write(root / "hugetlb", {"hugetlb.2MB.usage_in_bytes": "2097152\n",
                                            "hugetlb.2MB.max_usage_in_bytes": "4194304\n",
                                            "hugetlb.2MB.failcnt": "1\n"}),
    }
    proc = write(tmp_path / "proc", {"partitions": "major minor  #blocks  name\n\n   8        0  100 sda\n"})
    huge = tmp_path / "hugepages"
    (huge / "hugepages-2048kB").mkdir(parents=True)
    (huge / "hugepages-1048576kB").mkdir()
    return dirs, proc, huge


def test_read_v1(v1_tree):
    dirs, proc, huge = v1_tree
    s = read_v1(dirs, proc=proc, hugepages=huge, clock_ticks=100)
    assert s.cpu.usage.total == 3_000_000_000
    assert (s.cpu.usage.user, s.cpu.usage.kernel) == (1_500_000_000, 500_000_000)
    assert s.cpu.usage.per_cpu == [1_000_000_000, 2_000_000_000]
    assert (s.cpu.throttling.periods, s.cpu.throttling.throttled_periods,
            s.cpu.throttling.throttled_time) == (10, 3, 777)
    c = s.memory.counters
    assert (c["cache"], c["rss"], c["pg_pg_in"], c["pg_maj_fault"], c["total_pg_fault"]) == (4096, 8192, 5, 1, 9)
    assert c["hierarchical_swap_limit"] == 2097152
    assert "swap" not in c and "shmem" not in c            # not fields of the v1 proto
    assert (s.memory.usage.usage, s.memory.usage.max, s.memory.usage.limit, s.memory.usage.failcnt) == \
        (12288, 20000, 1048576, 2)
    assert s.memory.swap is None and s.memory.kernel_tcp is None   # no memsw / kmem.tcp files
    assert s.memory.kernel.usage == 100
    assert (s.memory_oom_control.under_oom, s.memory_oom_control.oom_kill) == (1, 4)
    assert (s.pids.current, s.pids.limit) == (3, 0)          # v1 "max" -> 0, as containerd
    sb = s.blkio.io_service_bytes_recursive
    assert [(e.device, e.major, e.minor, e.op, e.value) for e in sb] == [
        ("/dev/sda", 8, 0, "Read", 4096), ("/dev/sda", 8, 0, "Write", 8192), ("/dev/sda", 8, 0, "Sync", 0),
        ("", 9, 1, "Read", 1)]
    assert len(s.blkio.io_serviced_recursive) == 2
    assert [(h.pagesize, h.usage, h.max, h.failcnt) for h in s.hugetlb] == [
        ("1GB", 0, 0, 0), ("2MB", 2097152, 4194304, 1)]


def test_read_v1_pids_limit_number_and_missing_controllers(v1_tree, tmp_path):
    dirs, proc, huge = v1_tree
    (dirs["pids"] / "pids.max").write_text("50\n")
    s = read_v1({"pids": dirs["pids"], "memory": tmp_path / "gone"}, proc=proc, hugepages=huge)
    assert s.pids.limit == 50
    assert s.memory is None and s.cpu is None and s.blkio is None and s.hugetlb == []


def test_blkio_prefers_cfq_when_it_has_data(v1_tree):
    dirs, proc, huge = v1_tree
    write(dirs["blkio"], {"blkio.io_serviced_recursive": "8:0 Read 7\nTotal 7\n",
                          "blkio.io_service_bytes_recursive": "8:0 Read 70\nTotal 70\n",
                          "blkio.sectors_recursive": "8:0 3\n", "blkio.time_recursive": "8:0 11\n"})
    s = read_v1({"blkio": dirs["blkio"]}, proc=proc)
    assert [e.value for e in s.blkio.io_serviced_recursive] == [7]
    assert [(e.op, e.value) for e in s.blkio.sectors_recursive] == [("", 3)]
    assert [e.value for e in s.blkio.io_time_recursive] == [11]


def test_size_names():
    assert (size_name(2 << 20), size_name(1 << 30), size_name(64 << 10)) == ("2MB", "1GB", "64KB")


# --------------------------------------------------------------------------------- v2 fixtures
@pytest.fixture
def v2_dir(tmp_path):
    return write(tmp_path / "c1", {
        "cgroup.procs": "10\n11\n",
        "cpu.stat": "usage_usec 500\nuser_usec 300\nsystem_usec 200\nnr_periods 4\nnr_throttled 1\n"
                    "throttled_usec 9\nnr_bursts 0\nburst_usec 0\ncore_sched.force_idle_usec 5\n",
        "cpu.pressure": "some avg10=1.50 avg60=0.00 avg300=0.00 total=1234\n"
                        "full avg10=0.00 avg60=0.00 avg300=0.00 total=5\n",
        "memory.stat": "anon 4096\nfile 8192\nshmem 1\npgfault 7\nworkingset_refault_anon 2\n"
                       "zswapped 99\n",
        "memory.current": "12288\n", "memory.max": "max\n", "memory.swap.current": "0\n",
        "memory.swap.max": "1048576\n", "memory.peak": "20000\n",
        "memory.events": "low 0\nhigh 0\nmax 5\noom 2\noom_kill 1\noom_group_kill 0\n",
        "pids.current": "2\n", "pids.max": "max\n",
        "io.stat": "8:0 rbytes=4096 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n253:1 rbytes=1 wbytes=2 rios=3 wios=4\n",
        "hugetlb.2MB.current": "0\n", "hugetlb.2MB.max": "max\n", "hugetlb.2MB.events": "max 3\n",
        "hugetlb.2MB.rsvd.current": "0\n",
        "cgroup.freeze": "0\n", "cgroup.events": "populated 1\nfrozen 0\n",
    })


def test_read_v2(v2_dir):
    s = read_v2(v2_dir)
    assert (s.pids.current, s.pids.limit) == (2, MAX)          # containerd: "max" -> MaxUint64
    assert s.cpu["usage_usec"] == 500 and s.cpu["throttled_usec"] == 9
    assert s.cpu_psi.some.avg10 == 1.5 and s.cpu_psi.some.total == 1234 and s.cpu_psi.full.total == 5
    assert (s.memory["usage"], s.memory["usage_limit"], s.memory["swap_limit"], s.memory["max_usage"]) == \
        (12288, MAX, 1048576, 20000)
    assert s.memory_events["oom_kill"] == 1
    assert [(e.major, e.minor, e.rbytes, e.wios) for e in s.io] == [(8, 0, 4096, 0), (253, 1, 1, 4)]
    assert [(h.pagesize, h.current, h.max, h.failcnt) for h in s.hugetlb] == [("2MB", 0, MAX, 3)]


# --------------------------------------------------------------------------------- proto mapping
def test_v1_metrics_any(v1_tree):
    from proto.anyutil import unpack
    from proto.io.containerd.cgroups.v1 import metrics_pb2
    from shim.cgroups.metrics import metrics_any
    dirs, proc, huge = v1_tree
    a = metrics_any(read_v1(dirs, proc=proc, hugepages=huge, clock_ticks=100))
    assert a.type_url == "io.containerd.cgroups.v1.Metrics"
    m = unpack(a, metrics_pb2.Metrics)
    assert m.cpu.usage.total == 3_000_000_000 and list(m.cpu.usage.per_cpu) == [1_000_000_000, 2_000_000_000]
    assert m.cpu.throttling.throttled_time == 777
    assert (m.memory.cache, m.memory.rss, m.memory.pg_pg_in, m.memory.hierarchical_swap_limit) == \
        (4096, 8192, 5, 2097152)
    assert (m.memory.usage.usage, m.memory.usage.limit, m.memory.kernel.usage) == (12288, 1048576, 100)
    assert not m.memory.HasField("swap")
    assert m.memory_oom_control.oom_kill == 4 and m.pids.current == 3
    assert [(e.op, e.device, e.value) for e in m.blkio.io_service_bytes_recursive][:2] == [
        ("Read", "/dev/sda", 4096), ("Write", "/dev/sda", 8192)]
    assert [(h.pagesize, h.usage, h.failcnt) for h in m.hugetlb] == [("1GB", 0, 0), ("2MB", 2097152, 1)]


def test_v2_metrics_any(v2_dir):
    from proto.anyutil import unpack
    from proto.io.containerd.cgroups.v2 import metrics_pb2
    a = Cgroup.v2(v2_dir).metrics()
    assert a.type_url == "io.containerd.cgroups.v2.Metrics"
    m = unpack(a, metrics_pb2.Metrics)
    assert (m.pids.current, m.pids.limit) == (2, MAX)
    assert (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec, m.cpu.nr_throttled) == (500, 300, 200, 1)
    assert m.cpu.psi.some.total == 1234
    assert (m.memory.anon, m.memory.file, m.memory.usage, m.memory.usage_limit, m.memory.max_usage) == \
        (4096, 8192, 12288, MAX, 20000)
    assert m.memory.workingset_refault_anon == 2
    assert (m.memory_events.max, m.memory_events.oom, m.memory_events.oom_kill) == (5, 2, 1)
    assert [(e.major, e.minor, e.rbytes) for e in m.io.usage] == [(8, 0, 4096), (253, 1, 1)]
    assert [(h.pagesize, h.max, h.failcnt) for h in m.hugetlb] == [("2MB", MAX, 3)]


# --------------------------------------------------------------------------------- pids, freeze
def test_pids_recursive_v2(v2_dir):
    write(v2_dir / "sub" / "deeper", {"cgroup.procs": "30\n"})
    write(v2_dir / "sub", {"cgroup.procs": "20\n11\n"})
    assert Cgroup.v2(v2_dir).pids() == [10, 11, 20, 30]
    assert Cgroup.v2(v2_dir / "gone").pids() == []


def test_pids_v1_prefers_pids_hierarchy(tmp_path):
    pids = write(tmp_path / "pids", {"cgroup.procs": "5\n6\n"})
    sysd = write(tmp_path / "systemd", {"cgroup.procs": "1\n5\n6\n"})
    assert Cgroup.v1({"name=systemd": sysd, "pids": pids}).pids() == [5, 6]


def test_freeze_state_v1(tmp_path):
    fz = write(tmp_path / "freezer", {"freezer.state": "FREEZING\n"})
    cg = Cgroup.v1({"freezer": fz})
    assert cg.freeze_state() is FreezeState.FREEZING
    (fz / "freezer.state").write_text("FROZEN\n")
    assert cg.freeze_state() is FreezeState.FROZEN
    (fz / "freezer.state").write_text("THAWED\n")
    assert cg.freeze_state() is FreezeState.THAWED
    assert Cgroup.v1({"memory": fz}).freeze_state() is FreezeState.UNKNOWN


def test_freeze_state_v2(v2_dir):
    cg = Cgroup.v2(v2_dir)
    assert cg.freeze_state() is FreezeState.THAWED
    (v2_dir / "cgroup.freeze").write_text("1\n")
    assert cg.freeze_state() is FreezeState.FREEZING
    (v2_dir / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    assert cg.freeze_state() is FreezeState.FROZEN
    assert Cgroup.v2(v2_dir / "gone").freeze_state() is FreezeState.UNKNOWN


# --------------------------------------------------------------------------------- OOM (v2, fixture)
def _events(kills: int, max_: int = 0) -> str:
    return f"low 0\nhigh 0\nmax {max_}\noom {kills}\noom_kill {kills}\n"


@pytest.mark.parametrize("use_inotify", [True, False])
def test_v2_oom_watcher_counts_rises_only(tmp_path, use_inotify):
    d = write(tmp_path / "c", {"memory.events": _events(1)})   # an OOM before we started: not reported

    async def scenario():
        fired = []
        got = asyncio.Event()

        async def on_oom():                                    # coroutine callbacks are awaited
            fired.append(time.monotonic())
            got.set()

        w = OomWatcher(Cgroup.v2(d), on_oom, poll_interval=0.05, use_inotify=use_inotify).start()
        assert w.mode == ("inotify" if use_inotify else "poll")
        ev = d / "memory.events"
        with open(ev, "r+") as f:                               # write in place: same inode
            f.write(_events(1, max_=7))
        await asyncio.sleep(0.3)
        assert fired == []                                      # a "max" event is no OOM
        with open(ev, "r+") as f:
            f.write(_events(2, max_=7))
        await asyncio.wait_for(got.wait(), 5)
        assert len(fired) == 1
        ev.unlink()                                             # cgroup removed
        for _ in range(50):
            if w.closed:
                break
            await asyncio.sleep(0.05)
        assert w.closed
        w.close()                                               # idempotent
        return fired

    assert len(asyncio.run(scenario())) == 1


def test_watcher_without_memory_cgroup(tmp_path):
    async def scenario():
        with pytest.raises(FileNotFoundError):
            OomWatcher(Cgroup.v1({"pids": tmp_path}), lambda: None).start()
    asyncio.run(scenario())


# --------------------------------------------------------------------------------- real, cgroup v1
REAL_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer", "blkio")


def _own_cgroup_dirs() -> dict[str, Path]:
    own = Cgroup.for_pid(os.getpid())
    return {c: own.dirs[c] for c in REAL_CONTROLLERS if c in own.dirs}


@pytest.fixture
def real_v1():
    """Fresh cgroups named kybernate-test-XXX under our own cgroup of each controller; removed after."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    try:
        if CgroupMounts.read().version != 1:
            pytest.skip("host is not cgroup v1/hybrid")
    except FileNotFoundError:
        pytest.skip("no cgroups mounted")
    name = f"kybernate-test-{uuid.uuid4().hex[:8]}"
    made: dict[str, Path] = {}
    procs: list[subprocess.Popen] = []
    try:
        for c, parent in _own_cgroup_dirs().items():
            d = parent / name
            try:
                d.mkdir()
            except OSError as e:
                pytest.skip(f"cannot create a {c} cgroup under {parent}: {e}")
            made[c] = d
        yield made, procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for c, d in made.items():
            if (d / "freezer.state").exists():
                (d / "freezer.state").write_text("THAWED")
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
        left = [str(d) for d in made.values() if d.exists()]
        assert not left, f"test cgroups left behind: {left}"


def _spawn_in(dirs: dict[str, Path], argv: list[str]) -> subprocess.Popen:
    """Join the cgroups before exec, so the child never runs (or allocates) outside them."""
    def join():
        for d in dirs.values():
            with open(d / "cgroup.procs", "w") as f:
                f.write(str(os.getpid()))
    return subprocess.Popen(argv, preexec_fn=join, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_real_v1_metrics_pids_freeze(real_v1):
    from proto.anyutil import unpack
    from proto.io.containerd.cgroups.v1 import metrics_pb2
    dirs, procs = real_v1
    if "pids" in dirs:
        (dirs["pids"] / "pids.max").write_text("50")
    p = _spawn_in(dirs, [sys.executable, "-c", "import time\nx=bytearray(8<<20)\nfor i in range(10**7): pass\n"
                                              "time.sleep(60)"])
    procs.append(p)
    cg = Cgroup.for_pid(p.pid)
    assert cg.version == 1
    for c, d in dirs.items():
        assert cg.dirs[c] == d
    assert cg.pids() == [p.pid]
    time.sleep(1.0)
    m = unpack(cg.metrics(), metrics_pb2.Metrics)
    if "pids" in dirs:
        assert (m.pids.current, m.pids.limit) == (1, 50)
    assert m.memory.usage.usage > 8 << 20                     # the 8 MiB bytearray is charged here
    assert m.memory.usage.max >= m.memory.usage.usage
    assert m.memory.total_rss > 0 or m.memory.rss > 0
    assert m.cpu.usage.total > 0 and len(m.cpu.usage.per_cpu) == os.cpu_count()
    assert m.cpu.usage.total >= sum(m.cpu.usage.per_cpu) * 0.99
    if "freezer" in dirs:
        assert cg.freeze_state() is FreezeState.THAWED
        (dirs["freezer"] / "freezer.state").write_text("FROZEN")
        for _ in range(50):
            if cg.freeze_state() is FreezeState.FROZEN:
                break
            time.sleep(0.05)
        assert cg.freeze_state() is FreezeState.FROZEN
        (dirs["freezer"] / "freezer.state").write_text("THAWED")
        assert cg.freeze_state() is FreezeState.THAWED
    p.kill()
    p.wait()
    assert cg.pids() == []


def test_real_v1_oom_fires(real_v1):
    dirs, procs = real_v1
    mem = dirs["memory"]
    (mem / "memory.limit_in_bytes").write_text(str(32 << 20))
    if (mem / "memory.memsw.limit_in_bytes").exists():
        (mem / "memory.memsw.limit_in_bytes").write_text(str(32 << 20))   # no escape into swap

    async def scenario():
        got = asyncio.Event()
        calls = []

        def on_oom():
            calls.append(1)
            got.set()

        w = OomWatcher(Cgroup.v1({"memory": mem}), on_oom).start()
        assert w.mode == "eventfd"
        p = _spawn_in({"memory": mem}, [sys.executable, "-c", "x = bytearray(200 << 20)"])
        procs.append(p)
        await asyncio.wait_for(got.wait(), 20)
        rc = await asyncio.get_running_loop().run_in_executor(None, p.wait)
        w.close()
        return calls, rc

    calls, rc = asyncio.run(scenario())
    assert calls and rc == -signal.SIGKILL
    assert "oom_kill 1" in (mem / "memory.oom_control").read_text()   # the kernel counted it too


def test_real_v1_cgroup_removal_is_not_an_oom(real_v1):
    """The kernel signals the eventfd when the memory cgroup goes away: close, don't report."""
    dirs, _ = real_v1
    mem = dirs["memory"]

    async def scenario():
        calls = []
        w = OomWatcher(Cgroup.v1({"memory": mem}), lambda: calls.append(1)).start()
        mem.rmdir()
        for _ in range(100):
            if w.closed:
                break
            await asyncio.sleep(0.02)
        return w.closed, calls

    closed, calls = asyncio.run(scenario())
    assert closed and calls == []
